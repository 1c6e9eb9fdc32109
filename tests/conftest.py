"""Shared test setup: every module in tests/fixtures/ is a pytest plugin.

Each area of the suite keeps its fixtures in its own module there (Redis,
Go peers, TLS material, ...), so adding one never edits this file.
"""

from gevent import monkey

# The tests drive real sockets from plain test functions as well as from
# greenlets; patch before anything imports socket, ssl or threading.
monkey.patch_all()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Fixture modules import one another; declare them for assertion rewriting up front.
pytest.register_assert_rewrite("tests.fixtures")

pytest_plugins = sorted(
    f"tests.fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if path.stem != "__init__"
)
