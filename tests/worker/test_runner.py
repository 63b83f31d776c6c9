"""The worker loop against the real registry app (in-process, SQLite and PostgreSQL).

The registry runs as the FastAPI app behind Starlette's TestClient transport; the worker
uses the real SDK over it. Artifacts are random tiny modelcore files (tests/worker/conftest.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.artifacts import make_datasheet
from helpers.in_process import in_process_agora

from registry.client import Agora, CompositionWarning
from worker import runner as runner_mod
from worker.handlers import KINDS, JobCancelled, Outcome
from worker.runner import Worker, expand_kinds


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    from registry.app import create_app
    from registry.settings import Settings

    settings = Settings(data_dir=tmp_path / "agora", database_url=database_url)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def tokens(client: TestClient) -> dict[str, str]:
    from registry.services.tokens import create_token

    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    secrets: dict[str, str] = {}
    with runtime.sessions() as session, session.begin():
        for name, role in [
            ("admin", "admin"),
            ("alice", "contributor"),
            ("moderator", "moderator"),
            ("worker", "worker"),
        ]:
            # The operator's own worker: trusted, so what it produces goes active unchecked
            # (tests/adversarial/test_lying_workers.py covers untrusted ones).
            _, secrets[name] = create_token(
                session=session, name=name, role=role, trusted=role == "worker"
            )
    return secrets


@pytest.fixture
def make_agora(client: TestClient, tmp_path: Path) -> Iterator[Callable[..., Agora]]:
    made: list[Agora] = []

    def factory(token: str, **kwargs: Any) -> Agora:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        agora = in_process_agora(client, token, **kwargs)
        made.append(agora)
        return agora

    yield factory
    for agora in made:
        agora.close()


SHEETS = {
    "a": ("Python snippets", "Small Python functions.", ["def add(a, b): return a + b"]),
    "b": ("Pangrams", "English pangram sentences.", ["The quick brown fox jumps."]),
    "c": ("SQL", "SQL queries over user tables.", ["SELECT name FROM users;"]),
}


@pytest.fixture
def world(make_agora, tokens, tiny, tmp_path: Path) -> dict[str, Any]:
    admin = make_agora(tokens["admin"])
    base = tiny["base"]
    admin.upload_base_model(
        base / "config.json", base / "tokenizer.json", base / "model.safetensors"
    )
    alice = make_agora(tokens["alice"])
    experts = {}
    for name in "abc":
        title, domain, samples = SHEETS[name]
        sheet = make_datasheet(name=title, domain=domain, samples=samples).decode()
        experts[name] = alice.submit_expert(tiny["experts"][name], sheet, tiny["revision"])
    worker_sdk = make_agora(tokens["worker"], cache_dir=tmp_path / "worker-cache")
    return {
        "alice": alice,
        "admin": admin,
        "moderator": make_agora(tokens["moderator"]),
        "worker": worker_sdk,
        "experts": experts,
        "revision": tiny["revision"],
    }


def _worker(world: dict[str, Any], **kwargs: Any) -> Worker:
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("lease_seconds", 30)
    return Worker(world["worker"], name="w-test", device="cpu", **kwargs)


def test_compositions_are_computed_and_load_through_the_sdk(world, tiny, texts) -> None:
    alice, ids = world["alice"], [world["experts"][n].id for n in "ab"]
    ensemble = alice.compose("ensemble", base_revision=tiny["revision"], experts=ids, texts=texts)
    mixture = alice.compose("mixture", base_revision=tiny["revision"], experts=ids, texts=texts)
    worker = _worker(world, max_jobs=2)
    assert worker.run() == 2
    assert worker.outcomes == ["succeeded", "succeeded"]

    composition = ensemble.wait(timeout=5)
    manifest = composition.manifest
    assert manifest is not None
    # The base is a path by default, and the manifest says so with the base's share of
    # the prior the worker estimated (the experts' and the base's sum to 1).
    assert manifest.with_base is True
    assert manifest.params["with_base"] is True
    weights = [e.weight for e in manifest.experts]
    assert manifest.base_weight is not None
    assert sum(weights) + manifest.base_weight == pytest.approx(1.0)
    model = alice.load_composed(composition)
    assert model.ensemble is not None
    assert model.ensemble.n_paths == 3
    got = model.bits_per_byte(texts)["bits_per_byte"]
    assert manifest.metrics["bits_per_byte"] == pytest.approx(got, rel=1e-5)
    assert manifest.metrics["bytes"] == sum(len(t.encode()) for t in texts)

    mixed = mixture.wait(timeout=5)
    assert mixed.manifest.metrics["bits_per_byte"] == pytest.approx(
        alice.load_composed(mixed).bits_per_byte(texts)["bits_per_byte"]
    )
    # The worker kept its base in memory for the second job: one bundle on disk, loaded once.
    assert list((world["worker"].cache.root / "bases").iterdir()) == [
        world["worker"].cache.root / "bases" / tiny["revision"]
    ]


def test_ensemble_without_base_and_its_evaluation_against_the_base(world, tiny, texts) -> None:
    alice, ids = world["alice"], [world["experts"][n].id for n in "ab"]
    handle = alice.compose(
        "ensemble", base_revision=tiny["revision"], experts=ids, texts=texts, with_base=False
    )
    assert _worker(world, max_jobs=1).run() == 1
    composition = handle.wait(timeout=5)
    manifest = composition.manifest
    assert manifest is not None
    assert (manifest.with_base, manifest.base_weight) == (False, None)
    assert sum(e.weight or 0.0 for e in manifest.experts) == pytest.approx(1.0)
    model = alice.load_composed(composition)
    assert model.ensemble is not None
    assert model.ensemble.n_paths == 2
    assert manifest.metrics["bits_per_byte"] == pytest.approx(
        model.bits_per_byte(texts)["bits_per_byte"], rel=1e-5
    )
    scores = alice.evaluate({"code": texts[:1]}, composition_id=composition.id)
    assert _worker(world, max_jobs=1, kinds=["evaluate"]).run() == 1
    score = scores.wait(timeout=5)["code"]
    assert score.bits_per_byte == pytest.approx(
        model.bits_per_byte(texts[:1])["bits_per_byte"], rel=1e-5
    )
    assert score.base_bits_per_byte is not None
    want = (score.bits_per_byte - score.base_bits_per_byte) / score.base_bits_per_byte
    assert score.delta_vs_base == pytest.approx(want)
    (stored,) = alice.list_evaluations(composition_id=composition.id)
    assert stored.delta_vs_base == pytest.approx(want)


def test_average_uploads_a_new_expert_with_lineage(world, tiny, texts) -> None:
    alice, a, b = world["alice"], world["experts"]["a"], world["experts"]["b"]
    with pytest.warns(CompositionWarning, match="average_may_harm"):  # and is still served
        handle = alice.compose(
            "average",
            base_revision=tiny["revision"],
            experts=[a.id, b.id],
            texts=texts,
            params={"merge": "uniform"},
        )
    assert _worker(world, max_jobs=1).run() == 1
    composition = handle.wait(timeout=5)
    assert composition.expert_id is not None
    new = alice.get_expert(composition.expert_id)
    sheet = alice.get_datasheet(new.id)
    assert a.id in sheet
    assert b.id in sheet
    path = alice.download(new.id)
    from modelcore.experts import load_expert

    tensors, _ = load_expert(path)
    ta, _ = load_expert(tiny["experts"]["a"])
    tb, _ = load_expert(tiny["experts"]["b"])
    name = next(iter(ta))
    assert tensors[name].allclose((ta[name] + tb[name]) / 2, atol=1e-6)


def test_evaluation_results_are_stored_per_expert(world, texts) -> None:
    alice, b = world["alice"], world["experts"]["b"]
    handle = alice.evaluate({"code": texts[:1], "prose": texts[1:2]}, expert_id=b.id)
    worker = _worker(world, max_jobs=1, kinds=["evaluate"])
    assert worker.run() == 1
    handle.wait(timeout=5)
    rows = {e.text_set: e for e in alice.list_evaluations(expert_id=b.id)}
    assert set(rows) == {"code", "prose"}
    assert rows["code"].bytes == len(texts[0].encode())
    assert rows["prose"].bits_per_byte != rows["prose"].base_bits_per_byte


def test_kinds_filter_leaves_other_jobs_queued(world, tiny, texts) -> None:
    alice = world["alice"]
    handle = alice.compose(
        "mixture", base_revision=tiny["revision"], experts=[world["experts"]["a"].id], texts=texts
    )
    worker = _worker(world, kinds=["evaluate"])
    stopper = threading.Timer(0.5, worker.request_stop)
    stopper.start()
    assert worker.run() == 0
    assert alice.get_job(handle.job_id).status == "queued"


def test_a_disabled_expert_cancels_its_queued_job_before_any_worker_leases_it(
    world, tiny, texts
) -> None:
    # A disable is total at once (docs/governance.md): the queued job that uses the expert
    # is cancelled in the disable's transaction, so no worker spends a lease on a 451.
    alice, a, b = world["alice"], world["experts"]["a"], world["experts"]["b"]
    handle = alice.compose("mixture", base_revision=tiny["revision"], experts=[a.id], texts=texts)
    other = alice.compose("mixture", base_revision=tiny["revision"], experts=[b.id], texts=texts)
    world["moderator"].disable_expert(a.id, "license problem")
    job = alice.get_job(handle.job_id)
    assert job.status == "cancelled"
    assert "disabled" in (job.error or "")
    worker = _worker(world, max_jobs=1)
    worker.run()
    assert worker.outcomes == ["succeeded"]  # the other job, not the cancelled one
    assert alice.get_job(other.job_id).status == "succeeded"
    assert alice.get_job(handle.job_id).status == "cancelled"


def test_an_unexpected_error_is_retried(world, tiny, texts, monkeypatch) -> None:
    def boom(*args: Any) -> Outcome:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(runner_mod, "run_job", boom)
    alice = world["alice"]
    handle = alice.compose(
        "mixture", base_revision=tiny["revision"], experts=[world["experts"]["a"].id], texts=texts
    )
    worker = _worker(world, max_jobs=1)
    worker.run()
    assert worker.outcomes == ["retry"]
    job = alice.get_job(handle.job_id)
    assert job.status == "queued"
    assert job.attempts == 1
    assert "out of memory" in (job.error or "")


def test_second_stop_releases_the_running_job(world, tiny, texts, monkeypatch) -> None:
    """First SIGTERM: finish the job. Second: hand it back now, attempt not counted."""
    started = threading.Event()

    def slow(kind: str, payload: Any, inputs: Any, ctx: Any) -> Outcome:
        started.set()
        while True:
            ctx.check()
            time.sleep(0.01)

    monkeypatch.setattr(runner_mod, "run_job", slow)
    alice = world["alice"]
    handle = alice.compose(
        "mixture", base_revision=tiny["revision"], experts=[world["experts"]["a"].id], texts=texts
    )
    worker = _worker(world)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.request_stop()
    time.sleep(0.2)
    assert thread.is_alive()  # the first stop lets the job finish
    worker.request_release()
    thread.join(10)
    assert not thread.is_alive()
    assert worker.outcomes == ["released"]
    job = alice.get_job(handle.job_id)
    assert job.status == "queued"
    assert job.attempts == 0


def test_first_stop_finishes_the_running_job(world, tiny, texts, monkeypatch) -> None:
    started = threading.Event()
    real = runner_mod.run_job

    def gated(kind: str, payload: Any, inputs: Any, ctx: Any) -> Outcome:
        started.set()
        time.sleep(0.3)
        return real(kind, payload, inputs, ctx)

    monkeypatch.setattr(runner_mod, "run_job", gated)
    alice = world["alice"]
    handle = alice.compose(
        "mixture", base_revision=tiny["revision"], experts=[world["experts"]["a"].id], texts=texts
    )
    worker = _worker(world)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.request_stop()
    thread.join(20)
    assert worker.outcomes == ["succeeded"]
    assert alice.get_job(handle.job_id).status == "succeeded"


def test_a_lost_lease_stops_the_work_and_completes_nothing(world, tiny, texts, monkeypatch) -> None:
    """The lease expires while the worker is busy (its heartbeats cannot get through);
    another worker leases the job; the first one notices at its next heartbeat and stops."""
    cancelled = threading.Event()
    heartbeats_blocked = threading.Event()
    heartbeats_blocked.set()

    def stuck(kind: str, payload: Any, inputs: Any, ctx: Any) -> Outcome:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ctx.check()
            except JobCancelled:
                cancelled.set()
                raise
            time.sleep(0.02)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(runner_mod, "run_job", stuck)
    real_heartbeat = world["worker"].heartbeat_job

    def heartbeat(job_id: str, token: int, progress: Any = None) -> Any:
        if heartbeats_blocked.is_set():
            from registry.client import TransportError

            raise TransportError("network down (simulated)")
        return real_heartbeat(job_id, token, progress)

    monkeypatch.setattr(world["worker"], "heartbeat_job", heartbeat)
    alice = world["alice"]
    handle = alice.compose(
        "mixture", base_revision=tiny["revision"], experts=[world["experts"]["a"].id], texts=texts
    )
    first = _worker(world, lease_seconds=2)
    thread = threading.Thread(
        target=first.run_job, args=(world["worker"].lease_job("w1", lease_seconds=2),)
    )
    thread.start()
    time.sleep(2.5)  # the lease (2 s) expires
    other = world["admin"].lease_job("w2", lease_seconds=60)
    assert other is not None
    assert other.id == handle.job_id
    heartbeats_blocked.clear()  # the network is back: the next heartbeat hears lease_lost
    thread.join(10)
    assert cancelled.is_set()
    assert first.outcomes == ["lease_lost"]
    job = alice.get_job(handle.job_id)
    assert job.status == "leased"
    assert job.lease_owner == "w2"


def test_leasing_retries_while_the_registry_is_unreachable(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(runner_mod, "BACKOFF_START_S", 0.01)
    calls: list[str] = []
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        bodies.append(json.loads(request.content))
        if len(calls) <= 3:
            raise httpx.ConnectError("connection refused")
        if len(calls) == 4:
            return httpx.Response(503, json={"code": "service_unavailable", "title": "starting"})
        return httpx.Response(204)

    agora = Agora(
        "http://registry.invalid",
        token="t",
        transport=httpx.MockTransport(handler),
        max_retries=0,
        cache_dir=tmp_path,
    )
    worker = Worker(agora, name="w", poll_interval=0.01)
    threading.Timer(1.0, worker.request_stop).start()
    assert worker.run() == 0
    assert len(calls) >= 6  # three refusals and a 503, then empty-queue polls
    assert set(calls) == {"/v1/jobs/lease"}
    # The worker names the kinds it can run (a newer registry's kinds stay queued for others).
    assert bodies[-1] == {"worker": "w", "kinds": list(KINDS), "lease_seconds": 60.0}


def test_expand_kinds() -> None:
    assert expand_kinds(None) is None
    assert expand_kinds(["compose"]) == [
        "compose.mixture",
        "compose.ensemble",
        "compose.average",
        "compose.distill",
    ]
    assert expand_kinds(["evaluate,compose.ensemble", "evaluate"]) == [
        "evaluate",
        "compose.ensemble",
    ]
    with pytest.raises(ValueError, match="unknown job kind"):
        expand_kinds(["compose.soup"])


def test_distill_uploads_the_student_and_reports_progress(world, tiny, texts) -> None:
    alice, a, b = world["alice"], world["experts"]["a"], world["experts"]["b"]
    params = {"steps": 3, "lr": 0.01, "seq_len": 16, "batch_size": 2, "seed": 0}
    handle = alice.compose(
        "distill", base_revision=tiny["revision"], experts=[a.id, b.id], texts=texts, params=params
    )
    worker = _worker(world, max_jobs=1)
    assert worker.run() == 1
    assert worker.outcomes == ["succeeded"]
    composition = handle.wait(timeout=5)
    job = alice.get_job(handle.job_id)
    assert job.result is not None
    assert len(job.result["details"]["kl_curve"]) == 3
    from modelcore.artifacts import load_base
    from modelcore.experts import load_expert

    student = alice.download(composition.expert_id)
    _, meta = load_expert(student, config=load_base(tiny["base"]).config)
    assert meta["base_revision"] == tiny["revision"]
    model = alice.load_composed(composition)
    assert composition.manifest.metrics["bits_per_byte"] == pytest.approx(
        model.bits_per_byte(texts)["bits_per_byte"], rel=1e-5
    )
    # The teacher had the base as a path: the lineage's weights are the experts' shares.
    assert job.result["details"]["with_base"] is True
    assert composition.manifest.params["with_base"] is True
    shares = [e.weight for e in composition.manifest.experts]
    assert sum(shares) + job.result["base_weight"] == pytest.approx(1.0)
