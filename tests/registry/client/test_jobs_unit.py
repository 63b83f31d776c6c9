"""The SDK's jobs protocol with a scripted registry (``httpx.MockTransport``): the worker
calls (lease, heartbeat, complete, fail), composition and evaluation handles, waiting, and
fetching a composition's files."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.client import (
    Agora,
    AgoraError,
    BadRequest,
    Caution,
    Composition,
    CompositionWarning,
    Conflict,
    DigestMismatch,
    Job,
    JobFailed,
    LeaseLost,
    UnavailableForLegalReasons,
    ValidationFailed,
)
from registry.client.composed import ModelDependenciesMissing, load_composed_dir

Handler = Callable[[httpx.Request], httpx.Response]

REV = "ab" * 32


def problem(status: int, code: str, detail: str = "nope") -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail, "code": code}
    return httpx.Response(
        status, content=json.dumps(body), headers={"Content-Type": "application/problem+json"}
    )


def job(status: str = "queued", **fields: Any) -> dict[str, Any]:
    body = {
        "id": "job_01",
        "kind": "compose.ensemble",
        "status": status,
        "payload": {},
        "attempts": 1,
        "max_attempts": 3,
        "created_by": "alice",
        "created_at": "2026-11-27T10:00:00Z",
    }
    body.update(fields)
    return body


class FakeTime:
    """A clock that only moves when the SDK sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(handler: Handler, tmp_path: Path) -> tuple[Agora, FakeTime]:
    agora = Agora(
        "http://registry.test",
        token="agora_test",
        transport=httpx.MockTransport(handler),
        cache_dir=tmp_path / "cache",
    )
    fake = FakeTime()
    agora._sleep = fake.sleep
    agora._clock = fake.clock
    return agora, fake


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.read())


# --------------------------------------------------------------------------- worker calls


def test_lease_sends_worker_kinds_and_returns_the_job_with_its_fencing_token(
    tmp_path: Path,
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        leased = job("leased", fencing_token=7, lease_owner="w1", payload={"method": "ensemble"})
        return httpx.Response(200, json={"job": leased})

    agora, _ = make_client(handler, tmp_path)
    leased = agora.lease_job("w1", kinds=["evaluate", "compose.ensemble"], lease_seconds=30)
    assert leased is not None
    assert (leased.id, leased.fencing_token, leased.kind) == ("job_01", 7, "compose.ensemble")
    assert leased.payload == {"method": "ensemble"}
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/v1/jobs/lease")
    assert body_of(request) == {
        "worker": "w1",
        "kinds": ["evaluate", "compose.ensemble"],
        "lease_seconds": 30,
    }
    assert request.headers["Authorization"] == "Bearer agora_test"
    assert request.headers["Idempotency-Key"]


def test_lease_answered_204_means_nothing_to_do(tmp_path: Path) -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(body_of(request))
        return httpx.Response(204)

    agora, _ = make_client(handler, tmp_path)
    assert agora.lease_job("w1") is None
    assert bodies == [{"worker": "w1", "kinds": None, "lease_seconds": 60}]


def test_a_lease_without_fencing_token_is_refused_not_guessed(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: httpx.Response(200, json={"job": job("leased")}), tmp_path)
    with pytest.raises(AgoraError) as err:
        agora.lease_job("w1")
    assert err.value.code == "bad_response"


def test_heartbeat_returns_the_new_expiry_and_carries_progress(tmp_path: Path) -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/job_01/heartbeat"
        bodies.append(body_of(request))
        return httpx.Response(200, json={"lease_expires_at": "2026-11-27T10:01:00Z"})

    agora, _ = make_client(handler, tmp_path)
    expires = agora.heartbeat_job("job_01", 3, progress={"done": 2, "total": 5})
    assert expires == datetime(2026, 11, 27, 10, 1, tzinfo=UTC)
    agora.heartbeat_job("job_01", 3)
    assert bodies == [
        {"fencing_token": 3, "progress": {"done": 2, "total": 5}},
        {"fencing_token": 3, "progress": None},
    ]


@pytest.mark.parametrize("call", ["heartbeat", "complete", "fail"])
def test_409_lease_lost_is_raised_as_lease_lost_and_not_retried(tmp_path: Path, call: str) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return problem(409, "lease_lost", "job job_01 is leased with token 5, not 4")

    agora, _ = make_client(handler, tmp_path)
    calls_by_name: dict[str, Callable[[], object]] = {
        "heartbeat": lambda: agora.heartbeat_job("job_01", 4),
        "complete": lambda: agora.complete_job("job_01", 4, {"weights": None}),
        "fail": lambda: agora.fail_job("job_01", 4, "boom"),
    }
    with pytest.raises(LeaseLost) as err:
        calls_by_name[call]()
    assert isinstance(err.value, Conflict)
    assert (err.value.status, err.value.code) == (409, "lease_lost")
    assert "token 5" in err.value.detail
    assert calls == [f"/v1/jobs/job_01/{call}"]


def test_another_409_stays_a_plain_conflict(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: problem(409, "job_not_leased"), tmp_path)
    with pytest.raises(Conflict) as err:
        agora.heartbeat_job("job_01", 1)
    assert not isinstance(err.value, LeaseLost)
    assert err.value.code == "job_not_leased"


def test_complete_without_weights_is_json(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job("succeeded", result={"weights": [0.5, 0.5]}))

    agora, _ = make_client(handler, tmp_path)
    done = agora.complete_job("job_01", 2, {"weights": [0.5, 0.5], "metrics": None})
    assert isinstance(done, Job)
    assert done.status == "succeeded"
    assert done.done
    (request,) = seen
    assert request.headers["Content-Type"] == "application/json"
    assert body_of(request) == {
        "fencing_token": 2,
        "result": {"weights": [0.5, 0.5], "metrics": None},
    }


def _multipart_parts(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart/form-data request (small test bodies)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    raw = request.read()
    header = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(header + raw)
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        parts[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return parts


def test_complete_with_weights_streams_the_file_and_a_retry_sends_it_whole_again(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "out.safetensors"
    content = bytes(range(256)) * 300
    weights.write_bytes(content)
    seen: list[tuple[str, dict[str, tuple[str | None, bytes]]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["Idempotency-Key"], _multipart_parts(request)))
        if len(seen) == 1:
            return problem(503, "service_unavailable")
        return httpx.Response(200, json=job("succeeded"))

    agora, fake = make_client(handler, tmp_path)
    progress: list[tuple[int, int | None]] = []
    done = agora.complete_job(
        "job_01",
        9,
        {"metrics": {"bits_per_byte": 1.5}, "details": {"merge": "ties"}},
        weights=weights,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert done.status == "succeeded"
    assert len(seen) == 2
    assert len(fake.sleeps) == 1
    assert seen[0][0] == seen[1][0], "the retry must reuse the Idempotency-Key"
    for _, parts in seen:
        assert parts["fencing_token"] == (None, b"9")
        assert json.loads(parts["result"][1]) == {
            "metrics": {"bits_per_byte": 1.5},
            "details": {"merge": "ties"},
        }
        assert parts["weights"] == ("out.safetensors", content)
    assert progress[-1] == (len(content), len(content))


def test_complete_refused_as_invalid_output_is_validation_failed(tmp_path: Path) -> None:
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(b"not safetensors")
    agora, _ = make_client(lambda r: problem(422, "invalid_safetensors"), tmp_path)
    with pytest.raises(ValidationFailed) as err:
        agora.complete_job("job_01", 1, {}, weights=weights)
    assert err.value.code == "invalid_safetensors"


def test_fail_sends_retryable_and_release(tmp_path: Path) -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/job_01/fail"
        bodies.append(body_of(request))
        return httpx.Response(200, json=job("queued", error="cuda out of memory"))

    agora, _ = make_client(handler, tmp_path)
    assert agora.fail_job("job_01", 4, "cuda out of memory").status == "queued"
    agora.fail_job("job_01", 4, "bad payload", retryable=False)
    agora.fail_job("job_01", 4, "SIGTERM", release=True)
    assert bodies == [
        {"fencing_token": 4, "error": "cuda out of memory", "retryable": True, "release": False},
        {"fencing_token": 4, "error": "bad payload", "retryable": False, "release": False},
        {"fencing_token": 4, "error": "SIGTERM", "retryable": True, "release": True},
    ]


# --------------------------------------------------------------------------- compose / wait


def base_listing(*revisions: str) -> dict[str, Any]:
    info = {"digest": "sha256:" + "0" * 64, "size": 1}
    files = {"config": info, "tokenizer": info, "weights": info}
    return {"items": [{"revision": r, "files": files} for r in revisions]}


def test_compose_posts_the_request_and_defaults_to_the_only_base(tmp_path: Path) -> None:
    posted: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/base-models":
            return httpx.Response(200, json=base_listing(REV))
        posted.append(request)
        return httpx.Response(
            202, json={"job_id": "job_01", "composition_id": "cmp_01", "status": "queued"}
        )

    agora, _ = make_client(handler, tmp_path)
    handle = agora.compose(
        "distill", texts="tide pools at dawn", k=2, params={"steps": 5}, idempotency_key="k1"
    )
    assert (handle.job_id, handle.composition_id) == ("job_01", "cmp_01")
    (request,) = posted
    assert (request.url.path, request.headers["Idempotency-Key"]) == ("/v1/compositions", "k1")
    assert body_of(request) == {
        "method": "distill",
        "base_revision": REV,
        "experts": None,
        "texts": ["tide pools at dawn"],
        "k": 2,
        "weights": None,
        # The teacher has the base as a path unless asked otherwise: the request says so.
        "params": {"steps": 5, "with_base": True},
    }

    handle = agora.compose(
        "ensemble", base_revision="cd" * 32, experts=["exp_a", "exp_b@2"], weights=[0.3, 0.7]
    )
    sent = body_of(posted[-1])
    assert sent["base_revision"] == "cd" * 32
    assert (sent["experts"], sent["texts"], sent["weights"]) == (
        ["exp_a", "exp_b@2"],
        None,
        [0.3, 0.7],
    )
    assert sent["params"] == {"with_base": True}


def test_compose_sends_the_base_path_settings_of_an_ensemble(tmp_path: Path) -> None:
    posted: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(body_of(request))
        return httpx.Response(
            202, json={"job_id": "job_01", "composition_id": "cmp_01", "status": "queued"}
        )

    agora, _ = make_client(handler, tmp_path)
    experts = ["exp_a", "exp_b"]
    agora.compose("ensemble", base_revision=REV, experts=experts, with_base=False)
    agora.compose("ensemble", base_revision=REV, experts=experts, weights=[3, 1], base_weight=2.0)
    # The REST spelling, through params, works the same.
    agora.compose("ensemble", base_revision=REV, experts=experts, params={"with_base": False})
    agora.compose("mixture", base_revision=REV, experts=experts)
    assert [p["params"] for p in posted] == [
        {"with_base": False},
        {"with_base": True, "base_weight": 2.0},
        {"with_base": False},
        {},
    ]
    # Contradictions and settings of a method without a base path fail before any request.
    for method, kwargs in [
        ("ensemble", {"with_base": False, "params": {"with_base": True}}),
        ("ensemble", {"base_weight": 1.0, "params": {"base_weight": 2.0}}),
        ("mixture", {"with_base": False}),
        ("average", {"base_weight": 1.0}),
    ]:
        with pytest.raises(ValueError):
            agora.compose(method, base_revision=REV, experts=experts, **kwargs)
    assert len(posted) == 4


def test_compose_takes_the_sdks_expert_objects(tmp_path: Path) -> None:
    from registry.client import Expert, SearchResult, SubmittedExpert

    posted: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(body_of(request))
        return httpx.Response(
            202, json={"job_id": "job_01", "composition_id": "cmp_01", "status": "queued"}
        )

    agora, _ = make_client(handler, tmp_path)
    submitted = SubmittedExpert(id="ex_a", version=3, digest="sha256:" + "0" * 64, status="active")
    found = SearchResult(expert_id="ex_b", version=2, score=0.9, weight=0.6)
    latest = Expert(id="ex_c", status="active", base_revision=REV, latest_version=5)
    agora.compose("mixture", base_revision=REV, experts=[submitted, found, latest, "ex_d@1"])
    assert posted[0]["experts"] == ["ex_a@3", "ex_b@2", "ex_c", "ex_d@1"]
    with pytest.raises(TypeError):
        agora.compose("mixture", base_revision=REV, experts=[42])  # type: ignore[list-item]


def test_compose_exposes_and_warns_the_registrys_cautions(tmp_path: Path) -> None:
    caution = {"code": "average_may_harm", "detail": "measured: it harms; prefer ensemble"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(
                200, json=composition("pending", method="average", warnings=[caution])
            )
        method = body_of(request)["method"]
        accepted = {"job_id": "job_01", "composition_id": "cmp_01", "status": "queued"}
        return httpx.Response(
            202, json={**accepted, "warnings": [caution] if method == "average" else []}
        )

    agora, _ = make_client(handler, tmp_path)
    with pytest.warns(CompositionWarning, match="average_may_harm: measured") as caught:
        handle = agora.compose("average", base_revision=REV, experts=["exp_a", "exp_b"])
    assert handle.warnings == [Caution(**caution)]
    (warned,) = caught
    assert isinstance(warned.message, CompositionWarning)
    assert (warned.message.code, warned.message.detail) == (caution["code"], caution["detail"])
    assert warned.filename == __file__  # stacklevel: it points at the caller's line
    # A handle found again by id has them too (from the composition).
    assert agora.composition("cmp_01").warnings == [Caution(**caution)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = agora.compose("ensemble", base_revision=REV, experts=["exp_a", "exp_b"])
    assert quiet.warnings == []


def test_compose_without_a_single_base_asks_for_one(tmp_path: Path) -> None:
    agora, _ = make_client(
        lambda r: httpx.Response(200, json=base_listing(REV, "cd" * 32)), tmp_path
    )
    with pytest.raises(BadRequest) as err:
        agora.compose("ensemble", texts=["x"])
    assert err.value.code == "base_revision_required"
    with pytest.raises(ValueError):
        agora.compose("ensemble", base_revision=REV)


def test_compose_refusals_surface_typed(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: problem(451, "expert_disabled"), tmp_path)
    with pytest.raises(UnavailableForLegalReasons):
        agora.compose("mixture", base_revision=REV, experts=["exp_gone"])


def scripted_jobs(states: list[dict[str, Any]], composition: list[dict[str, Any]]) -> Handler:
    """GET /v1/jobs/job_01 walks through ``states`` (then repeats the last)."""
    polls = {"job": 0, "cmp": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/compositions":
            return httpx.Response(
                202, json={"job_id": "job_01", "composition_id": "cmp_01", "status": "queued"}
            )
        if request.url.path == "/v1/jobs/job_01":
            i = min(polls["job"], len(states) - 1)
            polls["job"] += 1
            return httpx.Response(200, json=states[i])
        if request.url.path == "/v1/compositions/cmp_01":
            i = min(polls["cmp"], len(composition) - 1)
            polls["cmp"] += 1
            return httpx.Response(200, json=composition[i])
        return problem(404, "not_found")

    return handler


MANIFEST = {
    "format": "agora.composition/1",
    "id": "cmp_01",
    "method": "ensemble",
    "base_revision": REV,
    "experts": [
        {"id": "exp_a", "version": 1, "digest": "sha256:" + "1" * 64, "size": 3, "weight": 0.25},
        {"id": "exp_b", "version": 2, "digest": "sha256:" + "2" * 64, "size": 3, "weight": 0.75},
    ],
    "params": {"prior_windows": 8},
    "output": None,
    "metrics": {"base_bits_per_byte": 2.0, "bits_per_byte": 1.8, "bytes": 100},
}


def composition(status: str = "ready", **fields: Any) -> dict[str, Any]:
    body = {
        "id": "cmp_01",
        "method": "ensemble",
        "base_revision": REV,
        "status": status,
        "job_id": "job_01",
        "manifest": MANIFEST if status == "ready" else None,
        "expert_id": None,
        "created_by": "alice",
        "created_at": "2026-11-27T10:00:00Z",
    }
    body.update(fields)
    return body


def test_wait_reports_progress_backs_off_and_returns_the_ready_composition(
    tmp_path: Path,
) -> None:
    states = [
        job("queued", attempts=0),
        job("queued", attempts=0),
        job("queued", attempts=0),
        job("leased", progress={"done": 1, "total": 4, "message": "prior"}),
        job("leased", progress={"done": 3, "total": 4, "message": "prior"}),
        job("succeeded", result={"weights": [0.25, 0.75]}),
    ]
    agora, fake = make_client(scripted_jobs(states, [composition()]), tmp_path)
    handle = agora.compose("ensemble", base_revision=REV, texts=["t"])
    seen: list[Job] = []
    ready = handle.wait(poll=1.0, progress=seen.append)

    assert isinstance(ready, Composition)
    assert ready.status == "ready"
    assert ready.manifest is not None
    assert [(e.id, e.weight) for e in ready.manifest.experts] == [("exp_a", 0.25), ("exp_b", 0.75)]
    assert [(j.status, (j.progress or {}).get("done")) for j in seen] == [
        ("queued", None),
        ("queued", None),
        ("queued", None),
        ("leased", 1),
        ("leased", 3),
        ("succeeded", None),
    ]
    # Unchanged polls slow down (1, 1.5, 2.25); a change brings it back to `poll`.
    assert fake.sleeps == [1.0, 1.5, 2.25, 1.0, 1.0]
    assert handle.job is not None
    assert handle.job.status == "succeeded"


def test_wait_polls_the_composition_until_ready_after_the_job(tmp_path: Path) -> None:
    agora, fake = make_client(
        scripted_jobs([job("succeeded")], [composition("pending"), composition()]), tmp_path
    )
    ready = agora.compose("ensemble", base_revision=REV, texts=["t"]).wait(poll=0.5)
    assert ready.status == "ready"
    assert fake.sleeps == [0.5]


@pytest.mark.parametrize(("status", "code"), [("failed", "job_failed"), ("dead", "job_dead")])
def test_wait_raises_job_failed_with_the_jobs_error(tmp_path: Path, status: str, code: str) -> None:
    states = [job("leased"), job(status, attempts=3, error="RuntimeError: NaN loss at step 4")]
    agora, _ = make_client(scripted_jobs(states, [composition("failed")]), tmp_path)
    handle = agora.compose("distill", base_revision=REV, texts=["t"])
    with pytest.raises(JobFailed) as err:
        handle.wait(poll=0.1)
    assert err.value.code == code
    assert err.value.detail == "RuntimeError: NaN loss at step 4"
    assert err.value.job.status == status
    assert err.value.job.attempts == 3
    assert "NaN loss" in str(err.value)


def test_wait_times_out_with_a_timeout_error_after_a_last_poll(tmp_path: Path) -> None:
    agora, fake = make_client(scripted_jobs([job("queued")], [composition("pending")]), tmp_path)
    handle = agora.compose("ensemble", base_revision=REV, texts=["t"])
    polls: list[Job] = []
    with pytest.raises(TimeoutError, match="job_01 is still queued after 3 s"):
        handle.wait(timeout=3, poll=1.0, progress=polls.append)
    assert sum(fake.sleeps) == pytest.approx(3.0)
    assert fake.sleeps == [1.0, 1.5, 0.5]  # the last sleep is cut to the deadline
    assert len(polls) == 4


def test_evaluate_posts_text_sets_and_wait_returns_scores(tmp_path: Path) -> None:
    posted: list[Any] = []
    result = {
        "results": {
            "held_out": {
                "bits_per_byte": 1.2,
                "base_bits_per_byte": 1.4,
                "tokens": 40,
                "bytes": 120,
            }
        }
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posted.append(body_of(request))
            return httpx.Response(202, json={"job_id": "job_01", "status": "queued"})
        return httpx.Response(200, json=job("succeeded", kind="evaluate", result=result))

    agora, _ = make_client(handler, tmp_path)
    handle = agora.evaluate({"held_out": "one text", "more": ["a", "b"]}, expert_id="exp_a")
    scores = handle.wait()
    assert scores["held_out"].bits_per_byte == 1.2
    assert scores["held_out"].base_bits_per_byte == 1.4
    assert posted == [
        {
            "expert_id": "exp_a",
            "version": None,
            "composition_id": None,
            "text_sets": {"held_out": ["one text"], "more": ["a", "b"]},
        }
    ]
    with pytest.raises(ValueError):
        agora.evaluate({"x": "y"}, expert_id="exp_a", composition_id="cmp_01")


def test_list_evaluations_of_an_expert_and_of_a_composition(tmp_path: Path) -> None:
    paths: list[str] = []
    item = {
        "id": "evl_01",
        "text_set": "held_out",
        "bits_per_byte": 1.1,
        "base_bits_per_byte": 1.3,
        "tokens": 10,
        "bytes": 30,
        "job_id": "job_01",
        "expert_id": "exp_a",
        "version": 1,
        "composition_id": None,
        "created_at": "2026-11-27T10:00:00Z",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json={"items": [item]})

    agora, _ = make_client(handler, tmp_path)
    (evaluation,) = agora.list_evaluations(expert_id="exp_a")
    assert (evaluation.text_set, evaluation.bits_per_byte, evaluation.version) == (
        "held_out",
        1.1,
        1,
    )
    agora.list_evaluations(composition_id="cmp_01")
    assert paths == ["/v1/experts/exp_a/evaluations", "/v1/compositions/cmp_01/evaluations"]


# --------------------------------------------------------------------------- composition files


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(data: bytes) -> httpx.Response:
    # A stream, as a real server's body: the SDK reads downloads with iter_raw.
    return httpx.Response(200, stream=httpx.ByteStream(data))


class FilesRegistry:
    """Serves one ready composition: a base bundle and two expert files."""

    def __init__(self, *, tamper: bool = False, status: str = "ready") -> None:
        self.base = {"config": b"{}", "tokenizer": b'{"v": 1}', "weights": b"base-weights"}
        self.experts = {("exp_a", 1): b"expert-a", ("exp_b", 2): b"expert-b!"}
        self.tamper = tamper
        self.status = status
        self.weight_requests: list[str] = []

    @property
    def manifest(self) -> dict[str, Any]:
        refs = [
            {"id": i, "version": v, "digest": sha(b), "size": len(b), "weight": w}
            for (i, v), b, w in zip(self.experts, self.experts.values(), [0.4, 0.6], strict=True)
        ]
        return {**MANIFEST, "experts": refs}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/compositions/cmp_01":
            body = composition(self.status)
            body["manifest"] = self.manifest if self.status == "ready" else None
            return httpx.Response(200, json=body)
        if path == f"/v1/base-models/{REV}":
            files = {k: {"digest": sha(v), "size": len(v)} for k, v in self.base.items()}
            return httpx.Response(200, json={"revision": REV, "files": files})
        if path.startswith(f"/v1/base-models/{REV}/files/"):
            return blob(self.base[path.rsplit("/", 1)[1]])
        if path.endswith("/weights"):
            expert_id = path.split("/")[3]
            version = int(request.url.params["version"])
            self.weight_requests.append(f"{expert_id}@{version}")
            data = self.experts[(expert_id, version)]
            return blob(b"X" + data[1:] if self.tamper else data)
        return problem(404, "not_found")


def test_download_composition_lays_out_manifest_base_and_experts(tmp_path: Path) -> None:
    served = FilesRegistry()
    agora, _ = make_client(served, tmp_path)
    out = tmp_path / "out"
    local = agora.download_composition("cmp_01", out)

    assert json.loads((out / "manifest.json").read_text()) == served.manifest
    assert local.manifest == served.manifest
    assert (out / "base" / "model.safetensors").read_bytes() == b"base-weights"
    assert (out / "base" / "config.json").read_bytes() == b"{}"
    assert (out / "experts" / "exp_a-v1.safetensors").read_bytes() == b"expert-a"
    assert (out / "experts" / "exp_b-v2.safetensors").read_bytes() == b"expert-b!"
    assert local.expert_files == {
        sha(b"expert-a"): out / "experts" / "exp_a-v1.safetensors",
        sha(b"expert-b!"): out / "experts" / "exp_b-v2.safetensors",
    }
    assert served.weight_requests == ["exp_a@1", "exp_b@2"]

    # Cached by digest: a second fetch (into the cache only) transfers no weights again.
    again = agora.download_composition("cmp_01")
    assert served.weight_requests == ["exp_a@1", "exp_b@2"]
    assert again.base_dir == agora.cache.root / "bases" / REV
    assert {p.read_bytes() for p in again.expert_files.values()} == {b"expert-a", b"expert-b!"}


def test_bytes_that_do_not_match_the_manifest_are_refused_and_not_kept(tmp_path: Path) -> None:
    agora, _ = make_client(FilesRegistry(tamper=True), tmp_path)
    with pytest.raises(DigestMismatch):
        agora.download_composition("cmp_01", tmp_path / "out")
    assert not (tmp_path / "out" / "experts").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "cache" / "sha256").glob("*.part"))


def test_a_composition_not_ready_cannot_be_loaded(tmp_path: Path) -> None:
    agora, _ = make_client(FilesRegistry(status="pending"), tmp_path)
    with pytest.raises(Conflict) as err:
        agora.load_composed("cmp_01")
    assert err.value.code == "composition_not_ready"
    assert "job_01" in err.value.detail


def test_a_disabled_expert_makes_the_composition_451(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: problem(451, "expert_disabled"), tmp_path)
    with pytest.raises(UnavailableForLegalReasons):
        agora.load_composed("cmp_01")


def test_without_modelcore_loading_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = FilesRegistry()
    agora, _ = make_client(served, tmp_path)
    # None in sys.modules makes the SDK's one import of modelcore (modelcore.compose.local)
    # fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "modelcore.compose.local", None)
    with pytest.raises(ModelDependenciesMissing) as err:
        agora.load_composed("cmp_01")
    assert "pip install 'agora[model]'" in err.value.detail
    assert served.weight_requests == []  # said before downloading anything
    agora.download_composition("cmp_01", tmp_path / "out")
    with pytest.raises(ModelDependenciesMissing):
        load_composed_dir(tmp_path / "out")


def test_load_composed_dir_refuses_an_altered_expert_file(tmp_path: Path) -> None:
    agora, _ = make_client(FilesRegistry(), tmp_path)
    out = tmp_path / "out"
    agora.download_composition("cmp_01", out)
    target = out / "experts" / "exp_b-v2.safetensors"
    target.unlink()  # a hard link into the cache: replace it rather than edit the cache
    target.write_bytes(b"tampered")
    with pytest.raises(DigestMismatch):
        load_composed_dir(out)
    target.unlink()
    with pytest.raises(AgoraError) as err:
        load_composed_dir(out)
    assert err.value.code == "composition_incomplete"


def test_placing_the_same_file_from_many_threads_at_once_never_fails(tmp_path: Path) -> None:
    """A worker and the user's SDK share a cache and may place the same base file together."""
    import threading

    from registry.client.cache import place

    source = tmp_path / "blob"
    source.write_bytes(b"weights" * 1000)
    dest = tmp_path / "bases" / "rev" / "model.safetensors"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def go() -> None:
        start.wait()
        try:
            for _ in range(50):
                place(source, dest)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]  # no temp files


def test_placing_over_a_link_to_the_same_entry_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rename() of a hard link onto another link of the same inode is a no-op that succeeds:
    the race the threaded test above hits at random, made deterministic (the samefile
    check loses the race)."""
    from registry.client import cache

    source = tmp_path / "blob"
    source.write_bytes(b"weights")
    dest = tmp_path / "bases" / "rev" / "model.safetensors"
    cache.place(source, dest)
    monkeypatch.setattr(cache.os.path, "samefile", lambda a, b: False)
    cache.place(source, dest)
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]
    assert dest.read_bytes() == b"weights"


def test_the_sdk_docs_name_every_method_parameter() -> None:
    """docs/sdk.md lists each method's parameters by hand: it must not fall behind the
    one declaration the registry checks requests against."""
    from registry.protocol import METHOD_SPECS

    docs = (Path(__file__).resolve().parents[3] / "docs" / "sdk.md").read_text()
    listed = docs.split("Method parameters", 1)[1].split("Returns a", 1)[0]
    for spec in METHOD_SPECS.values():
        for param in spec.params:
            assert f"`{param.name}`" in listed, (spec.name, param.name)
