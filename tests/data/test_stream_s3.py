"""Streaming from a real S3 server when things go wrong: credentials, buckets, a server that stops.

Each failure must end in one clear UserError naming the URL, or in a recovery after
retries, and never in a hang: every test here is bounded by a timeout.
"""

from __future__ import annotations

import io
import threading
from itertools import islice

import botocore.exceptions
import pytest
import torch
from support.s3 import SeaweedFS

from sg2dist import storage
from sg2dist.data import build_loader, shards, stream
from sg2dist.data.imageops import ConvertSettings
from sg2dist.data.prepare import prepare_dataset
from sg2dist.errors import TemporaryError, UserError


def _loader(url: str, **overrides):
    options = dict(
        batch_gpu=5,
        rank=0,
        world_size=1,
        seed=0,
        workers=2,
        mirror=False,
        shuffle_buffer=4,
        use_labels=False,
    )
    options.update(overrides)
    return build_loader(url, **options)


def _prepare_to(url: str, root, kit, count: int = 60) -> str:
    kit.write_class_folders(root / "src", {"a": kit.random_images(count, (16, 16), seed=11)})
    prepare_dataset(str(root / "src"), url, ConvertSettings(16), shard_size=6, progress=False)
    return url


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A private SeaweedFS that tests may stop and restart (same port, data and keys)."""
    server = SeaweedFS(tmp_path_factory.mktemp("own-seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_env(own_server, monkeypatch):
    if not own_server.running:
        own_server.start()
    for key, value in own_server.env().items():
        monkeypatch.setenv(key, value)
    return own_server


@pytest.mark.timeout(120)
def test_wrong_credentials_for_a_dataset_are_one_clear_error(s3_env, tmp_path, kit, monkeypatch):
    url = _prepare_to(s3_env.url + "/creds", tmp_path, kit, count=6)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UserError, match=f"refused access to {url}/dataset.json"):
        _loader(url)


@pytest.mark.timeout(120)
def test_missing_bucket_is_one_clear_error(s3_env):
    with pytest.raises(UserError, match="bucket 'absent-bucket-7' of s3://absent-bucket-7/d"):
        _loader("s3://absent-bucket-7/data")


@pytest.mark.timeout(180)
def test_server_stopped_mid_stream_ends_in_a_clear_error_not_a_hang(
    own_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(f"s3://{own_env.bucket}/stopped", tmp_path, kit)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    loader = _loader(url, workers=2)
    assert len(list(islice(loader, 3))) == 3
    own_env.stop()
    with pytest.raises(UserError) as info:  # the test's timeout is the hang guard
        for _ in islice(loader, 1000):  # 1000 batches need ~800 shard reads: far past any buffer
            pass
    message = str(info.value)
    assert url in message and "\n" not in message
    known = ("cannot reach S3 endpoint", "could not serve", "reading shard")
    assert any(form in message for form in known), message
    # An outage, whether it met a request or a read: the retryable exit code (75).
    assert isinstance(info.value, TemporaryError), message


@pytest.mark.timeout(180)
def test_stream_recovers_when_the_server_comes_back_and_loses_no_batch(
    own_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(f"s3://{own_env.bucket}/restarted", tmp_path, kit)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")  # the retry budget must outlast the restart
    reference = list(islice(_loader(url, workers=0), 40))

    loader = _loader(url, workers=0)  # in this process: its boto3 client is ours to watch
    batches = list(islice(loader, 3))
    own_env.stop()
    # The server comes back when the stream has met the outage (a failed request), not
    # after some sleep: then the test cannot pass without the stream having waited.
    failed_requests: list[Exception] = []
    restart = threading.Thread(target=own_env.start)
    first_failure = threading.Lock()  # the shard reader and its open-ahead thread both ask

    def on_attempt(caught_exception=None, **_):
        with first_failure:
            if caught_exception is not None and not failed_requests:
                failed_requests.append(caught_exception)
                restart.start()  # botocore's retries (AWS_MAX_ATTEMPTS=10) outlast the restart

    events = storage.s3_client().meta.events
    events.register_first("needs-retry.s3", on_attempt, unique_id="test-outage")
    try:
        batches += list(islice(loader, 37))
    finally:
        events.unregister("needs-retry.s3", unique_id="test-outage")
        if restart.is_alive():
            restart.join()
    assert failed_requests  # the stream did meet the outage, and rode it out

    assert [b.keys for b in batches] == [b.keys for b in reference]
    assert all(torch.equal(a.img_NCHW, b.img_NCHW) for a, b in zip(batches, reference, strict=True))


@pytest.mark.timeout(120)
def test_shards_opened_ahead_give_the_batches_of_shards_opened_in_turn(
    s3_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(s3_env.url + "/ahead", tmp_path, kit)
    opened_ahead = []  # for each pre-opened shard the reader took: did its open succeed

    class CountingOpenAhead(shards.OpenAhead):
        def take(self):
            taken = super().take()
            opened_ahead.append(taken is not None)
            return taken

    monkeypatch.setattr(stream, "OpenAhead", CountingOpenAhead)  # counted with workers=0
    ahead = {w: list(islice(_loader(url, workers=w, mirror=True), 30)) for w in (0, 2)}
    assert len(opened_ahead) >= 20 and all(opened_ahead)  # 150 samples: ~25 shard visits

    monkeypatch.setattr(stream, "OPEN_AHEAD_MAX_BYTES", 0)  # every shard opened in turn
    for workers in (0, 2):
        in_turn = list(islice(_loader(url, workers=workers, mirror=True), 30))
        assert [b.keys for b in ahead[workers]] == [b.keys for b in in_turn]
        pairs = zip(ahead[workers], in_turn, strict=True)
        assert all(torch.equal(a.img_NCHW, b.img_NCHW) for a, b in pairs)


@pytest.mark.timeout(120)
def test_a_failed_open_ahead_leaves_the_error_to_the_normal_read(s3_env):
    missing = s3_env.url + "/absent-000000.tar"
    ahead = shards.OpenAhead(missing, storage.s3_client())
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        next(shards.read_shard(missing, ahead=ahead))


class BreakingStream(io.RawIOBase):
    """A real S3 object's stream that breaks off, as a reset connection does, after
    `after_bytes` bytes."""

    def __init__(self, stream, after_bytes: int):
        self.stream, self.left = stream, after_bytes

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left <= 0:
            raise botocore.exceptions.ResponseStreamingError(error="connection reset by peer")
        n = self.stream.readinto(memoryview(buffer)[: self.left])
        self.left -= n
        return n

    def close(self):
        self.stream.close()
        super().close()


def _break_reads(monkeypatch, breaks: int, after_bytes: int = 3000) -> list[int]:
    """The next `breaks` shard streams break off after `after_bytes`; returns the opens."""
    opens: list[int] = []
    open_read = storage.open_read

    def breaking_open_read(url, *, client=None):
        opens.append(1)
        stream = open_read(url, client=client)
        return BreakingStream(stream, after_bytes) if len(opens) <= breaks else stream

    monkeypatch.setattr(storage, "open_read", breaking_open_read)
    monkeypatch.setattr(shards, "RETRY_BASE_DELAY_S", 0.0)
    return opens


@pytest.mark.timeout(120)
def test_a_shard_read_that_breaks_off_resumes_and_gives_each_sample_once(
    s3_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(s3_env.url + "/breaks", tmp_path, kit, count=6)
    shard = stream.open_manifest(url).shard_url(0)
    intact = [sample["__key__"] for sample in shards.read_shard(shard)]
    opens = _break_reads(monkeypatch, breaks=shards.READ_ATTEMPTS - 1)
    assert [sample["__key__"] for sample in shards.read_shard(shard)] == intact
    assert len(opens) == shards.READ_ATTEMPTS  # it broke off every time but the last


@pytest.mark.timeout(120)
def test_a_shard_read_that_keeps_breaking_off_is_a_retryable_error(
    s3_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(s3_env.url + "/keeps-breaking", tmp_path, kit, count=6)
    shard = stream.open_manifest(url).shard_url(0)
    _break_reads(monkeypatch, breaks=shards.READ_ATTEMPTS)
    with pytest.raises(TemporaryError, match=f"reading shard {shard} broke off 4 times"):
        list(shards.read_shard(shard))


@pytest.mark.timeout(120)
def test_a_truncated_shard_in_s3_is_one_error_at_once_not_retried(
    s3_env, tmp_path, kit, monkeypatch
):
    url = _prepare_to(s3_env.url + "/truncated", tmp_path, kit, count=6)
    shard = stream.open_manifest(url).shard_url(0)
    whole = storage.read_bytes(shard)
    storage.write_bytes(shard, whole[: len(whole) // 2])
    opens = _break_reads(monkeypatch, breaks=0)  # counts the opens, breaks nothing
    with pytest.raises(UserError, match=f"shard {shard} is damaged") as info:
        list(shards.read_shard(shard))
    assert not isinstance(info.value, TemporaryError)  # exit 2: a retried job cannot fix it
    assert len(opens) == 1
