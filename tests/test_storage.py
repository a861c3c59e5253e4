"""sg2dist.storage on local folders and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from support.s3 import SeaweedFS

from sg2dist import storage
from sg2dist.errors import TemporaryError, UserError


def test_join_appends_parts_for_s3_and_local_paths():
    assert storage.join("s3://bucket/runs/", "a", "/b.png") == "s3://bucket/runs/a/b.png"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.join("/tmp/runs", "a", "b.png") == "/tmp/runs/a/b.png"
    assert storage.is_s3("s3://bucket/x") and not storage.is_s3("/tmp/s3:/x")


def test_split_s3_without_bucket_is_user_error():
    with pytest.raises(UserError, match="names no bucket"):
        storage.split_s3("s3:///key")


def test_local_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    url = str(tmp_path / "sub" / "state.json")
    storage.write_text(url, "first")
    storage.write_bytes(url, b"second")
    assert storage.read_text(url) == "second"
    assert os.listdir(tmp_path / "sub") == ["state.json"]


def test_local_write_that_fails_midway_keeps_the_old_file(tmp_path):
    url = str(tmp_path / "latest")
    storage.write_text(url, "step-000100")
    with pytest.raises(TypeError):  # the write fails after the temporary file was opened
        storage.write_bytes(url, "not bytes")  # type: ignore[arg-type]
    assert storage.read_text(url) == "step-000100"
    assert os.listdir(tmp_path) == ["latest"]


def test_local_listdir_exists_copy_and_remove_tree(tmp_path):
    root = str(tmp_path / "run")
    storage.write_text(storage.join(root, "checkpoints", "step-1", "meta.json"), "{}")
    storage.write_text(storage.join(root, "config.yaml"), "a: 1")
    assert storage.listdir(root) == ["checkpoints", "config.yaml"]
    assert storage.listdir(storage.join(root, "nothing-here")) == []
    assert storage.exists(storage.join(root, "checkpoints")) is True

    copy = str(tmp_path / "copy.yaml")
    storage.upload_file(storage.join(root, "config.yaml"), copy)
    storage.download_file(copy, str(tmp_path / "back.yaml"))
    assert storage.read_text(str(tmp_path / "back.yaml")) == "a: 1"

    storage.remove_tree(storage.join(root, "checkpoints"))
    storage.remove_tree(storage.join(root, "checkpoints"))  # already gone: fine
    assert storage.listdir(root) == ["config.yaml"]


def test_local_missing_file_is_user_error_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(UserError, match="nope.bin does not exist"):
        storage.read_bytes(missing)
    with pytest.raises(UserError, match="nope.bin does not exist"):
        storage.download_file(missing, str(tmp_path / "x"))


def test_s3_round_trip_of_bytes_text_and_files(s3_env, tmp_path):
    base = s3_env.url
    payload = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(storage.join(base, "blob.bin"), payload)
    storage.write_text(storage.join(base, "note.txt"), "héllo")
    assert storage.read_bytes(storage.join(base, "blob.bin")) == payload
    assert storage.read_text(storage.join(base, "note.txt")) == "héllo"
    with storage.open_read(storage.join(base, "blob.bin")) as f:
        assert f.read(10) == payload[:10]

    local = tmp_path / "up.bin"
    local.write_bytes(payload[:1000])
    storage.upload_file(str(local), storage.join(base, "dir", "up.bin"))
    storage.download_file(storage.join(base, "dir", "up.bin"), str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == payload[:1000]


def test_cached_local_copy_downloads_an_s3_file_once_and_passes_local_paths_through(
    s3_env, tmp_path
):
    url = storage.join(s3_env.url, "weights", "w.pt")
    storage.write_bytes(url, b"first")
    cache = tmp_path / "cache"
    local = storage.cached_local_copy(url, cache)
    assert Path(local).read_bytes() == b"first" and local.startswith(str(cache))
    storage.write_bytes(url, b"second")  # a cached copy is not fetched again
    assert storage.cached_local_copy(url, cache) == local
    assert Path(local).read_bytes() == b"first"
    other = storage.join(s3_env.url, "elsewhere", "w.pt")  # same file name, another object
    storage.write_bytes(other, b"other")
    assert Path(storage.cached_local_copy(other, cache)).read_bytes() == b"other"
    assert storage.cached_local_copy(str(tmp_path / "x.pt"), cache) == str(tmp_path / "x.pt")


def test_s3_listdir_shows_immediate_children_and_remove_tree_spares_siblings(s3_env):
    base = s3_env.url
    for key in ("ckpt/step-10/G.pt", "ckpt/step-10/sub/x", "ckpt/step-100/G.pt", "ckpt/latest"):
        storage.write_bytes(storage.join(base, key), b"x")
    assert storage.listdir(storage.join(base, "ckpt")) == ["latest", "step-10", "step-100"]
    assert storage.exists(storage.join(base, "ckpt", "step-10")) is True
    assert storage.exists(storage.join(base, "ckpt", "step-1")) is False

    storage.remove_tree(storage.join(base, "ckpt", "step-10"))
    assert storage.listdir(storage.join(base, "ckpt")) == ["latest", "step-100"]
    assert storage.exists(storage.join(base, "ckpt", "step-10")) is False
    storage.remove_tree(storage.join(base, "ckpt", "latest"))
    assert storage.listdir(storage.join(base, "ckpt")) == ["step-100"]


def test_s3_missing_object_and_missing_bucket_are_user_errors_naming_the_url(s3_env):
    with pytest.raises(UserError, match=r"s3://\S+/absent\.json does not exist"):
        storage.read_text(storage.join(s3_env.url, "absent.json"))
    with pytest.raises(UserError, match="bucket 'no-such-bucket-x' of s3://no-such-bucket-x/a"):
        storage.read_bytes("s3://no-such-bucket-x/a/b")
    with pytest.raises(UserError, match="no-such-bucket-x"):
        storage.listdir("s3://no-such-bucket-x/a")


def test_s3_wrong_credentials_are_one_clear_line_without_the_secret(s3_env, monkeypatch):
    url = storage.join(s3_env.url, "private.bin")
    storage.write_bytes(url, b"x")
    wrong_secret = "wrong-secret-value-123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(UserError) as info:
        storage.read_bytes(url)
    message = str(info.value)
    assert url in message and "AWS_SECRET_ACCESS_KEY" in message and "\n" not in message
    assert wrong_secret not in message and s3_env.server.access_key not in message


@pytest.mark.timeout(60)  # a hang guard: two refused connections take a few seconds
def test_s3_unreachable_endpoint_is_one_retryable_error_after_the_set_attempts(s3_env, monkeypatch):
    # A socket bound but never listening: connections to it are refused, and no other
    # process can take the port while we hold it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        closed_port = holder.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        with pytest.raises(storage.StorageUnavailableError) as info:
            storage.exists(storage.join(s3_env.url, "x"))
    assert str(info.value).startswith(
        f"cannot reach S3 endpoint http://127.0.0.1:{closed_port} for s3://"
    )
    assert "(after 2 attempts)" in str(info.value)
    assert info.value.exit_code == 75  # an outage: the Job retries, it does not fail for good


def test_a_write_retried_through_an_s3_outage_lands_once_the_server_is_back(
    tmp_path, monkeypatch, capsys
):
    server = SeaweedFS(tmp_path / "s3").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        url = f"{server.prefix_url()}/state.pt"
        server.stop()
        tries = []

        def write() -> None:
            tries.append(len(tries) + 1)
            if len(tries) == 2:
                server.start()  # the outage ends between the first and the second try
            storage.write_bytes(url, b"state")

        storage.retry_unavailable(write, what="writing state.pt", budget_s=60)
        assert tries == [1, 2] and storage.read_bytes(url) == b"state"
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[storage]")]
        assert line.startswith("[storage] writing state.pt failed (attempt 1): cannot reach S3 ")
        assert line.endswith("; retrying in 1 s")

        server.stop()  # and a budget that allows no second try
        with pytest.raises(storage.StorageUnavailableError) as info:
            storage.retry_unavailable(
                lambda: storage.write_bytes(url, b"new"), what="writing state.pt", budget_s=0
            )
        assert str(info.value).startswith("writing state.pt failed 1 time(s) over ")
        assert "cannot reach S3 endpoint" in str(info.value) and "\n" not in str(info.value)
    finally:
        server.stop()


def test_errors_that_waiting_cannot_fix_are_not_retried(s3_env, monkeypatch):
    url = storage.join(s3_env.url, "private.bin")
    storage.write_bytes(url, b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    tries = []

    def read() -> bytes:
        tries.append(1)
        return storage.read_bytes(url)

    with pytest.raises(UserError) as info:
        storage.retry_unavailable(read, what="reading private.bin", budget_s=60)
    assert tries == [1] and not isinstance(info.value, TemporaryError)
    assert info.value.exit_code == 2


def test_local_writes_get_the_mode_a_plain_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "a.png"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- https


def test_https_url_is_downloaded_once_into_the_cache_with_its_sha256_printed(
    https_server, tmp_path, monkeypatch, capsys
):
    import hashlib

    monkeypatch.setenv("SG2DIST_CACHE_DIR", str(tmp_path / "cache"))
    payload = os.urandom(3 << 20)  # several download chunks
    (https_server.root / "net.pkl").write_bytes(payload)
    url = f"{https_server.url}/net.pkl?token=secret"
    path, sha256 = storage.fetch_cached(url)
    assert sha256 == hashlib.sha256(payload).hexdigest()
    with open(path, "rb") as f:
        assert f.read() == payload
    assert path.startswith(str(tmp_path / "cache")) and path.endswith("-net.pkl")
    first = capsys.readouterr().err
    assert f"sha256 {sha256}" in first and "secret" not in first
    # The second time comes from the cache: no request reaches the server.
    assert storage.fetch_cached(url) == (path, sha256)
    assert len(https_server.gets) == 1
    assert f"using cached {path} (sha256 {sha256})" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir() if "tmp" in p.name] == []


def test_https_errors_are_one_line_naming_the_url_without_its_query(
    https_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("SG2DIST_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"net\.pkl answered HTTP 404") as missing:
        storage.fetch_cached(f"{https_server.url}/missing/net.pkl?sig=abc")
    assert "sig=abc" not in str(missing.value)
    # A server whose certificate this process does not trust is refused, not used.
    monkeypatch.delenv("SSL_CERT_FILE")
    (https_server.root / "net.pkl").write_bytes(b"x")
    with pytest.raises(UserError, match="cannot download .*CERTIFICATE_VERIFY_FAILED"):
        storage.fetch_cached(f"{https_server.url}/net.pkl")
    assert not list((tmp_path / "cache" / "downloads").glob("*net.pkl"))
