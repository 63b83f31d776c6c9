"""Fault tests of jobs with real processes: `agora serve` and `agora worker` subprocesses.

What issue 7 promises and these tests check, through the HTTP API and the database:

* with 3 workers and 50 jobs, every job succeeds exactly once: one ``job_results`` row
  (its primary key is the job id) and one evaluation row per job;
* a worker SIGKILLed mid-job, 10 times at random points, loses no job and applies none
  twice (the killed lease expires, another lease finishes the job with a newer token);
* SIGTERM mid-job: the worker finishes the job and exits; a second SIGTERM hands the job
  back at once (queued, attempt not counted) and the next worker computes it;
* a stale worker's heartbeat, completion and failure are refused with 409 ``lease_lost``,
  and the job keeps the result of the lease that holds it;
* a poison job ends ``dead`` after its attempts while the other jobs keep succeeding;
* a composition naming an unknown or a disabled expert is refused with problem+json and
  leaves no job behind.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.artifacts import make_base_files, make_datasheet, write_expert
from helpers.processes import (
    Process,
    Processes,
    Published,
    Registry,
    Trained,
    start_worker,
    wait_until,
)

from registry.client import Agora
from registry.client.errors import LeaseLost

FINAL = ("succeeded", "failed", "dead")
# Short texts: the jobs are cheap, the machinery around them is what is tested.
SHORT_TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy."


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    return dict(body)


def _submit_evaluation(
    http: httpx.Client, expert_id: str, texts: list[str], name: str = "sample"
) -> str:
    response = http.post(
        "/v1/evaluations", json={"expert_id": expert_id, "text_sets": {name: texts}}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _jobs(registry: Registry, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = registry.query("SELECT id, status, attempts, fencing_token, error FROM jobs")
    wanted = set(ids)
    return {r["id"]: r for r in rows if r["id"] in wanted}


def _wait_final(
    registry: Registry, ids: list[str], timeout: float, workers: list[Process]
) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        for w in workers:
            assert w.alive(), f"worker {w.name} exited with {w.returncode()}:\n{w.log()}"
        jobs = _jobs(registry, ids)
        assert len(jobs) == len(set(ids)), "a submitted job is missing from the jobs table"
        return jobs if all(j["status"] in FINAL for j in jobs.values()) else None

    def pending() -> str:
        jobs = _jobs(registry, ids)
        left = sorted({j["status"] for j in jobs.values() if j["status"] not in FINAL})
        n = sum(1 for j in jobs.values() if j["status"] not in FINAL)
        return f"{len(ids)} jobs to end ({n} still {left})"

    result: dict[str, dict[str, Any]] = wait_until(
        done, timeout=timeout, interval=0.3, message=pending
    )
    return result


def _assert_each_applied_once(registry: Registry, ids: list[str], text_sets: int = 1) -> None:
    """One job_results row and ``text_sets`` evaluation rows per job, no more, no less."""
    from sqlalchemy import create_engine, inspect

    # The database itself refuses a second result: job_id is the table's primary key.
    engine = create_engine(registry.database_url)
    try:
        assert inspect(engine).get_pk_constraint("job_results")["constrained_columns"] == ["job_id"]
    finally:
        engine.dispose()
    results = registry.query("SELECT job_id, fencing_token FROM job_results")
    per_job: dict[str, int] = {}
    for row in results:
        per_job[row["job_id"]] = per_job.get(row["job_id"], 0) + 1
    assert sorted(per_job) == sorted(ids)
    assert set(per_job.values()) == {1}
    evaluations = registry.query("SELECT job_id, COUNT(*) AS n FROM evaluations GROUP BY job_id")
    assert {r["job_id"]: int(r["n"]) for r in evaluations} == {i: text_sets for i in ids}


# --------------------------------------------------------------------------- many workers


@pytest.mark.slow  # trains the models the workers run
@pytest.mark.parametrize("empty_database_url", ["sqlite", "postgresql"], indirect=True)
def test_three_workers_run_fifty_jobs_each_exactly_once(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    procs: Processes,
) -> None:
    registry = launch()
    published = publish(registry, domains=("licenses", "python_docs"))
    worker_token = registry.create_token("worker", "pool")
    workers = [
        start_worker(procs, registry, worker_token, name=f"w{i}", lease_seconds=10)
        for i in range(3)
    ]
    experts = list(published.experts.values())
    with registry.http(published.user_token) as http:
        ids = [
            _submit_evaluation(http, experts[i % len(experts)], [f"{SHORT_TEXT} ({i})"])
            for i in range(50)
        ]
    assert len(set(ids)) == 50

    jobs = _wait_final(registry, ids, timeout=240, workers=workers)

    assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
    _assert_each_applied_once(registry, ids)
    # The three workers shared the work (a lone worker doing it all would hide races).
    owners = registry.query("SELECT worker FROM job_results")
    assert len({str(r["worker"]) for r in owners}) >= 2, owners
    # Every job's result is its own text's score, as the submitter reads it.
    with registry.http(published.user_token) as http:
        job = http.get(f"/v1/jobs/{ids[7]}").json()
    assert job["status"] == "succeeded"
    score = job["result"]["results"]["sample"]
    assert score["bytes"] == len(f"{SHORT_TEXT} (7)".encode())
    assert score["bits_per_byte"] > 0


# --------------------------------------------------------------------------- SIGKILL


def _leases(registry: Registry) -> dict[str, dict[str, Any]]:
    """The jobs leased right now, by lease owner (the worker's --name)."""
    rows = registry.query(
        "SELECT id, fencing_token, attempts, lease_owner FROM jobs WHERE status = 'leased'"
    )
    return {str(row["lease_owner"]): row for row in rows}


@pytest.mark.slow  # trains the models the workers run
@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_sigkill_mid_job_ten_times_loses_nothing_and_applies_nothing_twice(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    procs: Processes,
    trained: Trained,
) -> None:
    # Attempts to spare: a job may be hit by several of the 10 kills.
    registry = launch(AGORA_JOB_MAX_ATTEMPTS="20", AGORA_JOB_BACKOFF_BASE_SECONDS="0.2")
    published = publish(registry, domains=("licenses", "python_docs"))
    worker_token = registry.create_token("worker", "pool")
    lease_seconds = 3

    generations: dict[str, int] = {}

    def spawn(slot: str) -> Process:
        # Each incarnation has a name of its own, so a lease the dead one left behind is
        # never mistaken for one its successor holds.
        generations[slot] = generations.get(slot, -1) + 1
        name = f"{slot}g{generations[slot]}"
        # The slot's cache survives its incarnations, as a restarted worker's disk would
        # (a download killed half-way leaves a partial file for the next one to resume).
        cache = registry.data_dir.parent / f"cache-{slot}"
        return start_worker(
            procs, registry, worker_token, name=name, lease_seconds=lease_seconds, cache_dir=cache
        )

    workers = {slot: spawn(slot) for slot in ("k0", "k1", "k2")}
    experts = list(published.experts.values())
    # Longer texts than elsewhere, so a job lasts long enough to be killed in the middle.
    text = "\n\n".join(trained.heldout["licenses"])[:6000]
    ids: list[str] = []
    http = registry.http(published.user_token)
    rng = random.Random(7)

    def top_up() -> None:
        queued = registry.scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        for _ in range(max(0, 6 - int(queued))):
            n = len(ids)
            ids.append(_submit_evaluation(http, experts[n % len(experts)], [f"{n}: {text}"]))

    killed: list[dict[str, Any]] = []
    deadline = time.monotonic() + 240
    try:
        while len(killed) < 10:
            assert time.monotonic() < deadline, f"only {len(killed)} kills landed mid-job"
            top_up()
            leases = _leases(registry)
            busy = [slot for slot, w in sorted(workers.items()) if w.name in leases]
            if not busy:
                time.sleep(0.05)
                continue
            slot = rng.choice(busy)
            worker = workers[slot]
            held = leases[worker.name]
            # A random point of the job: downloading, loading, scoring or completing.
            time.sleep(rng.uniform(0.0, 0.4))
            worker.kill()
            after = registry.query(
                "SELECT status, fencing_token FROM jobs WHERE id = :id", id=held["id"]
            )[0]
            # Mid-job: the dead worker's lease was still the current one when it died.
            if after["status"] == "leased" and after["fencing_token"] == held["fencing_token"]:
                killed.append(held)
            workers[slot] = spawn(slot)
        final = _wait_final(registry, ids, timeout=240, workers=list(workers.values()))
    finally:
        http.close()

    assert {j["status"] for j in final.values()} == {"succeeded"}, final
    _assert_each_applied_once(registry, ids)
    # The killed leases' jobs were finished by a later lease, with another fencing token.
    tokens = {
        r["job_id"]: r["fencing_token"]
        for r in registry.query("SELECT job_id, fencing_token FROM job_results")
    }
    for held in killed:
        assert tokens[held["id"]] != held["fencing_token"], held
        assert final[held["id"]]["attempts"] >= 2


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow  # trains the models the workers run
@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_sigterm_finishes_the_job_and_a_second_sigterm_hands_it_back(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    procs: Processes,
    trained: Trained,
) -> None:
    registry = launch()
    published = publish(registry, domains=("licenses", "python_docs"))
    token = registry.create_token("worker", "pool")
    text = "\n\n".join(trained.heldout["licenses"])[:6000]

    # One SIGTERM mid-job: the worker finishes the job, delivers it, and exits cleanly.
    first = start_worker(procs, registry, token, name="t1", lease_seconds=3)
    with registry.http(published.user_token) as http:
        evaluation = _submit_evaluation(http, published.experts["licenses"], [text])
    wait_until(lambda: "t1" in _leases(registry), timeout=120, interval=0.05, message="t1 to lease")
    first.send(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, first.log()
    job = registry.query("SELECT status, attempts FROM jobs WHERE id = :id", id=evaluation)[0]
    assert job == {"status": "succeeded", "attempts": 1}
    assert registry.query("SELECT worker FROM job_results WHERE job_id = :id", id=evaluation) == [
        {"worker": "t1"}
    ]

    # Two SIGTERMs mid-distillation: the job is handed back at once, its attempt not
    # counted, and the next worker computes it.
    second = start_worker(procs, registry, token, name="t2", lease_seconds=3)
    with registry.http(published.user_token) as http:
        accepted = http.post(
            "/v1/compositions",
            json={
                "method": "distill",
                "base_revision": published.revision,
                "experts": list(published.experts.values()),
                "texts": [text],
                "params": {"steps": 100, "seq_len": 32, "batch_size": 2},
            },
        )
    assert accepted.status_code == 202, accepted.text
    distill = accepted.json()["job_id"]

    # Leased, so somewhere in download, load or the distillation loop: each of them
    # checks for a release (the loop at every step), and the whole job takes seconds.
    wait_until(lambda: "t2" in _leases(registry), timeout=120, interval=0.05, message="t2 to lease")
    second.send(signal.SIGTERM)
    time.sleep(0.3)
    second.send(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, second.log()
    job = registry.query(
        "SELECT status, attempts, lease_owner FROM jobs WHERE id = :id", id=distill
    )[0]
    assert job == {"status": "queued", "attempts": 0, "lease_owner": None}
    assert registry.scalar("SELECT COUNT(*) FROM job_results WHERE job_id = :id", id=distill) == 0

    third = start_worker(procs, registry, token, name="t3", lease_seconds=3)
    final = _wait_final(registry, [distill], timeout=180, workers=[third])
    assert final[distill]["status"] == "succeeded"
    assert final[distill]["attempts"] == 1
    assert registry.query("SELECT worker FROM job_results WHERE job_id = :id", id=distill) == [
        {"worker": "t3"}
    ]


# --------------------------------------------------------------------------- stale worker


def _publish_fake(registry: Registry, tmp_path: Path, n_experts: int = 2) -> Published:
    """A base and experts made of random numbers: for tests where no worker computes."""
    admin_token = registry.create_token("admin", "root")
    user_token = registry.create_token("contributor", "alice")
    files = make_base_files()
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    with Agora(registry.url, token=admin_token, cache_dir=tmp_path / "c") as admin:
        revision = admin.upload_base_model(
            paths["config.json"], paths["tokenizer.json"], paths["model.safetensors"]
        ).revision
    experts: dict[str, str] = {}
    from helpers.artifacts import make_expert_schema

    with Agora(registry.url, token=user_token, cache_dir=tmp_path / "c") as user:
        for i in range(n_experts):
            weights = write_expert(
                tmp_path / f"e{i}.safetensors", make_expert_schema(), base_revision=revision, seed=i
            )
            sheet = make_datasheet(name=f"expert {i}", samples=[f"sample text {i}"])
            experts[f"e{i}"] = user.submit_expert(weights, sheet.decode(), revision).id
    return Published(revision, experts, admin_token, user_token)


def _score(bpb: float) -> dict[str, Any]:
    return {
        "results": {
            "sample": {"bits_per_byte": bpb, "base_bits_per_byte": 3.0, "tokens": 5, "bytes": 20}
        }
    }


def test_a_stale_workers_completion_is_refused(
    launch: Callable[..., Registry], tmp_path: Path
) -> None:
    registry = launch()
    published = _publish_fake(registry, tmp_path)
    expert_id = published.experts["e0"]
    with registry.http(published.user_token) as http:
        job_id = _submit_evaluation(http, expert_id, ["some text to score"])
    tokens = [registry.create_token("worker", f"w{i}") for i in (1, 2)]
    with (
        Agora(registry.url, token=tokens[0], cache_dir=tmp_path / "c1") as w1,
        Agora(registry.url, token=tokens[1], cache_dir=tmp_path / "c2") as w2,
        registry.http(tokens[0]) as raw1,
    ):
        first = w1.lease_job("w1", kinds=["evaluate"], lease_seconds=3)
        assert first is not None
        assert first.id == job_id
        assert first.job.attempts == 1
        # While the lease lives, nobody else gets the job.
        assert w2.lease_job("w2", lease_seconds=2) is None

        second = wait_until(
            lambda: w2.lease_job("w2", lease_seconds=30),
            timeout=20,
            interval=0.25,
            message="the first lease to expire and the job to be leased again",
        )
        assert second.id == job_id
        assert second.fencing_token != first.fencing_token
        assert second.job.attempts == 2

        # The stale worker can change nothing: complete, heartbeat and fail are refused.
        stale = {"fencing_token": first.fencing_token, "result": _score(1.0)}
        _problem(raw1.post(f"/v1/jobs/{job_id}/complete", json=stale), 409, "lease_lost")
        with pytest.raises(LeaseLost):
            w1.heartbeat_job(job_id, first.fencing_token)
        with pytest.raises(LeaseLost):
            w1.fail_job(job_id, first.fencing_token, "late failure", retryable=True)

        done = w2.complete_job(job_id, second.fencing_token, _score(2.5))
        assert done.status == "succeeded"
        # Still refused once the job is done; the current holder's repeat is idempotent.
        _problem(raw1.post(f"/v1/jobs/{job_id}/complete", json=stale), 409, "lease_lost")
        again = w2.complete_job(job_id, second.fencing_token, _score(2.5))
        assert again.status == "succeeded"
        assert again.result == done.result

    with registry.http(published.user_token) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        evaluations = http.get(f"/v1/experts/{expert_id}/evaluations").json()["items"]
    assert job["status"] == "succeeded"
    assert job["result"]["results"]["sample"]["bits_per_byte"] == 2.5
    assert [e["bits_per_byte"] for e in evaluations] == [2.5]
    rows = registry.query("SELECT job_id, fencing_token FROM job_results")
    assert rows == [{"job_id": job_id, "fencing_token": second.fencing_token}]


# --------------------------------------------------------------------------- poison job


def _corrupt_blob(registry: Registry, digest: str) -> None:
    """Flip bytes of a stored blob in place (same size): its sha256 no longer matches."""
    hexdigest = digest.removeprefix("sha256:")
    path = registry.blob_dir / "sha256" / hexdigest[:2] / hexdigest[2:]
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data)):
        data[offset] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.mark.slow  # trains the models the workers run
@pytest.mark.parametrize("empty_database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_poison_job_ends_dead_while_other_jobs_flow(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    procs: Processes,
) -> None:
    registry = launch(
        AGORA_JOB_MAX_ATTEMPTS="3",
        AGORA_JOB_BACKOFF_BASE_SECONDS="1.0",
        AGORA_JOB_BACKOFF_MAX_SECONDS="2.0",
    )
    published = publish(registry, domains=("licenses", "python_docs"))
    # The poison: an expert whose stored bytes no longer match their digest, so every
    # worker that downloads it refuses it, attempt after attempt.
    _corrupt_blob(registry, published.digests["python_docs"])
    worker_token = registry.create_token("worker", "pool")
    workers = [
        start_worker(procs, registry, worker_token, name=f"p{i}", lease_seconds=10)
        for i in range(2)
    ]
    with registry.http(published.user_token) as http:
        poison = _submit_evaluation(http, published.experts["python_docs"], [SHORT_TEXT])
        good = [
            _submit_evaluation(http, published.experts["licenses"], [f"{SHORT_TEXT} {i}"])
            for i in range(12)
        ]

    _wait_final(registry, [poison, *good], timeout=180, workers=workers)

    rows = {
        r["id"]: r
        for r in registry.query("SELECT id, status, attempts, max_attempts, finished_at FROM jobs")
    }
    assert rows[poison]["status"] == "dead"
    assert rows[poison]["attempts"] == rows[poison]["max_attempts"] == 3
    assert {rows[i]["status"] for i in good} == {"succeeded"}
    # The good jobs did not wait behind the poison: some finished before it died.
    assert min(rows[i]["finished_at"] for i in good) < rows[poison]["finished_at"]
    assert registry.scalar("SELECT COUNT(*) FROM job_results WHERE job_id = :id", id=poison) == 0
    with registry.http(published.admin_token) as http:
        listed = http.get("/v1/jobs", params={"status": "dead"}).json()["items"]
        job = http.get(f"/v1/jobs/{poison}").json()
    assert [j["id"] for j in listed] == [poison]
    assert job["status"] == "dead"
    assert "digest" in job["error"].lower(), job["error"]
    assert job["finished_at"] is not None


# --------------------------------------------------------------------------- refusals


def test_a_composition_naming_an_unknown_or_disabled_expert_is_refused(
    launch: Callable[..., Registry], tmp_path: Path
) -> None:
    registry = launch()
    published = _publish_fake(registry, tmp_path, n_experts=3)
    e0, e1, e2 = (published.experts[f"e{i}"] for i in range(3))
    with Agora(registry.url, token=published.admin_token, cache_dir=tmp_path / "c") as admin:
        admin.disable_expert(e1, "test: withdrawn")
    unknown = "ex_" + "0" * 26

    def request(experts: list[str]) -> dict[str, Any]:
        return {"method": "ensemble", "base_revision": published.revision, "experts": experts}

    with registry.http(published.user_token) as http:
        body = _problem(
            http.post("/v1/compositions", json=request([e0, unknown])), 404, "expert_not_found"
        )
        assert unknown in body["detail"]
        body = _problem(
            http.post("/v1/compositions", json=request([e0, e1])), 451, "expert_disabled"
        )
        assert e1 in body["detail"]
        # Only the disable's forgetting measurement (docs/governance.md) is queued.
        forgetting = registry.scalar("SELECT COUNT(*) FROM forgetting_reports")
        assert registry.scalar("SELECT COUNT(*) FROM jobs") == forgetting
        assert registry.scalar("SELECT COUNT(*) FROM compositions") == 0

        # The same request without the refused experts is accepted: one job, queued.
        accepted = http.post("/v1/compositions", json=request([e0, e2]))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "queued"
    assert registry.scalar("SELECT COUNT(*) FROM jobs") == forgetting + 1
