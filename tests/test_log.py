"""Log lines are logfmt: leading keys first, values quoted only when they must be."""

import io

import pytest

from tun2g.log import configure, get_logger

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_lines_are_logfmt_with_leading_keys_and_quoting():
    out = io.StringIO()
    configure("info", stream=out)
    get_logger("tun2g.server").info("registered", domain="app.test", note='say "hi" = ok', multi="a\nb",
                                    usable=True, missing=None)
    line = out.getvalue().strip()
    assert line.startswith("ts=") and " level=info component=server event=registered " in line
    assert " domain=app.test " in line
    assert ' note="say \\"hi\\" = ok" ' in line
    assert ' multi="a\\nb" ' in line and " usable " in line and line.endswith(" missing=")
    assert "\n" not in line


def test_levels_below_the_configured_one_are_dropped():
    out = io.StringIO()
    configure("warning", stream=out)
    get_logger("tun2g.client").info("quiet")
    get_logger("tun2g.client").warning("loud")
    assert "quiet" not in out.getvalue() and "event=loud" in out.getvalue()
    configure("info")
