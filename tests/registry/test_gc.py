"""Garbage collection of unreferenced blobs: rows, stored objects and stale staging files."""

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
