"""Garbage collection of unreferenced blobs (rows, stored objects, stale staging files,
incomplete S3 uploads) and ``agora admin fsck``, which checks that every row's bytes are
there, whole and unaltered."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.engine import make_engine, make_sessionmaker
from registry.db.models import BaseModel, Blob
from registry.services.gc import blob_references, collect_garbage
from registry.storage import BlobStore, LocalBlobStore, Staging

GRACE = dt.timedelta(hours=1)


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(tmp_path / "staging")


def _put(
    session: Session, store: BlobStore, staging: Staging, data: bytes, *, age: dt.timedelta
) -> str:
    """Commit a blob and its row, both looking ``age`` old."""
    f = staging.new_file()
    with f:
        f.write(data)
    digest = f.hexdigest()
    key = store.commit(f.path, digest)
    then = dt.datetime.now(dt.UTC) - age
    assert isinstance(store, LocalBlobStore)
    os.utime(store.root / key, (then.timestamp(), then.timestamp()))
    with session.begin():
        session.add(Blob(digest=digest, size=len(data), storage_key=key, created_at=then))
    return digest


def _orphan(store: BlobStore, staging: Staging, data: bytes, *, age: dt.timedelta) -> str:
    """A committed object whose row never came (the process died between the two commits)."""
    f = staging.new_file()
    with f:
        f.write(data)
    key = store.commit(f.path, f.hexdigest())
    then = time.time() - age.total_seconds()
    assert isinstance(store, LocalBlobStore)
    os.utime(store.root / key, (then, then))
    return key


def test_references_are_found_by_walking_foreign_keys() -> None:
    names = {f"{c.table.name}.{c.name}" for c in blob_references()}
    assert {
        "base_models.config_digest",
        "base_models.tokenizer_digest",
        "base_models.weights_digest",
        "expert_versions.digest",
    } <= names


def test_gc_keeps_referenced_and_young_blobs_and_collects_the_rest(
    session: Session, store: BlobStore, staging: Staging
) -> None:
    old = 2 * GRACE
    config = _put(session, store, staging, b'{"config": 1}', age=old)
    tokenizer = _put(session, store, staging, b'{"tokenizer": 1}', age=old)
    weights = _put(session, store, staging, b"weights" * 100, age=old)
    with session.begin():
        session.add(
            BaseModel(
                revision="a" * 64,
                name="base",
                config_digest=config,
                tokenizer_digest=tokenizer,
                weights_digest=weights,
                config={},
                created_by="admin",
            )
        )
    unreferenced_old = _put(session, store, staging, b"replaced long ago" * 10, age=old)
    unreferenced_young = _put(
        session, store, staging, b"row committed a minute ago", age=GRACE / 60
    )
    orphan_old = _orphan(store, staging, b"the row never came", age=old)
    orphan_young = _orphan(store, staging, b"upload in flight", age=GRACE / 60)

    stale = staging.new_file()
    stale.write(b"a crashed upload")
    stale.close()
    then = time.time() - old.total_seconds()
    os.utime(stale.path, (then, then))
    fresh = staging.new_file()
    fresh.write(b"an upload being received")
    fresh.close()

    report = collect_garbage(session=session, store=store, staging=staging, grace=GRACE)

    with session.begin():
        rows = set(session.scalars(select(Blob.digest)))
    assert rows == {config, tokenizer, weights, unreferenced_young}
    keys = {k for k, _ in store.list_keys()}
    assert keys == {
        f"sha256/{d[:2]}/{d[2:]}" for d in (config, tokenizer, weights, unreferenced_young)
    } | {orphan_young}
    assert not any(k.endswith(unreferenced_old[2:]) for k in keys)
    assert orphan_old not in keys
    assert staging.files() == [fresh.path]
    assert report.rows_deleted == 1
    assert report.objects_deleted == 2
    assert report.bytes_freed == len(b"replaced long ago" * 10) + len(b"the row never came")
    assert report.staging_deleted == 1
    assert "1 unreferenced blob row" in str(report)

    # A second run finds nothing more to do.
    again = collect_garbage(session=session, store=store, staging=staging, grace=GRACE)
    assert (again.rows_deleted, again.objects_deleted, again.staging_deleted) == (0, 0, 0)


def test_gc_leaves_the_session_usable(session: Session, store: BlobStore, staging: Staging) -> None:
    # The collector commits its own phases; the caller's session is left out of a transaction.
    collect_garbage(session=session, store=store, staging=staging, grace=GRACE)
    assert not session.in_transaction()


def test_agora_admin_gc_removes_orphans_and_keeps_served_experts(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from agora.cli import build_app

    weights = api.expert_bytes(seed=5)
    submitted = api.submit(weights=weights)
    assert submitted.status_code == 201
    runtime = api.app.state.runtime
    store, staging = runtime.store, runtime.staging
    orphan = _orphan(store, staging, b"committed, then the process died", age=2 * GRACE)
    before = {key for key, _ in store.list_keys()}
    assert orphan in before

    settings = runtime.settings
    monkeypatch.setenv("AGORA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("AGORA_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("AGORA_BLOB_GC_GRACE_SECONDS", str(int(GRACE.total_seconds())))
    result = CliRunner().invoke(build_app(), ["admin", "gc"])

    assert result.exit_code == 0, result.output
    assert "1 stored object(s)" in result.output
    assert {key for key, _ in store.list_keys()} == before - {orphan}
    # Everything a row references is still served, bit-exact.
    expert_id = submitted.json()["id"]
    assert api.client.get(f"/v1/experts/{expert_id}/weights").content == weights
    for field in ("config", "tokenizer", "weights"):
        got = api.client.get(f"/v1/base-models/{api.base.revision}/files/{field}")
        assert got.status_code == 200


def test_gc_on_s3_judges_orphans_by_their_listed_age(
    session: Session, tmp_path: Path, s3_server: str, s3_storage_url: str
) -> None:
    from registry.storage.s3 import S3BlobStore, parse_s3_url

    bucket, prefix = parse_s3_url(s3_storage_url)
    store = S3BlobStore(bucket=bucket, prefix=prefix, endpoint_url=s3_server)
    staging = Staging(tmp_path / "staging")
    f = staging.new_file()
    with f:
        f.write(b"an S3 object whose row never came")
    key = store.commit(f.path, f.hexdigest())

    young = collect_garbage(session=session, store=store, staging=staging, grace=GRACE)
    assert young.objects_deleted == 0
    assert store.exists(key)

    # The same object, judged from two grace periods in the future.
    later = dt.datetime.now(dt.UTC) + 2 * GRACE
    old = collect_garbage(session=session, store=store, staging=staging, grace=GRACE, now=later)
    assert (old.objects_deleted, old.bytes_freed) == (1, len(b"an S3 object whose row never came"))
    assert not store.exists(key)


def test_a_row_that_never_commits_leaves_only_an_orphan_that_gc_collects(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from registry.services import experts as expert_service
    from registry.storage import blob_key

    def database_gone(**_: Any) -> None:
        raise RuntimeError("the database went away between the blob and the row")

    weights = api.expert_bytes(seed=11)
    key = blob_key(hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(expert_service, "record_version", database_gone)
    with pytest.raises(RuntimeError):
        api.submit(weights=weights)
    monkeypatch.undo()

    runtime = api.app.state.runtime
    left = api.leftovers()
    assert (left.experts, left.versions) == (0, 0), "no row names the blob"
    assert left.staging_files == []
    assert runtime.store.exists(key), "the blob was committed before the row failed"

    with runtime.sessions() as session:
        report = collect_garbage(
            session=session, store=runtime.store, staging=runtime.staging, grace=dt.timedelta(0)
        )
    assert report.objects_deleted == 1
    assert not runtime.store.exists(key)
    # The base model's blobs are referenced, so they stay; and the expert can be sent again.
    assert api.client.get(f"/v1/base-models/{api.base.revision}/files/weights").status_code == 200
    again = api.submit(weights=weights)
    assert again.status_code == 201
    assert api.client.get(f"/v1/experts/{again.json()['id']}/weights").content == weights


def test_gc_looks_again_when_an_upload_races_for_a_row(
    session: Session, store: BlobStore, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import IntegrityError

    _put(session, store, staging, b"about to be reused", age=2 * GRACE)
    real_execute = session.execute
    failures = []

    def racing_execute(statement: Any, *args: Any, **kwargs: Any) -> Any:
        if statement.is_delete and not failures:
            # What PostgreSQL answers when an upload committed a reference meanwhile.
            failures.append(statement)
            raise IntegrityError("DELETE FROM blobs", {}, Exception("fk violation"))
        return real_execute(statement, *args, **kwargs)

    monkeypatch.setattr(session, "execute", racing_execute)
    report = collect_garbage(session=session, store=store, staging=staging, grace=GRACE)
    assert len(failures) == 1
    assert report.rows_deleted == 1


def test_gc_keeps_an_object_refreshed_or_claimed_after_its_listing(
    session: Session, store: BlobStore, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing is old news by the time an object goes: an upload of the same bytes may
    have refreshed it, or recorded its row, since. Each object is looked at again."""
    refreshed = _orphan(store, staging, b"uploaded again while gc ran", age=2 * GRACE)
    claimed = _orphan(store, staging, b"its row came while gc ran", age=2 * GRACE)
    stale = _orphan(store, staging, b"nobody wants this one", age=2 * GRACE)
    listing = list(store.list_blobs())
    assert isinstance(store, LocalBlobStore)
    os.utime(store.root / refreshed)  # what BlobStore.commit does to stored bytes
    claimed_digest = claimed.replace("sha256/", "").replace("/", "")
    with session.begin():
        session.add(Blob(digest=claimed_digest, size=0, storage_key=claimed))
    monkeypatch.setattr(store, "list_blobs", lambda: iter(listing))

    report = collect_garbage(session=session, store=store, staging=staging, grace=GRACE)

    assert report.objects_deleted == 1
    assert store.exists(refreshed)
    assert store.exists(claimed)
    assert not store.exists(stale)


def test_gc_aborts_incomplete_s3_uploads_once_older_than_the_grace(
    session: Session, tmp_path: Path, s3_server: str, s3_storage_url: str
) -> None:
    from registry.storage.s3 import IncompleteUpload, S3BlobStore, parse_s3_url

    bucket, prefix = parse_s3_url(s3_storage_url)
    store = S3BlobStore(bucket=bucket, prefix=prefix, endpoint_url=s3_server)
    key = f"sha256/ab/{'c' * 62}"
    begun = store.client.create_multipart_upload(Bucket=bucket, Key=prefix + key)
    upload_id = begun["UploadId"]
    # moto reports every upload as begun in 2010; judge this one by when it really began.
    now = dt.datetime.now(dt.UTC)
    listed = [IncompleteUpload(key, upload_id, now)]
    store.incomplete_uploads = lambda: iter(listed)  # type: ignore[method-assign]
    staging = Staging(tmp_path / "staging")

    young = collect_garbage(session=session, store=store, staging=staging, grace=GRACE, now=now)
    assert young.uploads_aborted == 0
    old = collect_garbage(
        session=session, store=store, staging=staging, grace=GRACE, now=now + 2 * GRACE
    )
    assert old.uploads_aborted == 1
    uploads = store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert upload_id not in [u["UploadId"] for u in uploads]
    # Aborting an upload that is already gone is not an error.
    store.abort_upload(listed[0])


# -- agora admin fsck ----------------------------------------------------------------------


def _fsck(api: Any, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    from typer.testing import CliRunner

    from agora.cli import build_app

    settings = api.app.state.runtime.settings
    monkeypatch.setenv("AGORA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("AGORA_DATABASE_URL", settings.resolved_database_url)
    return CliRunner().invoke(build_app(), ["admin", "fsck", *args])


def test_fsck_finds_missing_truncated_and_altered_blobs_and_exits_1(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    weights = api.expert_bytes(seed=21)
    expert_id = api.submit(weights=weights).json()["id"]
    sound = _fsck(api, monkeypatch, "--json")
    assert sound.exit_code == 0, sound.output
    assert json.loads(sound.stdout)["clean"] is True
    assert json.loads(sound.stdout)["blobs_checked"] == 4

    root = api.app.state.runtime.store.root
    key = {f: f"sha256/{d[:2]}/{d[2:]}" for f, d in _base_digests(api).items()}
    (expert_key,) = [k for k in _keys(api) if k not in key.values()]
    altered = bytearray((root / expert_key).read_bytes())
    altered[-1] ^= 0xFF  # same size, one bit pattern changed
    (root / expert_key).write_bytes(bytes(altered))
    (root / key["config"]).write_bytes((root / key["config"]).read_bytes()[:-3])
    (root / key["tokenizer"]).unlink()

    found = _fsck(api, monkeypatch, "--json")
    assert found.exit_code == 1, found.output
    damaged = {d["storage_key"]: d for d in json.loads(found.stdout)["damaged"]}
    assert damaged[expert_key]["problem"] == "digest_mismatch"
    assert damaged[expert_key]["referenced_by"] == {"expert_versions.digest": 1}
    assert damaged[key["config"]]["problem"] == "size_mismatch"
    assert damaged[key["config"]]["referenced_by"] == {"base_models.config_digest": 1}
    assert damaged[key["tokenizer"]]["problem"] == "missing"
    assert key["weights"] not in damaged
    human = _fsck(api, monkeypatch)
    assert human.exit_code == 1
    assert "3 DAMAGED" in human.output
    assert f"digest_mismatch: sha256:{expert_key[7:9]}" in human.output
    # It only looks: the damage is reported, not repaired or removed.
    assert (root / expert_key).read_bytes() == bytes(altered)
    assert api.client.get(f"/v1/experts/{expert_id}").status_code == 200


def test_fsck_lists_leftovers_without_touching_them(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from registry.db.models import IdempotencyKey, Token
    from registry.services.idempotency import PENDING

    runtime = api.app.state.runtime
    orphan = _orphan(runtime.store, runtime.staging, b"the row never came", age=2 * GRACE)
    leftover = runtime.staging.new_file()
    leftover.write(b"half an upload")
    leftover.close()
    with runtime.sessions() as session, session.begin():
        token_id = session.scalars(select(Token.id)).first()
        session.add(
            IdempotencyKey(
                token_id=token_id,
                key="never-finished",
                method="POST",
                path="/v1/experts",
                fingerprint="f" * 64,
                status_code=PENDING,
                response_body={},
            )
        )

    result = _fsck(api, monkeypatch, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["clean"] is True
    assert [o["name"] for o in found["orphans"]] == [orphan]
    assert found["orphans"][0]["age_seconds"] > GRACE.total_seconds()
    assert [s["name"] for s in found["staging"]] == [str(leftover.path)]
    assert [k["name"] for k in found["pending_keys"]] == [f"token #{token_id}: never-finished"]
    assert runtime.store.exists(orphan)
    assert leftover.path.exists()


def _base_digests(api: Any) -> dict[str, str]:
    files = api.client.get(f"/v1/base-models/{api.base.revision}").json()["files"]
    return {field: f["digest"].removeprefix("sha256:") for field, f in files.items()}


def _keys(api: Any) -> list[str]:
    return [key for key, _ in api.app.state.runtime.store.list_keys()]
