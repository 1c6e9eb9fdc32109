"""Choosing a store from a URL or the environment, the default file, and domain normalization."""

from pathlib import Path

import pytest

from tun2g.storage import (
    SQLiteStorage, StorageError, default_sqlite_path, normalize_domain, open_storage,
)

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


def test_with_nothing_set_the_default_sqlite_file_is_used(storage_env):
    storage = open_storage()
    assert isinstance(storage, SQLiteStorage)
    assert storage.describe() == f"sqlite:{storage_env / 'tun2g.sqlite3'}"
    assert (storage_env / "tun2g.sqlite3").exists()


def test_default_path_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TUN2G_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_sqlite_path() == tmp_path / "xdg" / "tun2g" / "tun2g.sqlite3"
    assert (tmp_path / "xdg" / "tun2g").is_dir()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_sqlite_path() == tmp_path / "home" / ".local" / "share" / "tun2g" / "tun2g.sqlite3"


def test_tun2g_data_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TUN2G_DATA_DIR", str(tmp_path / "data"))
    assert default_sqlite_path() == tmp_path / "data" / "tun2g.sqlite3"


def test_tun2g_storage_wins_over_redis_url(storage_env, monkeypatch, tmp_path):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("TUN2G_STORAGE", f"sqlite://{tmp_path / 'chosen.db'}")
    assert open_storage().describe() == f"sqlite:{tmp_path / 'chosen.db'}"
    # an explicit URL wins over both
    assert open_storage(f"sqlite://{tmp_path}/explicit.db").describe() == f"sqlite:{tmp_path}/explicit.db"


@pytest.mark.parametrize("url, expected", [
    ("sqlite:relative.db", "relative.db"),
    ("sqlite:sub/dir/relative.db", "sub/dir/relative.db"),
    ("sqlite::memory:", ":memory:"),
])
def test_sqlite_url_forms(storage_env, monkeypatch, tmp_path, url, expected):
    monkeypatch.chdir(tmp_path)
    assert open_storage(url).describe() == f"sqlite:{expected}"


def test_a_bare_sqlite_scheme_means_the_default_file(storage_env):
    assert open_storage("sqlite:").describe() == f"sqlite:{storage_env / 'tun2g.sqlite3'}"


@pytest.mark.parametrize("url", ["postgres://db/tun2g", "/var/lib/tun2g.db", "mysql:x"])
def test_unknown_schemes_list_the_known_ones(storage_env, url):
    with pytest.raises(StorageError, match="sqlite:///.*redis://.*rediss://"):
        open_storage(url)


def test_unknown_scheme_errors_hide_passwords(storage_env):
    with pytest.raises(StorageError) as caught:
        open_storage("postgres://admin:hunter2@db/tun2g")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("given, expected", [
    ("example.com", "example.com"),
    ("App.Example.COM", "app.example.com"),
    ("app.example.com.", "app.example.com"),
    ("app.example.com:8080", "app.example.com"),
    ("  app.example.com  ", "app.example.com"),
    ("localhost", "localhost"),
    ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]:8080", "[::1]"),
    ("[0:0::1]", "[::1]"),
    ("bücher.example", "xn--bcher-kva.example"),
])
def test_normalize_domain(given, expected):
    assert normalize_domain(given) == expected
    assert normalize_domain(expected) == expected  # idempotent


@pytest.mark.parametrize("bad", ["", ".", "a..b", "-a.com", "a-.com", "a b.com", "x.com:99999999",
                                 "x.com:http", "[::1", "[nonsense]", "a/b", "*.example.com", "x" * 64 + ".com",
                                 "my_host.internal", "app.test\n", "a\n.test", "x.com:65536"])
def test_normalize_domain_refuses(bad):
    with pytest.raises(StorageError, match="invalid domain"):
        normalize_domain(bad)


def test_paths_are_expanded(storage_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_storage("sqlite:~/in-home.db").describe() == f"sqlite:{Path(tmp_path) / 'in-home.db'}"
