"""Crash consistency: SIGKILL at every step of a write, then nothing points at lost bytes.

The server is killed by its own crash points (registry/faults.py) at each step of an
expert upload and of a job completion, ``K`` times each (``scaled``: 1 in CI). After each
kill, with the server down, ``agora admin fsck`` must find no row naming missing or
altered bytes; the next server start removes the dead upload's staging files. At the
end, ``agora admin gc`` deletes the orphan blobs the kills left once they are older than
its grace (not before), and every killed request, retried as a client would (same
Idempotency-Key, same fencing token), succeeds and serves its bytes bit-exact.

An S3 server that goes away mid-upload gives 503 problem+json ``storage_unavailable``
with ``Retry-After`` and leaves nothing half-written: no row, no object, no staging file,
no held Idempotency-Key; a multipart upload it could not abort is aborted by gc.

Servers are forked from a zygote that imported the registry once
(tests/helpers/crash_server.py), so a restart costs the app's start-up only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.adversarial import report, scaled
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from helpers.crash_server import Zygote
from helpers.processes import base_env, free_port
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from registry import faults
from registry.errors import ServiceUnavailable
from registry.services.fsck import FsckReport, check_storage
from registry.services.gc import collect_garbage
from registry.services.tokens import create_token
from registry.storage import LocalBlobStore, Staging
from registry.storage.s3 import S3BlobStore

BASE_FIELDS = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "weights": "model.safetensors",
}
LEASE_SECONDS = 600


@dataclass
class Site:
    """One registry's data, the zygote that serves it, and the test's tokens."""

    database_url: str
    data_dir: Path
    zygote: Zygote
    port: int
    pid: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    revision: str = ""
    schema: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, crash_at: str | None = None) -> dict[str, str]:
        env = {
            "AGORA_DATA_DIR": str(self.data_dir),
            "AGORA_DATABASE_URL": self.database_url,
            "AGORA_AUTO_MIGRATE": "true",
            "AGORA_EMBEDDER": "hashing",
            # A killed request's Idempotency-Key is taken over by its retry after this.
            "AGORA_IDEMPOTENCY_RESERVATION_SECONDS": "1",
            "AGORA_RATE_LIMIT_TOKEN_PER_SECOND": "0",
            "AGORA_RATE_LIMIT_ANONYMOUS_PER_SECOND": "0",
        }
        if crash_at is not None:
            env[faults.ENV] = crash_at
        return env

    def start(self, crash_at: str | None = None) -> None:
        self.pid = self.zygote.start(self.port, self.env(crash_at))

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def admin(self, *args: str, monkeypatch: pytest.MonkeyPatch) -> Any:
        """`agora admin ...` on this site's data, in this process (as an operator runs it)."""
        from agora.cli import build_app

        with monkeypatch.context() as m:
            for name, value in self.env().items():
                m.setenv(name, value)
            return CliRunner().invoke(build_app(), ["admin", *args])

    def fsck(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        """`agora admin fsck --json`; its exit status agrees with what it found."""
        result = self.admin("fsck", "--json", monkeypatch=monkeypatch)
        assert result.exit_code in (0, 1), result.output
        found: dict[str, Any] = json.loads(result.stdout)
        assert (result.exit_code == 0) == found["clean"]
        return found

    def check(self) -> FsckReport:
        """What `agora admin fsck` checks, called directly (no CLI start-up)."""
        engine = create_engine(self.database_url)
        try:
            with Session(engine) as session:
                return check_storage(
                    session=session,
                    store=LocalBlobStore(self.data_dir / "blobs"),
                    staging=Staging(self.data_dir / "staging"),
                )
        finally:
            engine.dispose()


@pytest.fixture
def site(database_url: str, tmp_path: Path) -> Iterator[Site]:
    zygote = Zygote(base_env(OPENBLAS_NUM_THREADS="1"), tmp_path / "logs")
    try:
        yield Site(database_url, tmp_path / "data", zygote, free_port())
    finally:
        zygote.close()


def _setup(site: Site) -> tuple[str, str]:
    """Tokens, a base model and two experts (the parents of the averages); their ids."""
    engine = create_engine(site.database_url)
    try:
        with Session(engine) as session, session.begin():
            for name, role in [("admin", "admin"), ("alice", "contributor"), ("w", "worker")]:
                kwargs = {"trusted": True} if role == "worker" else {}
                site.tokens[name] = create_token(session=session, name=name, role=role, **kwargs)[1]
    finally:
        engine.dispose()
    files = make_base_files()
    with site.http(site.tokens["admin"]) as client:
        response = client.post(
            "/v1/base-models",
            files={f: (name, files[name]) for f, name in BASE_FIELDS.items()},
        )
    assert response.status_code == 201, response.text
    site.revision = response.json()["revision"]
    site.schema = response.json()["expert_schema"]
    parents = []
    for seed in (1, 2):
        answer = _submit(site, _expert(site, seed), key=None)
        assert answer.status_code == 201, answer.text
        parents.append(answer.json()["id"])
    return parents[0], parents[1]


def _expert(site: Site, seed: int) -> bytes:
    return make_expert_bytes(site.schema, base_revision=site.revision, seed=seed)


def _submit(site: Site, weights: bytes, *, key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    with site.http(site.tokens["alice"]) as client:
        return client.post(
            "/v1/experts",
            files={
                "weights": ("e.safetensors", weights),
                "datasheet": ("DATASHEET.md", make_datasheet(name=f"crash {key}")),
            },
            data={"base_revision": site.revision},
            headers=headers,
        )


def _lease_average(site: Site, parents: tuple[str, str]) -> dict[str, Any]:
    with site.http(site.tokens["alice"]) as client:
        queued = client.post(
            "/v1/compositions",
            json={
                "base_revision": site.revision,
                "method": "average",
                "experts": list(parents),
                "weights": [3, 1],
                "params": {"merge": "weighted"},
            },
        )
    assert queued.status_code == 202, queued.text
    with site.http(site.tokens["w"]) as client:
        leased = client.post(
            "/v1/jobs/lease",
            json={
                "worker": "crash-test",
                "kinds": ["compose.average"],
                "lease_seconds": LEASE_SECONDS,
            },
        )
    assert leased.status_code == 200, leased.text
    job: dict[str, Any] = leased.json()["job"]
    assert job["id"] == queued.json()["job_id"]
    return job


def _complete(site: Site, job: dict[str, Any], weights: bytes) -> httpx.Response:
    with site.http(site.tokens["w"]) as client:
        return client.post(
            f"/v1/jobs/{job['id']}/complete",
            data={
                "fencing_token": str(job["fencing_token"]),
                "result": json.dumps({"weights": [0.75, 0.25]}),
            },
            files={"weights": ("merged.safetensors", weights)},
        )


def test_crash_points_are_silent_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert faults.parse("upload.after_staging") == ("upload.after_staging", 1)
    assert faults.parse(" complete.after_row_commit , 3 ") == ("complete.after_row_commit", 3)
    for bad in ("nowhere", "upload.after_staging,0", "upload.after_staging,x"):
        with pytest.raises(ValueError):
            faults.parse(bad)
    monkeypatch.delenv(faults.ENV, raising=False)
    for point in faults.POINTS:
        faults.crash_point(point)  # unset: this process lives on
    monkeypatch.setenv(faults.ENV, "upload.after_validation")
    faults.crash_point("upload.after_staging")  # another point: lives on


def test_sigkill_at_every_crash_point_leaves_no_row_without_its_bytes(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = scaled(1, 5)
    plan = [point for point in faults.POINTS for _ in range(k)]
    # The first server also serves the setup, whose two uploads pass the first (upload)
    # crash point: it crashes on the third pass.
    assert plan[0] in faults.UPLOAD_POINTS
    site.start(crash_at=f"{plan[0]},3")
    parents = _setup(site)
    uploads: list[tuple[str, str, bytes]] = []  # (point, key, weights)
    completions: list[tuple[str, dict[str, Any], bytes]] = []  # (point, job, weights)
    kills: Counter[str] = Counter()
    staging_while_down = 0
    for n, point in enumerate(plan):
        weights = _expert(site, seed=100 + n)
        if point in faults.UPLOAD_POINTS:
            key = f"crash-{n}"
            with pytest.raises(httpx.TransportError):
                _submit(site, weights, key=key)
            uploads.append((point, key, weights))
        else:
            job = _lease_average(site, parents)
            with pytest.raises(httpx.TransportError):
                _complete(site, job, weights)
            completions.append((point, job, weights))
        assert site.zygote.wait(site.pid) == {"signal": 9}, f"{point}: not killed there"
        kills[point] += 1

        # Down: no row names missing or altered bytes, whatever step it died at.
        down = site.check()
        assert down.clean, str(down)
        staging_while_down += len(down.staging)
        # Up again, armed for the next crash point (or not at all). Each start removes
        # the staging files of the upload killed before it.
        site.start(crash_at=plan[n + 1] if n + 1 < len(plan) else None)

    found = site.fsck(monkeypatch)
    assert found["clean"], found["damaged"]
    assert found["staging"] == []
    # The blob was committed and its rows were not: one orphan per such kill.
    leaves_orphan = {
        "upload.after_blob_commit",
        "upload.in_row_transaction",
        "complete.after_blob_commit",
        "complete.in_row_transaction",
    }
    assert len(found["orphans"]) == k * len(leaves_orphan)
    # Killed before the rows committed: their Idempotency-Key is still reserved.
    assert len(found["pending_keys"]) == k * (len(faults.UPLOAD_POINTS) - 1)

    # gc keeps orphans younger than its grace, and deletes them after it.
    kept = site.admin("gc", monkeypatch=monkeypatch)
    assert kept.exit_code == 0, kept.output
    assert "0 stored object(s)" in kept.output
    collected = site.admin("gc", "--grace-seconds", "0", monkeypatch=monkeypatch)
    assert collected.exit_code == 0, collected.output
    assert f"{k * len(leaves_orphan)} stored object(s)" in collected.output
    after_gc = site.check()
    assert after_gc.clean
    assert after_gc.orphans == []

    # Every killed request, retried as a client would, succeeds and serves its bytes.
    with site.http(site.tokens["w"]) as reader:
        for point, key, weights in uploads:
            retried = _submit(site, weights, key=key)
            assert retried.status_code == 201, f"{point}: {retried.text}"
            body = retried.json()
            assert body["digest"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"
            got = reader.get(f"/v1/experts/{body['id']}/weights")
            assert got.content == weights, point
        for point, job, weights in completions:
            retried = _complete(site, job, weights)
            assert retried.status_code == 200, f"{point}: {retried.text}"
            assert retried.json()["status"] == "succeeded"
            output = retried.json()["result"]["expert_id"]
            got = reader.get(f"/v1/experts/{output}/weights")
            assert got.status_code == 200, f"{point}: {got.text}"
            assert got.content == weights, point

    final = site.fsck(monkeypatch)
    assert final["clean"]
    assert (final["orphans"], final["staging"], final["pending_keys"]) == ([], [], [])
    report(
        "crash consistency",
        backend="postgresql" if site.database_url.startswith("postgresql") else "sqlite",
        points=len(faults.POINTS),
        kills_per_point=k,
        kills=sum(kills.values()),
        damaged_rows=0,
        staging_files_while_down=staging_while_down,
        staging_files_after_restart=0,
        orphans_before_gc=len(found["orphans"]),
        orphans_after_gc=0,
        retries_succeeded=len(uploads) + len(completions),
    )


# -- S3 gone mid-upload -------------------------------------------------------------------

S3_MULTIPART_PART = 5 * 1024 * 1024  # S3's smallest part


@dataclass
class FlakyS3:
    """moto's S3 server on a fixed loopback port, stopped and started again at will (its
    objects live in this process, so they survive a stop)."""

    port: int
    bucket: str
    server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def store(self, **options: Any) -> S3BlobStore:
        # One attempt per request: the test need not sit through boto3's backoff.
        return S3BlobStore(bucket=self.bucket, endpoint_url=self.url, max_attempts=1, **options)

    def objects(self) -> list[str]:
        return [blob.key for blob in self.store().list_blobs()]


@pytest.fixture
def flaky_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyS3]:
    import boto3
    from s3_fixture import S3_ENV

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    s3 = FlakyS3(free_port(), f"agora-flaky-{uuid.uuid4().hex[:12]}")
    s3.start()
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        s3.stop()


def _stop_on_first(s3: FlakyS3, store: S3BlobStore, event: str) -> list[str]:
    """Stop the S3 server when ``event`` first fires on ``store``'s client."""
    seen: list[str] = []

    def stop(**_: Any) -> None:
        if not seen:
            seen.append(event)
            s3.stop()

    store.client.meta.events.register(event, stop)
    return seen


def test_s3_gone_mid_upload_is_503_and_leaves_nothing_half_written(
    database_url: str, tmp_path: Path, flaky_s3: FlakyS3
) -> None:
    from fastapi.testclient import TestClient

    from registry.app import create_app
    from registry.db.models import Blob, Expert, IdempotencyKey
    from registry.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        storage_url=f"s3://{flaky_s3.bucket}",
        s3_endpoint_url=flaky_s3.url,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        runtime = app.state.runtime
        runtime.store = flaky_s3.store()
        with runtime.sessions() as session, session.begin():
            admin = create_token(session=session, name="admin", role="admin")[1]
            alice = create_token(session=session, name="alice", role="contributor")[1]
        files = make_base_files()
        base = client.post(
            "/v1/base-models",
            files={f: (name, files[name]) for f, name in BASE_FIELDS.items()},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert base.status_code == 201, base.text
        stored_before = sorted(flaky_s3.objects())
        body = base.json()
        weights = make_expert_bytes(body["expert_schema"], base_revision=body["revision"], seed=3)

        def upload() -> Any:
            return client.post(
                "/v1/experts",
                files={
                    "weights": ("e.safetensors", weights),
                    "datasheet": ("DATASHEET.md", make_datasheet(name="s3 gone")),
                },
                data={"base_revision": body["revision"]},
                headers={"Authorization": f"Bearer {alice}", "Idempotency-Key": "s3-gone"},
            )

        fired = _stop_on_first(flaky_s3, runtime.store, "before-send.s3.PutObject")
        gone = upload()
        assert fired, "the upload never reached S3"
        assert gone.status_code == 503, gone.text
        assert gone.headers["content-type"].startswith("application/problem+json")
        assert gone.json()["code"] == "storage_unavailable"
        assert int(gone.headers["retry-after"]) > 0

        # Nothing half-written: no row, no staging file, no held key, no object.
        with runtime.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Expert)) == 0
            assert session.scalar(select(func.count()).select_from(Blob)) == 3
            assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
        assert runtime.staging.files() == []
        flaky_s3.start()
        assert sorted(flaky_s3.objects()) == stored_before

        # S3 is back: the retry, with the same key, is applied and served bit-exact.
        again = upload()
        assert again.status_code == 201, again.text
        expert_id = again.json()["id"]
        assert client.get(f"/v1/experts/{expert_id}/weights").content == weights
        with runtime.sessions() as session:
            found = check_storage(session=session, store=runtime.store, staging=runtime.staging)
        assert found.clean
        assert found.orphans == []
    report(
        "S3 gone mid-upload",
        backend="postgresql" if database_url.startswith("postgresql") else "sqlite",
        status=gone.status_code,
        code=gone.json()["code"],
        rows_left=0,
        objects_left=0,
        staging_left=0,
        retry_status=again.status_code,
    )


def test_s3_gone_mid_multipart_upload_leaves_no_object_and_gc_aborts_its_parts(
    database_url: str, tmp_path: Path, flaky_s3: FlakyS3
) -> None:
    store = flaky_s3.store(
        multipart_threshold=S3_MULTIPART_PART,
        multipart_chunksize=S3_MULTIPART_PART,
        max_concurrency=1,
    )
    staging = Staging(tmp_path / "staging")
    data = b"".join(
        hashlib.sha256(b"%d" % i).digest() for i in range(2 * S3_MULTIPART_PART // 32 + 7)
    )
    assert len(data) > 2 * S3_MULTIPART_PART

    def staged() -> Any:
        f = staging.new_file()
        with f:
            f.write(data)
        return f

    first = staged()
    fired = _stop_on_first(flaky_s3, store, "after-call.s3.UploadPart")
    with pytest.raises(ServiceUnavailable) as refused:
        store.commit(first.path, first.hexdigest())
    assert fired, "S3 was not stopped after the first part"
    assert refused.value.code == "storage_unavailable"
    assert not first.path.exists(), "the staging file is removed whatever happened"

    flaky_s3.start()
    assert flaky_s3.objects() == [], "no object, not even a partial one"
    parts_left = list(store.incomplete_uploads())
    assert len(parts_left) == 1, "the abort could not reach S3: its parts are still there"

    # (moto reports every multipart upload as initiated in 2010, so the grace period's
    # part is tested in tests/registry/test_gc.py.)
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            old = collect_garbage(
                session=session, store=store, staging=staging, grace=dt.timedelta(hours=1)
            )
    finally:
        engine.dispose()
    assert old.uploads_aborted == 1
    assert "aborted 1 incomplete S3 upload" in str(old)
    assert list(store.incomplete_uploads()) == []

    second = staged()
    key = store.commit(second.path, second.hexdigest())
    assert store.size(key) == len(data)
    assert hashlib.sha256(b"".join(store.iter_range(key))).hexdigest() == second.hexdigest()
    report(
        "S3 gone mid-multipart-upload",
        backend="postgresql" if database_url.startswith("postgresql") else "sqlite",
        objects_left=0,
        incomplete_uploads_left=len(parts_left),
        aborted_by_gc=old.uploads_aborted,
    )
