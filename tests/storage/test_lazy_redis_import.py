"""tun2g.storage imports redis-py only when a Redis store is asked for (start-up cost of every command)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini

CHECK = """
import sys
import tun2g.storage
assert "redis" not in sys.modules, "importing tun2g.storage pulled in redis"
from tun2g.storage import DEFAULT_KEY_PREFIX, RedisStorage, redact_url
assert "redis" in sys.modules and RedisStorage.__name__ == "RedisStorage" and DEFAULT_KEY_PREFIX
assert redact_url("redis://:secret@h:6379/0").count("secret") == 0
"""


def test_redis_is_imported_only_on_first_use():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
