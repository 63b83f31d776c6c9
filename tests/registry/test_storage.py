"""Blob stores (local directory and S3 on a loopback moto server) behind one interface."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.errors import ServiceUnavailable
from registry.settings import Settings
from registry.storage import (
    BlobStore,
    LocalBlobStore,
    Staging,
    blob_key,
    digest_of_key,
    open_blob_store,
)
from registry.storage.s3 import S3BlobStore, parse_s3_url


def _s3_store(url: str, endpoint: str, **kwargs: int) -> S3BlobStore:
    bucket, prefix = parse_s3_url(url)
    return S3BlobStore(bucket=bucket, prefix=prefix, endpoint_url=endpoint, **kwargs)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
    else:
        endpoint = request.getfixturevalue("s3_server")
        url = request.getfixturevalue("s3_storage_url")
        # A prefix checks that keys are namespaced inside a shared bucket.
        yield _s3_store(url + "/tenant-a", endpoint)


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(tmp_path / "staging")


def _stage(staging: Staging, data: bytes, piece: int = 7919) -> tuple[Path, str]:
    f = staging.new_file()
    with f:
        for i in range(0, len(data), piece):
            f.write(memoryview(data)[i : i + piece])
    return f.path, f.hexdigest()


def test_keys_are_content_addresses() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    key = blob_key(digest)
    assert key == f"sha256/{digest[:2]}/{digest[2:]}"
    assert digest_of_key(key) == digest
    for bad in ("sha256/zz/" + "0" * 62, "other/ab/cd", "sha256/" + digest, "../etc/passwd"):
        assert digest_of_key(bad) is None
    with pytest.raises(ValueError):
        blob_key("ABC")


def test_staging_hashes_while_writing_and_discards(staging: Staging) -> None:
    data = os.urandom(100_000)
    path, digest = _stage(staging, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data

    def interrupted_upload() -> None:
        with staging.new_file() as f:
            f.write(b"half an upload")
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        interrupted_upload()
    # Only the completed file is left: the failed one removed itself.
    assert staging.files() == [path]


def test_commit_round_trip_is_bit_exact(store: BlobStore, staging: Staging) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path, digest = _stage(staging, data)

    key = store.commit(path, digest)

    assert key == blob_key(digest)
    assert not path.exists(), "the staging file is consumed by commit"
    assert store.exists(key)
    assert store.size(key) == len(data)
    assert b"".join(store.iter_range(key, chunk_size=1 << 20)) == data
    assert [k for k, _ in store.list_keys()] == [key]
    [listed] = list(store.list_blobs())
    assert (listed.key, listed.size) == (key, len(data))


def test_identical_bytes_are_stored_once(store: BlobStore, staging: Staging) -> None:
    data = b"the same expert, uploaded twice"
    first = store.commit(*_stage(staging, data))
    path, digest = _stage(staging, data)
    second = store.commit(path, digest)

    assert first == second
    assert not path.exists()
    assert len(list(store.list_keys())) == 1
    assert store.read_bytes(first) == data


@pytest.mark.parametrize(
    ("start", "stop"),
    [(0, 10), (5, None), (999, 1001), (1, 4097), (4096, 4096), (0, None)],
)
def test_ranges(store: BlobStore, staging: Staging, start: int, stop: int | None) -> None:
    data = os.urandom(5000)
    key = store.commit(*_stage(staging, data))
    got = b"".join(store.iter_range(key, start, stop, chunk_size=1000))
    assert got == data[start:stop]


def test_delete_and_absent_blobs(store: BlobStore, staging: Staging) -> None:
    key = store.commit(*_stage(staging, b"short-lived"))
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting an absent blob is not an error
    with pytest.raises(FileNotFoundError):
        store.size(key)
    with pytest.raises(FileNotFoundError):
        b"".join(store.iter_range(key))
    assert list(store.list_keys()) == []


def test_store_check(store: BlobStore) -> None:
    store.check()


def test_unreachable_stores_fail_the_check(tmp_path: Path, s3_server: str) -> None:
    occupied = tmp_path / "not-a-dir"
    occupied.write_text("a file where the blob directory should be")
    with pytest.raises(ServiceUnavailable) as local_exc:
        LocalBlobStore(occupied).check()
    assert local_exc.value.code == "storage_unavailable"

    with pytest.raises(ServiceUnavailable) as s3_exc:
        _s3_store("s3://no-such-bucket", s3_server).check()
    assert s3_exc.value.code == "storage_unavailable"


def test_s3_multipart_upload(s3_server: str, s3_storage_url: str, staging: Staging) -> None:
    # 5 MiB is S3's smallest part; 11 MiB makes three parts.
    store = _s3_store(
        s3_storage_url, s3_server, multipart_threshold=5 << 20, multipart_chunksize=5 << 20
    )
    data = os.urandom(11 << 20)
    path, digest = _stage(staging, data, piece=1 << 20)
    key = store.commit(path, digest)
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    assert "-3" in head["ETag"], "uploaded as a three-part multipart upload"
    assert hashlib.sha256(b"".join(store.iter_range(key))).hexdigest() == digest


def test_local_recommit_refreshes_age(tmp_path: Path, staging: Staging) -> None:
    # An orphan about to be garbage-collected must look young again once an upload
    # reuses it, or the collector could delete it under the new row.
    store = LocalBlobStore(tmp_path / "blobs")
    key = store.commit(*_stage(staging, b"orphan"))
    old = time.time() - 10 * 86400
    os.utime(store.root / key, (old, old))
    store.commit(*_stage(staging, b"orphan"))
    [(_, modified)] = list(store.list_keys())
    assert modified.timestamp() > old + 86400


def test_staging_sweep_removes_only_stale_files(staging: Staging) -> None:
    stale, _ = _stage(staging, b"crashed upload")
    fresh, _ = _stage(staging, b"upload in flight")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert staging.sweep(older_than_seconds=3600) == [stale]
    assert staging.files() == [fresh]


def test_open_blob_store_from_settings(tmp_path: Path) -> None:
    default = open_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(default, LocalBlobStore)
    assert default.root == (tmp_path / "blobs").resolve()

    plain = open_blob_store(Settings(data_dir=tmp_path, storage_url=str(tmp_path / "b2")))
    assert isinstance(plain, LocalBlobStore)
    assert plain.root == tmp_path / "b2"

    s3 = open_blob_store(
        Settings(
            data_dir=tmp_path,
            storage_url="s3://bucket/some/prefix/",
            s3_endpoint_url="http://127.0.0.1:9",
        )
    )
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")

    with pytest.raises(ValueError):
        open_blob_store(Settings(data_dir=tmp_path, storage_url="ftp://host/x"))


def test_flush_started_at_close_is_finished_by_commit(tmp_path: Path) -> None:
    from registry.storage.base import background_syncs

    staging = Staging(tmp_path / "staging", sync_on_close=True)
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(1 << 20)
    path, digest = _stage(staging, data)
    assert path in background_syncs._pending, "the flush starts when the upload is complete"
    key = store.commit(path, digest)
    assert path not in background_syncs._pending
    assert store.read_bytes(key) == data

    # A discarded upload and a duplicate upload leave nothing tracked either.
    dropped = staging.new_file()
    dropped.write(b"rejected by validation")
    dropped.close()
    dropped.discard()
    duplicate, _ = _stage(staging, data)
    store.commit(duplicate, digest)
    # (Only this test's files: other tests leave staged files behind on purpose.)
    assert [p for p in background_syncs._pending if tmp_path in p.parents] == []
    assert staging.files() == []


def test_s3_outage_is_a_503_and_leaves_no_staging_file(tmp_path: Path, staging: Staging) -> None:
    import boto3
    from botocore.config import Config

    # A port nothing listens on; one attempt, so the test does not sit in retry backoff.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    client = boto3.client(
        "s3",
        endpoint_url=dead,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2),
    )
    store = S3BlobStore(bucket="b", endpoint_url=dead, client=client)
    path, digest = _stage(staging, b"bytes that cannot be stored now")

    for attempt in (
        lambda: store.commit(path, digest),
        lambda: b"".join(store.iter_range(blob_key(digest))),
        lambda: list(store.list_blobs()),
        lambda: store.delete(blob_key(digest)),
    ):
        with pytest.raises(ServiceUnavailable) as exc:
            attempt()
        assert exc.value.code == "storage_unavailable"
    assert staging.files() == []


def test_a_full_or_broken_disk_is_a_503(tmp_path: Path, staging: Staging) -> None:
    from registry.storage import StagingFile

    full = StagingFile(open("/dev/full", "wb", buffering=0), tmp_path / "x")  # noqa: SIM115
    with pytest.raises(ServiceUnavailable) as write_exc:
        full.write(b"no space left")
    full.close()
    assert write_exc.value.code == "storage_unavailable"

    occupied = tmp_path / "occupied"
    occupied.write_text("a file where a directory should be")
    with pytest.raises(ServiceUnavailable):
        Staging(occupied).new_file()

    path, digest = _stage(staging, b"valid bytes, nowhere to put them")
    with pytest.raises(ServiceUnavailable) as commit_exc:
        LocalBlobStore(occupied).commit(path, digest)
    assert commit_exc.value.code == "storage_unavailable"
    assert not path.exists(), "a failed commit removes the staging file"
