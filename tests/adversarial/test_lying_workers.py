"""Workers that lie (SQLite and PostgreSQL): a worker's output is evidence, not truth.

The test plays the workers over HTTP, leasing jobs and completing them with crafted
outputs; no model runs. Each lie is one an untrusted worker token can tell:

* a wrong average (a reproducible output), and an average that is another job's output;
* a distillation with inflated bits per byte, and one that claims none;
* the liar leasing the check of its own output (the queue excludes its token), and
  completing that check without a lease (its fencing token is not shown to it);
* a verifier that lies about an honest output.

None of them makes anything active: the output stays ``quarantined`` (not listed, not
searchable, not composable, its files refused to strangers) and its composition
``verifying`` until a second worker checks it; a refuted output is ``rejected``, its
composition ``failed`` with the cause, and the liar's token is charged a refusal (and
audited). An honest replica or evaluation by a second worker makes the output active.
docs/architecture.md, "Workers that lie".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.adversarial import report
from helpers.artifacts import expert_tensors, make_base_files, make_datasheet, make_expert_bytes
from sqlalchemy import select

from registry.app import create_app
from registry.db.models import AuditEvent, Job, Token
from registry.services.tokens import create_token
from registry.settings import Settings

ROLES = {
    "admin": ("admin", False),
    "alice": ("contributor", False),  # asks for the compositions: owns their outputs
    "bob": ("contributor", False),  # a stranger to them
    "moderator": ("moderator", False),
    "liar": ("worker", False),
    "honest": ("worker", False),
    "operator": ("worker", True),  # the operator's own worker: trusted
}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code, response.text


@dataclass
class World:
    app: FastAPI
    client: TestClient
    secrets: dict[str, str]
    token_ids: dict[str, int]
    revision: str
    schema: dict[str, Any]

    # -- contributors -----------------------------------------------------------------

    def tensors(self, seed: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in expert_tensors(self.schema, seed=seed).items()}

    def expert_bytes(self, tensors: dict[str, np.ndarray]) -> bytes:
        return make_expert_bytes(
            self.schema, base_revision=self.revision, tensor_overrides=dict(tensors)
        )

    def submit(self, seed: int, name: str) -> str:
        response = self.client.post(
            "/v1/experts",
            files={
                "weights": ("e.safetensors", self.expert_bytes(self.tensors(seed))),
                "datasheet": (
                    "DATASHEET.md",
                    make_datasheet(name=name, samples=[f"{name} field notes, sample {seed}"]),
                ),
            },
            data={"base_revision": self.revision},
            headers=auth(self.secrets["alice"]),
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def compose(self, method: str, experts: list[str], **body: Any) -> dict[str, Any]:
        response = self.client.post(
            "/v1/compositions",
            json={"method": method, "base_revision": self.revision, "experts": experts, **body},
            headers=auth(self.secrets["alice"]),
        )
        assert response.status_code == 202, response.text
        return dict(response.json())

    # -- workers ----------------------------------------------------------------------

    def lease(self, who: str, kinds: list[str] | None = None) -> dict[str, Any] | None:
        response = self.client.post(
            "/v1/jobs/lease",
            json={"worker": who, **({"kinds": kinds} if kinds else {})},
            headers=auth(self.secrets[who]),
        )
        if response.status_code == 204:
            return None
        assert response.status_code == 200, response.text
        return dict(response.json()["job"])

    def complete(
        self,
        who: str,
        job: dict[str, Any],
        result: dict[str, Any],
        weights: bytes | None = None,
        fencing_token: int | None = None,
    ) -> Any:
        token = job["fencing_token"] if fencing_token is None else fencing_token
        path = f"/v1/jobs/{job['id']}/complete"
        if weights is None:
            return self.client.post(
                path,
                json={"fencing_token": token, "result": result},
                headers=auth(self.secrets[who]),
            )
        return self.client.post(
            path,
            data={"fencing_token": str(token), "result": json.dumps(result)},
            files={"weights": ("out.safetensors", weights)},
            headers=auth(self.secrets[who]),
        )

    # -- what a user sees -------------------------------------------------------------

    def composition(self, composition_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/compositions/{composition_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def status(self, expert_id: str) -> str:
        return str(self.client.get(f"/v1/experts/{expert_id}").json()["status"])

    def listed(self) -> set[str]:
        items = self.client.get("/v1/experts", params={"limit": 100}).json()["items"]
        return {e["id"] for e in items}

    def found(self, texts: list[str]) -> set[str]:
        response = self.client.post(
            "/v1/search",
            json={"texts": texts, "base_revision": self.revision, "k": 8},
            headers=auth(self.secrets["alice"]),
        )
        assert response.status_code == 200, response.text
        return {r["expert_id"] for r in response.json()["results"]}

    def weights_as(self, who: str | None, expert_id: str) -> Any:
        headers = auth(self.secrets[who]) if who is not None else {}
        return self.client.get(f"/v1/experts/{expert_id}/weights", headers=headers)

    def refusals(self, who: str) -> int:
        with self.app.state.runtime.sessions() as session:
            token = session.get(Token, self.token_ids[who])
            assert token is not None
            return int(token.refusals)

    def audited(self, who: str) -> list[dict[str, Any]]:
        with self.app.state.runtime.sessions() as session:
            rows = session.scalars(
                select(AuditEvent).where(
                    AuditEvent.target == f"token:{self.token_ids[who]}",
                    AuditEvent.action != "token.create",
                )
            ).all()
            return [{"action": r.action, **r.detail} for r in rows]

    def check_job(self, composition_id: str) -> Job:
        """The one job that checks the composition's output (not the composition's own)."""
        own = self.composition(composition_id)["job_id"]
        with self.app.state.runtime.sessions() as session:
            checks = session.scalars(
                select(Job).where(Job.composition_id == composition_id, Job.id != own)
            ).all()
            assert len(checks) == 1, checks
            session.expunge(checks[0])
            return checks[0]


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path / "agora", database_url=database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        secrets: dict[str, str] = {}
        ids: dict[str, int] = {}
        with app.state.runtime.sessions() as session, session.begin():
            for name, (role, trusted) in ROLES.items():
                row, secrets[name] = create_token(
                    session=session, name=name, role=role, trusted=trusted
                )
                ids[name] = row.id
        files = make_base_files()
        response = client.post(
            "/v1/base-models",
            files={
                "config": ("config.json", files["config.json"]),
                "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
                "weights": ("model.safetensors", files["model.safetensors"]),
            },
            headers=auth(secrets["admin"]),
        )
        assert response.status_code == 201, response.text
        body = response.json()
        yield World(app, client, secrets, ids, body["revision"], body["expert_schema"])


def uniform_average(world: World, *seeds: int) -> dict[str, np.ndarray]:
    """What an honest worker computes for a uniform average of the experts of ``seeds``."""
    parts = [world.tensors(s) for s in seeds]
    return {
        name: (sum(p[name].astype(np.float64) for p in parts) / len(parts)).astype(np.float32)
        for name in parts[0]
    }


def assert_quarantined(world: World, expert_id: str, composition_id: str) -> None:
    """Everything a quarantined output may not be: listed, found, composed, evaluated,
    downloaded by a stranger; what it may: read by its owner, moderators and workers."""
    assert world.status(expert_id) == "quarantined"
    view = world.composition(composition_id)
    assert view["status"] == "verifying"
    assert view["verification"]["state"] == "pending"
    assert expert_id not in world.listed()
    assert expert_id not in world.found(["field notes, sample 1", "field notes, sample 2"])
    for who in (None, "bob"):
        problem(world.weights_as(who, expert_id), 409, "expert_quarantined")
    problem(world.client.get(f"/v1/experts/{expert_id}/datasheet"), 409, "expert_quarantined")
    for who in ("alice", "moderator", "honest"):
        assert world.weights_as(who, expert_id).status_code == 200
    again = world.client.post(
        "/v1/compositions",
        json={"method": "mixture", "base_revision": world.revision, "experts": [expert_id]},
        headers=auth(world.secrets["alice"]),
    )
    problem(again, 409, "expert_quarantined")
    evaluation = world.client.post(
        "/v1/evaluations",
        json={"expert_id": expert_id, "text_sets": {"t": ["some text"]}},
        headers=auth(world.secrets["alice"]),
    )
    problem(evaluation, 409, "expert_quarantined")


def assert_rejected(world: World, expert_id: str, composition_id: str, cause: str) -> None:
    assert world.status(expert_id) == "rejected"
    view = world.composition(composition_id)
    assert view["status"] == "failed"
    assert view["verification"]["state"] == "refuted"
    assert cause in view["verification"]["cause"]
    assert expert_id not in world.listed()
    for who in (None, "alice", "bob"):
        problem(world.weights_as(who, expert_id), 451, "expert_disabled")
    history = world.client.get(
        f"/v1/experts/{expert_id}/moderation", headers=auth(world.secrets["moderator"])
    ).json()["items"]
    assert [(h["action"], h["status"], h["actor"]) for h in history] == [
        ("reject", "rejected", "registry")
    ]


def test_a_wrong_average_is_refuted_by_a_replica_and_never_goes_active(world: World) -> None:
    a, b = world.submit(1, "alpha"), world.submit(2, "beta")
    queued = world.compose("average", [a, b])
    job = world.lease("liar")
    assert job is not None
    assert job["kind"] == "compose.average"
    # Lie: a 0.9/0.1 blend sold as the uniform average the job asked for.
    ta, tb = world.tensors(1), world.tensors(2)
    wrong = {k: (0.9 * ta[k] + 0.1 * tb[k]).astype(np.float32) for k in ta}
    done = world.complete("liar", job, {"metrics": {}}, world.expert_bytes(wrong))
    assert done.status_code == 200, done.text
    expert_id = done.json()["result"]["expert_id"]
    composition_id = queued["composition_id"]
    assert_quarantined(world, expert_id, composition_id)

    check = world.check_job(composition_id)
    assert (check.kind, check.payload) == (job["kind"], job["payload"])
    assert check.exclude_token_id == world.token_ids["liar"]
    # Lie: the liar checks its own output; the queue never hands the check to its token.
    assert world.lease("liar") is None
    # Lie: the liar completes the check without a lease, with its own output.
    forged = world.complete(
        "liar", {"id": check.id, "fencing_token": 1}, {}, world.expert_bytes(wrong)
    )
    assert forged.status_code == 409, forged.text
    assert world.status(expert_id) == "quarantined"

    replica = world.lease("operator")
    assert replica is not None
    assert replica["id"] == check.id
    right = world.expert_bytes(uniform_average(world, 1, 2))
    checked = world.complete("operator", replica, {"metrics": {}}, right)
    assert checked.status_code == 200, checked.text
    assert checked.json()["result"]["verification"]["verdict"] == "refuted"
    assert_rejected(world, expert_id, composition_id, "tensor")
    # The liar is charged and audited; the trusted verifier is not.
    assert world.refusals("liar") == 1
    assert world.refusals("operator") == 0
    assert [e["action"] for e in world.audited("liar")] == ["output.refuted"]
    report("lying_workers.wrong_average", lies=3, accepted=0)


def test_another_jobs_output_is_refuted_and_the_other_expert_is_untouched(world: World) -> None:
    a, b, c = world.submit(1, "alpha"), world.submit(2, "beta"), world.submit(3, "gamma")
    # The operator's trusted worker computes (a, c): active at once, no check.
    first = world.compose("average", [a, c])
    job = world.lease("operator")
    assert job is not None
    honest_ac = world.expert_bytes(uniform_average(world, 1, 3))
    done = world.complete("operator", job, {}, honest_ac)
    assert done.status_code == 200, done.text
    ac = done.json()["result"]["expert_id"]
    assert world.status(ac) == "active"
    assert world.composition(first["composition_id"])["verification"] is None
    assert world.lease("honest") is None  # nothing to check

    # Lie: the liar answers (a, b) with (a, c)'s output, the same stored bytes.
    second = world.compose("average", [a, b])
    job = world.lease("liar")
    assert job is not None
    done = world.complete("liar", job, {}, honest_ac)
    assert done.status_code == 200, done.text
    ab = done.json()["result"]["expert_id"]
    assert_quarantined(world, ab, second["composition_id"])
    replica = world.lease("honest")
    assert replica is not None
    checked = world.complete(
        "honest", replica, {}, world.expert_bytes(uniform_average(world, 1, 2))
    )
    assert checked.status_code == 200, checked.text
    assert_rejected(world, ab, second["composition_id"], "tensor")
    # Both untrusted: the registry cannot tell which lied; both are charged, the liar
    # every time it lies.
    assert (world.refusals("liar"), world.refusals("honest")) == (1, 1)
    # The expert that legitimately holds those bytes is untouched.
    assert world.status(ac) == "active"
    assert world.weights_as(None, ac).content == honest_ac
    report("lying_workers.another_jobs_output", lies=1, accepted=0)


def test_an_honest_replica_makes_the_average_active(world: World) -> None:
    a, b = world.submit(1, "alpha"), world.submit(2, "beta")
    queued = world.compose("average", [a, b], texts=["alpha field notes", "beta field notes"])
    job = world.lease("honest")
    assert job is not None
    exact = uniform_average(world, 1, 2)
    metrics = {"bits_per_byte": 1.5, "base_bits_per_byte": 1.75, "bytes": 34}
    done = world.complete("honest", job, {"metrics": metrics}, world.expert_bytes(exact))
    assert done.status_code == 200, done.text
    expert_id = done.json()["result"]["expert_id"]
    assert_quarantined(world, expert_id, queued["composition_id"])
    # A second worker's replica, summed in another order: not the same bytes, the same
    # average within the tolerance, and the same bits per byte within theirs.
    close = {k: (v * np.float32(1 + 3e-6)).astype(np.float32) for k, v in exact.items()}
    replica = world.lease("operator")
    assert replica is not None
    near = {**metrics, "bits_per_byte": 1.5 * (1 + 1e-4)}
    checked = world.complete("operator", replica, {"metrics": near}, world.expert_bytes(close))
    assert checked.status_code == 200, checked.text
    assert checked.json()["result"]["verification"]["verdict"] == "confirmed"

    assert world.status(expert_id) == "active"
    view = world.composition(queued["composition_id"])
    assert (view["status"], view["verification"]["state"]) == ("ready", "confirmed")
    assert view["manifest"]["output"]["id"] == expert_id
    assert expert_id in world.listed()
    assert expert_id in world.found(["field notes, sample 1", "field notes, sample 2"])
    assert world.weights_as(None, expert_id).content == world.expert_bytes(exact)
    assert world.refusals("honest") == 0

    # With verify_worker_outputs = all, even the trusted worker's output waits for a check.
    world.app.state.runtime.settings.verify_worker_outputs = "all"
    queued = world.compose("average", [a, b])
    job = world.lease("operator")
    assert job is not None
    right = world.expert_bytes(exact)
    expert_id = world.complete("operator", job, {}, right).json()["result"]["expert_id"]
    assert world.status(expert_id) == "quarantined"
    assert world.lease("operator") is None  # its own output's replica: another worker's
    replica = world.lease("honest")
    assert replica is not None
    assert world.complete("honest", replica, {}, right).status_code == 200
    assert world.status(expert_id) == "active"
    assert world.composition(queued["composition_id"])["status"] == "ready"


def test_inflated_distill_metrics_are_refuted_by_an_evaluation(world: World) -> None:
    a = world.submit(1, "alpha")
    queued = world.compose("distill", [a], texts=["alpha field notes", "more alpha notes"])
    job = world.lease("liar")
    assert job is not None
    assert job["kind"] == "compose.distill"
    student = world.expert_bytes(world.tensors(7))
    # Lie: no claim at all, so nothing could be checked.
    problem(world.complete("liar", job, {"metrics": {}}, student), 422, "invalid_result")
    assert world.lease("honest") is None  # nothing was stored, nothing to check
    # Lie: bits per byte far better than the student achieves.
    inflated = {"bits_per_byte": 0.4, "base_bits_per_byte": 2.0, "bytes": 34}
    done = world.complete("liar", job, {"metrics": inflated}, student)
    assert done.status_code == 200, done.text
    expert_id = done.json()["result"]["expert_id"]
    assert_quarantined(world, expert_id, queued["composition_id"])

    assert world.lease("liar", ["evaluate"]) is None  # its own output's check: excluded
    check = world.lease("honest", ["evaluate"])
    assert check is not None
    assert check["payload"]["subject"]["expert"]["id"] == expert_id
    assert check["payload"]["text_sets"] == {"texts": job["payload"]["texts"]}
    measured = {"bits_per_byte": 1.9, "base_bits_per_byte": 2.0, "tokens": 12, "bytes": 34}
    checked = world.complete("honest", check, {"results": {"texts": measured}})
    assert checked.status_code == 200, checked.text
    assert_rejected(world, expert_id, queued["composition_id"], "bits_per_byte")
    # The second worker's measurement is kept as an evaluation of the expert.
    scores = world.client.get(f"/v1/experts/{expert_id}/evaluations").json()["items"]
    assert [(s["text_set"], s["bits_per_byte"]) for s in scores] == [("texts", 1.9)]
    assert world.refusals("liar") == 2  # the claim-less completion, then the refuted one
    report("lying_workers.inflated_distill", lies=3, accepted=0)


def test_an_honest_evaluation_confirms_a_distillation_and_a_dead_check_rejects_one(
    world: World,
) -> None:
    a = world.submit(1, "alpha")
    queued = world.compose("distill", [a], texts=["alpha field notes"])
    job = world.lease("liar")  # an untrusted worker that happens to tell the truth
    assert job is not None
    claim = {"bits_per_byte": 1.9, "base_bits_per_byte": 2.0, "bytes": 17}
    done = world.complete("liar", job, {"metrics": claim}, world.expert_bytes(world.tensors(7)))
    assert done.status_code == 200, done.text
    expert_id = done.json()["result"]["expert_id"]
    check = world.lease("honest", ["evaluate"])
    assert check is not None
    measured = {"bits_per_byte": 1.905, "base_bits_per_byte": 2.0, "tokens": 6, "bytes": 17}
    checked = world.complete("honest", check, {"results": {"texts": measured}})
    assert checked.status_code == 200, checked.text
    assert world.status(expert_id) == "active"
    assert world.composition(queued["composition_id"])["status"] == "ready"
    assert (world.refusals("liar"), world.refusals("honest")) == (0, 0)

    # A check its verifier cannot run ends failed: the output is rejected, nobody blamed.
    queued = world.compose("distill", [a], texts=["more alpha field notes"])
    job = world.lease("liar")
    assert job is not None
    done = world.complete("liar", job, {"metrics": claim}, world.expert_bytes(world.tensors(8)))
    expert_id = done.json()["result"]["expert_id"]
    check = world.lease("honest", ["evaluate"])
    assert check is not None
    failed = world.client.post(
        f"/v1/jobs/{check['id']}/fail",
        json={"fencing_token": check["fencing_token"], "error": "cannot load", "retryable": False},
        headers=auth(world.secrets["honest"]),
    )
    assert failed.status_code == 200, failed.text
    assert world.status(expert_id) == "rejected"
    view = world.composition(queued["composition_id"])
    assert (view["status"], view["verification"]["state"]) == ("failed", "failed")
    assert "cannot load" in view["verification"]["cause"]
    assert (world.refusals("liar"), world.refusals("honest")) == (0, 0)


def test_a_lying_verifier_cannot_make_anything_active(world: World) -> None:
    a, b = world.submit(1, "alpha"), world.submit(2, "beta")
    queued = world.compose("average", [a, b])
    job = world.lease("honest")
    assert job is not None
    done = world.complete("honest", job, {}, world.expert_bytes(uniform_average(world, 1, 2)))
    expert_id = done.json()["result"]["expert_id"]
    replica = world.lease("liar")
    assert replica is not None
    # Lie: the verifier disagrees with a right output. Nothing goes active either way.
    world.app.state.runtime.settings.worker_suspend_after_refusals = 1
    lie = world.complete("liar", replica, {}, world.expert_bytes(world.tensors(9)))
    assert lie.status_code == 200, lie.text
    assert_rejected(world, expert_id, queued["composition_id"], "tensor")
    # Between two untrusted workers the registry cannot tell who lied: both are charged
    # (here the threshold is one refusal: both are suspended), and the check job that
    # carried the lie stays recorded as it was completed, not requeued.
    assert (world.refusals("liar"), world.refusals("honest")) == (1, 1)
    problem(
        world.client.post(
            "/v1/jobs/lease", json={"worker": "liar"}, headers=auth(world.secrets["liar"])
        ),
        403,
        "token_suspended",
    )
    carried = world.check_job(queued["composition_id"])
    assert (carried.status, carried.attempts) == ("succeeded", 1)
    report("lying_workers.lying_verifier", lies=1, accepted=0)
