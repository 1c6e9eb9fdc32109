"""Redis-specific behaviour: the documented key schema, hashes at rest, outages, credentials."""

import time

import pytest
import redis

from tun2g.storage import RedisStorage, StorageUnavailable, hash_secret, open_storage


@pytest.fixture
def raw_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def dump(client) -> dict:
    """Every key with its value, as text."""
    out = {}
    for key in client.keys("*"):
        kind = client.type(key)
        out[key] = {"hash": client.hgetall, "set": client.smembers, "string": client.get}[kind](key)
    return out


def test_keys_follow_the_documented_schema(redis_storage, raw_redis):
    info, secret = redis_storage.create_token("alice", note="ci")
    redis_storage.add_route("app.example.com", "alice")
    digest = hash_secret(secret)
    assert dump(raw_redis) == {
        f"tun2g:token:{digest}": {"id": info.id, "user": "alice", "scopes": '["connect"]',
                                  "created": repr(info.created), "note": "ci"},
        f"tun2g:token-id:{info.id}": digest,
        "tun2g:tokens": {info.id},
        "tun2g:route:app.example.com": {"user": "alice", "created": raw_redis.hget(
            "tun2g:route:app.example.com", "created")},
        "tun2g:routes": {"app.example.com"},
        "tun2g:route-parent:example.com": {"app.example.com"},
        "tun2g:route-index": "1",
        "tun2g:revision": "1",  # a route added: every node reloads its routing table
    }
    redis_storage.revoke_token(info.id)
    redis_storage.remove_route("app.example.com")
    # Nothing left behind but the revision counter the servers poll (and the index marker).
    assert dump(raw_redis) == {"tun2g:revision": "3", "tun2g:route-index": "1"}


def test_secrets_are_only_stored_as_hashes(redis_storage, raw_redis):
    secrets = [redis_storage.create_token("alice")[1] for _ in range(3)]
    secrets.append("imported-go-token-value")
    redis_storage.import_token("bob", secrets[-1])
    everything = repr(dump(raw_redis))
    assert hash_secret(secrets[0]) in everything
    assert not any(secret in everything for secret in secrets)


def test_key_prefixes_keep_two_deployments_apart(redis_server):
    blue = RedisStorage(redis_server.url, key_prefix="blue:")
    green = RedisStorage(redis_server.url, key_prefix="green:")
    _, secret = blue.create_token("alice")
    blue.add_route("app.example.com", "alice")
    assert green.list_tokens() == [] and green.list_routes() == []
    assert green.add_route("app.example.com", "bob").user == "bob"
    assert blue.has_token(secret)[0] == "alice"


def test_redis_url_from_the_environment_selects_redis(storage_env, monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    storage = open_storage()
    assert isinstance(storage, RedisStorage) and storage.describe() == redis_server.url


def test_redis_going_away_is_reported_and_recovered_from(redis_server, redis_storage):
    _, secret = redis_storage.create_token("alice")
    redis_storage.has_token(secret)  # the pool now holds a live connection
    redis_server.stop()
    for call in (lambda: redis_storage.has_token(secret), lambda: redis_storage.has_route("a.example.com"),
                 lambda: redis_storage.create_token("bob"), redis_storage.list_routes, redis_storage.ping):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert time.monotonic() - started < 3.0
        message = str(caught.value)
        assert f"127.0.0.1:{redis_server.port}" in message and "redis-server is running" in message
        assert "Traceback" not in message
    redis_server.start()  # an empty Redis (no persistence in tests): the store works again
    info, secret = redis_storage.create_token("alice")
    assert redis_storage.has_token(secret) == ("alice", ["connect"])


def test_nothing_listening_is_unavailable_not_a_traceback(port_factory):
    storage = open_storage(f"redis://127.0.0.1:{port_factory()}/0")
    with pytest.raises(StorageUnavailable, match="cannot reach Redis"):
        storage.ping()


def test_wrong_password_is_reported_without_revealing_it(redis_server, raw_redis):
    raw_redis.config_set("requirepass", "right-password")
    wrong = RedisStorage(f"redis://:wrong-password@127.0.0.1:{redis_server.port}/0")
    assert "wrong-password" not in wrong.describe() and ":***@" in wrong.describe()
    with pytest.raises(StorageUnavailable, match="credentials") as caught:
        wrong.list_tokens()
    assert "wrong-password" not in str(caught.value)
    right = RedisStorage(f"redis://:right-password@127.0.0.1:{redis_server.port}/0")
    assert right.list_routes() == []
