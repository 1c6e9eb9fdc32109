"""Log lines are logfmt: leading keys first, values quoted only when they must be."""

import io
import re

import gevent
import pytest

from tun2g.log import FLUSH_BYTES, FLUSH_SECONDS, AccessLog, configure, flush, get_logger

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


def _access(path="/items?page=2", host="app.test", **changes):
    fields = dict(method="GET", host=host, path=path, status=200, ms=0.42, client_ip="127.0.0.1", bytes_in=0,
                  bytes_out=13, request_id="req-1", backend="be-1") | changes
    AccessLog("tun2g.server.pipeline").request(**fields)
    return fields


def test_an_access_line_reads_as_the_structlog_line_of_the_same_fields():
    out = io.StringIO()
    configure("info", stream=out)
    fields = _access()
    get_logger("tun2g.server.pipeline").info("request", **fields)
    flush()
    fast, slow = out.getvalue().splitlines()
    assert fast.split(" ", 1)[1] == slow.split(" ", 1)[1]  # all but the timestamp
    stamp = fast.split(" ", 1)[0]
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    configure("info")


@pytest.mark.parametrize("path,host", [('/a b"c\\d', "app.test"), ("/x\nevent=forged", "evil host"),
                                       ("/ok", 'h="x"')])
def test_hostile_paths_and_hosts_stay_one_quoted_line(path, host):
    out = io.StringIO()
    configure("info", stream=out)
    fields = _access(path, host)
    get_logger("tun2g.server.pipeline").info("request", **fields)
    flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].split(" ", 1)[1] == lines[1].split(" ", 1)[1]
    assert lines[0].count(" event=") == 1
    configure("info")


def test_access_lines_are_buffered_and_stay_in_order_with_other_lines():
    out = io.StringIO()
    configure("info", stream=out)
    _access(path="/first")
    assert out.getvalue() == ""  # buffered
    get_logger("tun2g.server").warning("later")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "path=/first" in lines[0] and "event=later" in lines[1]
    configure("info")


def test_a_full_buffer_is_written_without_a_flush():
    out = io.StringIO()
    configure("info", stream=out)
    count = 0
    while out.getvalue() == "":
        _access(path=f"/{count}")
        count += 1
        assert count < 10_000
    assert len(out.getvalue()) >= FLUSH_BYTES and len(out.getvalue().splitlines()) == count
    configure("info")


def test_buffered_lines_are_written_by_the_timer():
    out = io.StringIO()
    configure("info", stream=out)
    _access(path="/timed")
    deadline = gevent.get_hub().loop.now() + FLUSH_SECONDS + 10
    while not out.getvalue() and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.02)  # polling a StringIO the hub's timer writes to, under a deadline
    assert "path=/timed" in out.getvalue()
    configure("info")


def test_access_lines_follow_the_level():
    out = io.StringIO()
    configure("warning", stream=out)
    _access()
    flush()
    assert out.getvalue() == ""
    configure("info")
