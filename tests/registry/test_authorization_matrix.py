"""The authorization matrix: every operation of the OpenAPI document, called by every kind
of caller, answers exactly what ``TABLE`` says (docs/governance.md, "Authorization").

``TABLE`` is the one place that says who may call what. An operation the app serves but
the table does not name fails ``test_operation`` for that operation, and so does a row
whose operation the app no longer serves: a new route needs its row (and a ``CALLS``
entry that makes a real request of it) before the suite passes.

Each operation is called with real objects (alice's expert, her report, her
composition's job, a job the worker holds), made fresh for each caller where the call
changes them (a disable, a withdrawal, a revocation), so that an ownership check is
really exercised: alice's expert is hers, not bob's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_datasheet

from registry.app import create_app
from registry.services.tokens import create_token, revoke_token
from registry.settings import Settings

Api = Any  # tests/registry/conftest.py's Api: an app, its client, tokens and base model


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the table ---------------------------------------------------------------------------
#
# One outcome per caller, in the order of CALLERS: OK is a 2xx answer (the call went
# through every check and did its work); any other entry is the problem code the call is
# refused with, at the status STATUS_OF gives it.
OK = "ok"
NO_TOKEN = "missing_token"  # 401: the operation needs a bearer token
ROLE = "insufficient_role"  # 403: the token's role may not do this
OWNER = "not_owner"  # 403: someone else's expert (a new version, a withdrawal) or job
REPORTER = "not_reporter"  # 403: someone else's report
HOLDER = "not_lease_holder"  # 403: a job leased by another token
DISABLED = "expert_disabled"  # 451: withdrawn from everyone but moderators and admins
QUARANTINED = "expert_quarantined"  # 409: awaiting its check; its owner and staff read it
# 409: the owner's restore does not undo a moderator's disable (only an enable does).
UNCHANGED = "status_unchanged"

STATUS_OF = {
    NO_TOKEN: 401,
    "invalid_token": 401,
    "invalid_authorization": 401,
    ROLE: 403,
    OWNER: 403,
    REPORTER: 403,
    HOLDER: 403,
    DISABLED: 451,
    QUARANTINED: 409,
    UNCHANGED: 409,
}

# alice and bob are contributors; the objects below are alice's.
CALLERS = ("anonymous", "alice", "bob", "moderator", "admin", "worker")

# A credential that is sent and fails is a 401 on every operation, public reads included,
# before the route runs (registry/api/deps.py): a revoked token (alice's own), a token
# that never existed, and alice's real secret without the `Bearer` scheme.
BROKEN = {
    "revoked": "invalid_token",
    "malformed": "invalid_token",
    "odd_header": "invalid_authorization",
}

# "METHOD /path" (as the OpenAPI document has it), or "METHOD /path | variant" where one
# operation answers differently depending on what it is asked (another row of the same
# operation).
# One row per line, its columns aligned:
# fmt: off
TABLE: dict[str, tuple[str, str, str, str, str, str]] = {
    #    anonymous    alice      bob          moderator admin      worker
    "GET /healthz":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /readyz":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /metrics":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "POST /v1/base-models":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     OK,        ROLE),
    "GET /v1/base-models":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/base-models/{revision}":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "HEAD /v1/base-models/{revision}/files/{field}":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/base-models/{revision}/files/{field}":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "POST /v1/search":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "POST /v1/experts | a new expert":
        (NO_TOKEN,    OK,        OK,          ROLE,     OK,        ROLE),
    "POST /v1/experts | a new version of alice's expert":
        (NO_TOKEN,    OK,        OWNER,       ROLE,     OK,        ROLE),
    "GET /v1/experts":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts | ?status=disabled":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/experts/{expert_id}":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/versions":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/datasheet":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/datasheet | disabled":
        (DISABLED,    DISABLED,  DISABLED,    OK,       OK,        DISABLED),
    "GET /v1/experts/{expert_id}/datasheet | quarantined":
        (QUARANTINED, OK,        QUARANTINED, OK,       OK,        OK),
    "HEAD /v1/experts/{expert_id}/weights":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "HEAD /v1/experts/{expert_id}/weights | disabled":
        (DISABLED,    DISABLED,  DISABLED,    OK,       OK,        DISABLED),
    "HEAD /v1/experts/{expert_id}/weights | quarantined":
        (QUARANTINED, OK,        QUARANTINED, OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/weights":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/weights | disabled":
        (DISABLED,    DISABLED,  DISABLED,    OK,       OK,        DISABLED),
    "GET /v1/experts/{expert_id}/weights | quarantined":
        (QUARANTINED, OK,        QUARANTINED, OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/evaluations":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/lineage":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/experts/{expert_id}/forgetting":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "POST /v1/experts/{expert_id}/disable":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/experts/{expert_id}/enable":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/experts/{expert_id}/withdraw":
        (NO_TOKEN,    OK,        OWNER,       ROLE,     OK,        ROLE),
    "POST /v1/experts/{expert_id}/restore":
        (NO_TOKEN,    OK,        OWNER,       ROLE,     OK,        ROLE),
    "POST /v1/experts/{expert_id}/restore | disabled by a moderator":
        (NO_TOKEN,    UNCHANGED, OWNER,       ROLE,     UNCHANGED, ROLE),
    "GET /v1/experts/{expert_id}/moderation":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/experts/{expert_id}/reports":
        (NO_TOKEN,    OK,        OK,          OK,       OK,        OK),
    "GET /v1/reports":
        (NO_TOKEN,    OK,        OK,          OK,       OK,        OK),
    "GET /v1/reports/{report_id}":
        (NO_TOKEN,    OK,        REPORTER,    OK,       OK,        REPORTER),
    "POST /v1/reports/{report_id}/resolve":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/compositions":
        (NO_TOKEN,    OK,        OK,          OK,       OK,        ROLE),
    "GET /v1/compositions/{composition_id}":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "GET /v1/compositions/{composition_id}/evaluations":
        (OK,          OK,        OK,          OK,       OK,        OK),
    "POST /v1/evaluations":
        (NO_TOKEN,    OK,        OK,          OK,       OK,        ROLE),
    "POST /v1/jobs/lease":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     OK,        OK),
    "POST /v1/jobs/{job_id}/heartbeat":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     HOLDER,    OK),
    "POST /v1/jobs/{job_id}/fail":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     HOLDER,    OK),
    "POST /v1/jobs/{job_id}/complete":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     HOLDER,    OK),
    "GET /v1/jobs/{job_id}":
        (NO_TOKEN,    OK,        OWNER,       OK,       OK,        OK),
    "GET /v1/jobs":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/audit":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/audit/verify":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/text-sets":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/text-sets":
        (NO_TOKEN,    OK,        OK,          OK,       OK,        OK),
    "GET /v1/text-sets/{text_set_id}":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "DELETE /v1/text-sets/{text_set_id}":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "POST /v1/monitoring/schedules":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/monitoring/schedules":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "DELETE /v1/monitoring/schedules/{schedule_id}":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/monitoring/runs":
        (NO_TOKEN,    ROLE,      ROLE,        OK,       OK,        ROLE),
    "GET /v1/tokens":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     OK,        ROLE),
    "POST /v1/tokens":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     OK,        ROLE),
    "DELETE /v1/tokens/{token_id}":
        (NO_TOKEN,    ROLE,      ROLE,        ROLE,     OK,        ROLE),
}
# fmt: on


def operation_of(key: str) -> str:
    return key.split(" | ", maxsplit=1)[0]


# -- the world the calls are made in ---------------------------------------------------


@dataclass
class Call:
    method: str
    url: str
    json: Any = None
    files: dict[str, tuple[str, bytes]] | None = None
    data: dict[str, str] | None = None


@dataclass
class World:
    """An app with a base model, the callers' tokens and alice's objects, made on first
    use; ``fresh_*`` make a new one for each caller of an operation that changes it."""

    api: Api
    revoked: str
    seeds: Iterator[int] = field(default_factory=lambda: iter(range(100, 10_000)))

    def headers(self, caller: str) -> dict[str, str]:
        if caller == "anonymous":
            return {}
        if caller == "revoked":
            return auth(self.revoked)
        if caller == "malformed":
            return {"Authorization": "Bearer not-a-token"}
        if caller == "odd_header":
            return {"Authorization": self.api.tokens.alice}
        return auth(getattr(self.api.tokens, caller))

    def send(self, call: Call, caller: str) -> Any:
        return self.api.client.request(
            call.method,
            call.url,
            json=call.json,
            files=call.files,
            data=call.data,
            headers=self.headers(caller),
        )

    def as_(self, caller: str, method: str, url: str, **kwargs: Any) -> Any:
        response = self.api.client.request(method, url, headers=self.headers(caller), **kwargs)
        assert response.status_code < 300, (method, url, response.status_code, response.text)
        return response.json() if response.content else None

    # alice's objects

    def fresh_expert(self) -> str:
        seed = next(self.seeds)
        response = self.api.submit(
            self.api.tokens.alice,
            weights=self.api.expert_bytes(seed=seed),
            datasheet=make_datasheet(name=f"matrix {seed}", samples=[f"tide pool {seed}"]),
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    @cached_property
    def expert(self) -> str:
        return self.fresh_expert()

    def fresh_disabled_expert(self) -> str:
        expert = self.fresh_expert()
        self.as_("moderator", "POST", f"/v1/experts/{expert}/disable", json={"reason": "r"})
        return expert

    @cached_property
    def disabled_expert(self) -> str:
        return self.fresh_disabled_expert()

    @cached_property
    def quarantined_expert(self) -> str:
        """alice's, submitted while checks on arrival are on: it awaits its check."""
        runtime = self.api.app.state.runtime
        settings = runtime.settings
        runtime.settings = settings.model_copy(update={"arrival_checks": True})
        try:
            expert = self.fresh_expert()
        finally:
            runtime.settings = settings
        assert self.as_("moderator", "GET", f"/v1/experts/{expert}")["status"] == "quarantined"
        return expert

    def fresh_withdrawn_expert(self) -> str:
        expert = self.fresh_expert()
        self.as_("alice", "POST", f"/v1/experts/{expert}/withdraw", json={})
        return expert

    def fresh_report(self) -> int:
        body = {"reason": "copies a paywalled corpus"}
        report = self.as_("alice", "POST", f"/v1/experts/{self.expert}/reports", json=body)
        return int(report["id"])

    @cached_property
    def report(self) -> int:
        return self.fresh_report()

    def fresh_composition(self) -> dict[str, Any]:
        """alice's mixture of her expert: a queued job, and its composition."""
        body = {"method": "mixture", "experts": [self.expert], "base_revision": self.base}
        return dict(self.as_("alice", "POST", "/v1/compositions", json=body))

    @cached_property
    def composition(self) -> dict[str, Any]:
        return self.fresh_composition()

    def fresh_leased_job(self) -> dict[str, Any]:
        """A mixture job the worker holds (the oldest runnable one: this one)."""
        self.fresh_composition()
        body = {"worker": "matrix", "kinds": ["compose.mixture"]}
        leased = self.as_("worker", "POST", "/v1/jobs/lease", json=body)
        return dict(leased["job"])

    def queued_then(self, call: Call) -> Call:
        """``call``, once a new job waits in the queue: an allowed caller leases it (200),
        not nothing (204)."""
        self.fresh_composition()
        return call

    def fresh_text_set(self) -> int:
        body = {"name": f"news-{next(self.seeds)}", "date": "2026-12-01", "texts": ["tide"]}
        return int(self.as_("moderator", "POST", "/v1/text-sets", json=body)["id"])

    @cached_property
    def text_set(self) -> int:
        return self.fresh_text_set()

    def fresh_schedule(self) -> int:
        self.expert  # noqa: B018 (an active expert for the schedule to run on)
        return int(self.as_("moderator", "POST", "/v1/monitoring/schedules", json={})["id"])

    def fresh_token(self) -> int:
        with self.api.app.state.runtime.sessions() as session, session.begin():
            row, _ = create_token(session=session, name="carol", role="contributor")
            return int(row.id)

    @property
    def base(self) -> str:
        return self.api.base.revision

    def new_expert_form(self, *, expert_id: str | None = None) -> Call:
        seed = next(self.seeds)
        data = {"base_revision": self.base}
        if expert_id is not None:
            data["expert_id"] = expert_id
        files = {
            "weights": ("expert.safetensors", self.api.expert_bytes(seed=seed)),
            "datasheet": ("DATASHEET.md", make_datasheet(name=f"matrix {seed}")),
        }
        return Call("POST", "/v1/experts", files=files, data=data)


def _ex(w: World) -> str:
    return f"/v1/experts/{w.expert}"


def _job_call(action: str, body: Callable[[dict[str, Any]], dict[str, Any]]) -> CallMaker:
    def make(w: World, caller: str) -> Call:
        job = w.fresh_leased_job()
        return Call("POST", f"/v1/jobs/{job['id']}/{action}", json=body(job))

    return make


CallMaker = Callable[[World, str], Call]

# How each row is called: a real request, with real objects, for the caller given.
CALLS: dict[str, CallMaker] = {
    "GET /healthz": lambda w, c: Call("GET", "/healthz"),
    "GET /readyz": lambda w, c: Call("GET", "/readyz"),
    "GET /metrics": lambda w, c: Call("GET", "/metrics"),
    # The same files again: an admin is answered 200 with the stored revision.
    "POST /v1/base-models": lambda w, c: Call(
        "POST",
        "/v1/base-models",
        files={
            field: (name, w.api.base.files[name])
            for field, name in [
                ("config", "config.json"),
                ("tokenizer", "tokenizer.json"),
                ("weights", "model.safetensors"),
            ]
        },
    ),
    "GET /v1/base-models": lambda w, c: Call("GET", "/v1/base-models"),
    "GET /v1/base-models/{revision}": lambda w, c: Call("GET", f"/v1/base-models/{w.base}"),
    "HEAD /v1/base-models/{revision}/files/{field}": lambda w, c: Call(
        "HEAD", f"/v1/base-models/{w.base}/files/config"
    ),
    "GET /v1/base-models/{revision}/files/{field}": lambda w, c: Call(
        "GET", f"/v1/base-models/{w.base}/files/tokenizer"
    ),
    "POST /v1/search": lambda w, c: Call(
        "POST", "/v1/search", json={"texts": ["tide pool notes"], "base_revision": w.base}
    ),
    "POST /v1/experts | a new expert": lambda w, c: w.new_expert_form(),
    "POST /v1/experts | a new version of alice's expert": lambda w, c: w.new_expert_form(
        expert_id=w.expert
    ),
    "GET /v1/experts": lambda w, c: Call("GET", "/v1/experts"),
    "GET /v1/experts | ?status=disabled": lambda w, c: Call("GET", "/v1/experts?status=disabled"),
    "GET /v1/experts/{expert_id}": lambda w, c: Call("GET", _ex(w)),
    "GET /v1/experts/{expert_id}/versions": lambda w, c: Call("GET", f"{_ex(w)}/versions"),
    "GET /v1/experts/{expert_id}/datasheet": lambda w, c: Call("GET", f"{_ex(w)}/datasheet"),
    "GET /v1/experts/{expert_id}/datasheet | disabled": lambda w, c: Call(
        "GET", f"/v1/experts/{w.disabled_expert}/datasheet"
    ),
    "GET /v1/experts/{expert_id}/datasheet | quarantined": lambda w, c: Call(
        "GET", f"/v1/experts/{w.quarantined_expert}/datasheet"
    ),
    "HEAD /v1/experts/{expert_id}/weights": lambda w, c: Call("HEAD", f"{_ex(w)}/weights"),
    "HEAD /v1/experts/{expert_id}/weights | disabled": lambda w, c: Call(
        "HEAD", f"/v1/experts/{w.disabled_expert}/weights"
    ),
    "HEAD /v1/experts/{expert_id}/weights | quarantined": lambda w, c: Call(
        "HEAD", f"/v1/experts/{w.quarantined_expert}/weights"
    ),
    "GET /v1/experts/{expert_id}/weights": lambda w, c: Call("GET", f"{_ex(w)}/weights"),
    "GET /v1/experts/{expert_id}/weights | disabled": lambda w, c: Call(
        "GET", f"/v1/experts/{w.disabled_expert}/weights"
    ),
    "GET /v1/experts/{expert_id}/weights | quarantined": lambda w, c: Call(
        "GET", f"/v1/experts/{w.quarantined_expert}/weights"
    ),
    "GET /v1/experts/{expert_id}/evaluations": lambda w, c: Call("GET", f"{_ex(w)}/evaluations"),
    "GET /v1/experts/{expert_id}/lineage": lambda w, c: Call("GET", f"{_ex(w)}/lineage"),
    "GET /v1/experts/{expert_id}/forgetting": lambda w, c: Call("GET", f"{_ex(w)}/forgetting"),
    "POST /v1/experts/{expert_id}/disable": lambda w, c: Call(
        "POST", f"/v1/experts/{w.fresh_expert()}/disable", json={"reason": "matrix"}
    ),
    "POST /v1/experts/{expert_id}/enable": lambda w, c: Call(
        "POST", f"/v1/experts/{w.fresh_disabled_expert()}/enable", json={"reason": "matrix"}
    ),
    "POST /v1/experts/{expert_id}/withdraw": lambda w, c: Call(
        "POST", f"/v1/experts/{w.fresh_expert()}/withdraw", json={"reason": "matrix"}
    ),
    "POST /v1/experts/{expert_id}/restore": lambda w, c: Call(
        "POST", f"/v1/experts/{w.fresh_withdrawn_expert()}/restore", json={}
    ),
    "POST /v1/experts/{expert_id}/restore | disabled by a moderator": lambda w, c: Call(
        "POST", f"/v1/experts/{w.disabled_expert}/restore", json={}
    ),
    "GET /v1/experts/{expert_id}/moderation": lambda w, c: Call("GET", f"{_ex(w)}/moderation"),
    "POST /v1/experts/{expert_id}/reports": lambda w, c: Call(
        "POST", f"{_ex(w)}/reports", json={"reason": "spam", "evidence": "see sample 3"}
    ),
    "GET /v1/reports": lambda w, c: Call("GET", "/v1/reports"),
    "GET /v1/reports/{report_id}": lambda w, c: Call("GET", f"/v1/reports/{w.report}"),
    "POST /v1/reports/{report_id}/resolve": lambda w, c: Call(
        "POST", f"/v1/reports/{w.fresh_report()}/resolve", json={"resolution": "dismiss"}
    ),
    "POST /v1/compositions": lambda w, c: Call(
        "POST",
        "/v1/compositions",
        json={"method": "mixture", "experts": [w.expert], "base_revision": w.base},
    ),
    "GET /v1/compositions/{composition_id}": lambda w, c: Call(
        "GET", f"/v1/compositions/{w.composition['composition_id']}"
    ),
    "GET /v1/compositions/{composition_id}/evaluations": lambda w, c: Call(
        "GET", f"/v1/compositions/{w.composition['composition_id']}/evaluations"
    ),
    "POST /v1/evaluations": lambda w, c: Call(
        "POST",
        "/v1/evaluations",
        json={"expert_id": w.expert, "text_sets": {"news": ["the tide came in"]}},
    ),
    "POST /v1/jobs/lease": lambda w, c: w.queued_then(
        Call("POST", "/v1/jobs/lease", json={"worker": f"matrix-{c}"})
    ),
    "POST /v1/jobs/{job_id}/heartbeat": _job_call(
        "heartbeat", lambda job: {"fencing_token": job["fencing_token"]}
    ),
    "POST /v1/jobs/{job_id}/fail": _job_call(
        "fail", lambda job: {"fencing_token": job["fencing_token"], "release": True}
    ),
    # A mixture's result: the weights of its one expert.
    "POST /v1/jobs/{job_id}/complete": _job_call(
        "complete", lambda job: {"fencing_token": job["fencing_token"], "result": {"weights": [1]}}
    ),
    "GET /v1/jobs/{job_id}": lambda w, c: Call("GET", f"/v1/jobs/{w.composition['job_id']}"),
    "GET /v1/jobs": lambda w, c: Call("GET", "/v1/jobs"),
    "GET /v1/audit": lambda w, c: Call("GET", "/v1/audit"),
    "GET /v1/audit/verify": lambda w, c: Call("GET", "/v1/audit/verify"),
    "POST /v1/text-sets": lambda w, c: Call(
        "POST",
        "/v1/text-sets",
        json={"name": f"news-{next(w.seeds)}", "date": "2026-12-02", "texts": ["the tide"]},
    ),
    "GET /v1/text-sets": lambda w, c: Call("GET", "/v1/text-sets"),
    "GET /v1/text-sets/{text_set_id}": lambda w, c: Call("GET", f"/v1/text-sets/{w.text_set}"),
    "DELETE /v1/text-sets/{text_set_id}": lambda w, c: Call(
        "DELETE", f"/v1/text-sets/{w.fresh_text_set()}"
    ),
    "POST /v1/monitoring/schedules": lambda w, c: Call("POST", "/v1/monitoring/schedules", json={}),
    "GET /v1/monitoring/schedules": lambda w, c: Call("GET", "/v1/monitoring/schedules"),
    "DELETE /v1/monitoring/schedules/{schedule_id}": lambda w, c: Call(
        "DELETE", f"/v1/monitoring/schedules/{w.fresh_schedule()}"
    ),
    "GET /v1/monitoring/runs": lambda w, c: Call("GET", "/v1/monitoring/runs"),
    "GET /v1/tokens": lambda w, c: Call("GET", "/v1/tokens"),
    "POST /v1/tokens": lambda w, c: Call(
        "POST", "/v1/tokens", json={"name": "dave", "role": "contributor"}
    ),
    # Never a token this test calls with: a new one for each caller.
    "DELETE /v1/tokens/{token_id}": lambda w, c: Call("DELETE", f"/v1/tokens/{w.fresh_token()}"),
}


# -- the operations the app serves --------------------------------------------------------


def _served_operations() -> list[str]:
    """Every operation of the app's OpenAPI document, "METHOD /path" (no database needed:
    the document is built from the routes)."""
    app = create_app(Settings(data_dir=Path("/nonexistent"), database_url="sqlite://"))
    return [
        f"{method.upper()} {path}"
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]


SERVED = _served_operations()
OPERATIONS = sorted(set(SERVED) | {operation_of(key) for key in TABLE})


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # A few hundred calls in a row: rate limits are not what this test looks at.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )


@pytest.fixture
def world(api: Api) -> World:
    with api.app.state.runtime.sessions() as session, session.begin():
        # alice's own, revoked: refused everywhere, even on her own objects.
        row, secret = create_token(session=session, name="alice", role="contributor")
        revoke_token(session=session, token_id=row.id)
    return World(api=api, revoked=secret)


def check(response: Any, expected: str, where: str) -> None:
    status = response.status_code
    assert status < 500, (where, status, response.text)
    if expected == OK:
        assert 200 <= status < 300, (where, "expected a 2xx", status, response.text)
        return
    assert status == STATUS_OF[expected], (where, f"expected {expected}", status, response.text)
    if response.request.method != "HEAD":
        assert response.headers["content-type"] == "application/problem+json", where
        assert response.json()["code"] == expected, (where, response.text)
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer"), where


def test_the_table_is_complete() -> None:
    assert set(CALLS) == set(TABLE), set(CALLS) ^ set(TABLE)
    assert len(SERVED) == len(set(SERVED))
    assert all(len(row) == len(CALLERS) for row in TABLE.values())
    assert {e for row in TABLE.values() for e in row} <= {OK, *STATUS_OF}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operation(operation: str, world: World) -> None:
    assert operation in SERVED, (
        f"TABLE names {operation}, which the app's OpenAPI document no longer has: "
        "remove its rows from TABLE and CALLS"
    )
    keys = [key for key in TABLE if operation_of(key) == operation]
    assert keys, (
        f"{operation} is in the OpenAPI document but not in TABLE: add its row (who may call "
        "it) to TABLE, and a CALLS entry that makes a real request of it"
    )
    w = world
    for key in keys:
        row = dict(zip(CALLERS, TABLE[key], strict=True))
        # Refused before the route runs: one call serves the broken credentials and the
        # anonymous caller (last, as on public reads it is served).
        shared = CALLS[key](w, "anonymous")
        for caller, code in BROKEN.items():
            check(w.send(shared, caller), code, f"{key} as {caller}")
        check(w.send(shared, "anonymous"), row["anonymous"], f"{key} as anonymous")
        for caller in CALLERS[1:]:
            check(w.send(CALLS[key](w, caller), caller), row[caller], f"{key} as {caller}")


# -- a revoked token is refused from its next request on ----------------------------------


def test_a_token_revoked_through_the_api_is_refused_on_its_next_request(world: World) -> None:
    api = world.api
    made = world.as_("admin", "POST", "/v1/tokens", json={"name": "erin", "role": "contributor"})
    erin = auth(made["secret"])
    report = {"reason": "mislabelled domain"}
    filed = api.client.post(f"{_ex(world)}/reports", json=report, headers=erin)
    assert filed.status_code == 201, filed.text
    assert api.client.get("/v1/reports", headers=erin).json()["items"][0]["reporter"] == "erin"
    revoked = world.as_("admin", "DELETE", f"/v1/tokens/{made['id']}")
    assert revoked["revoked_at"] is not None
    for response in (
        api.client.get("/v1/reports", headers=erin),
        api.client.post(f"{_ex(world)}/reports", json=report, headers=erin),
        # Public reads too: a client that sent a credential learns it failed.
        api.client.get(_ex(world), headers=erin),
    ):
        check(response, "invalid_token", "erin's revoked token")
    # One report: the refused one was not stored.
    mine = world.as_("moderator", "GET", "/v1/reports")["items"]
    assert [r["reporter"] for r in mine] == ["erin"]
    listed = world.as_("admin", "GET", "/v1/tokens")["items"]
    assert [t["revoked_at"] is not None for t in listed if t["name"] == "erin"] == [True]
    assert json.dumps(listed).count(made["secret"]) == 0
