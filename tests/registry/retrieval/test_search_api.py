"""POST /v1/search and moderation through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import math

import pytest
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from helpers.retrieval import (
    DOMAINS,
    base_multipart_for,
    expert_status,
    search,
    submit_domain,
)
from sqlalchemy import select

from registry.db.models import ModerationAction

PROBLEM = "application/problem+json"


def test_texts_retrieve_their_domains_expert_first(api, experts) -> None:
    for domain, spec in DOMAINS.items():
        response = search(api, spec["queries"], k=3)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["embedder"].startswith("hashing-")
        results = body["results"]
        assert results[0]["expert_id"] == experts[domain].id, (domain, results)
        assert len(results) == 3
        assert results[0]["name"] == f"{domain.capitalize()} expert"
        assert results[0]["version"] == 1
        scores = [r["score"] for r in results]
        weights = [r["weight"] for r in results]
        assert scores == sorted(scores, reverse=True)
        assert weights == sorted(weights, reverse=True)
        assert math.isclose(sum(weights), 1.0, rel_tol=1e-6)
        # c-BTM: weight ~ exp(-d^2 / T) with d the distance of unit vectors.
        for r in results:
            assert math.isclose(r["distance"] ** 2, 2 - 2 * r["score"], abs_tol=1e-5)
        ratio = weights[1] / weights[0]
        expected = math.exp(-(results[1]["distance"] ** 2 - results[0]["distance"] ** 2) / 0.1)
        assert math.isclose(ratio, expected, rel_tol=1e-4)


def test_temperature_flattens_the_weights(api, experts) -> None:
    sharp = search(api, DOMAINS["law"]["queries"], k=3, temperature=0.01).json()["results"]
    flat = search(api, DOMAINS["law"]["queries"], k=3, temperature=10.0).json()["results"]
    assert sharp[0]["weight"] > 0.99
    assert max(r["weight"] for r in flat) < 0.4


def test_disabled_expert_vanishes_at_once_and_returns_when_enabled(api, experts) -> None:
    law = experts["law"].id
    queries = DOMAINS["law"]["queries"]
    before = search(api, queries, k=3).json()["results"]
    assert before[0]["expert_id"] == law

    moderator = api.auth(api.tokens.moderator)
    response = api.client.post(
        f"/v1/experts/{law}/disable", json={"reason": "license violation"}, headers=moderator
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "disabled"
    assert response.json()["actor"] == "moderator"
    after = search(api, queries, k=3).json()["results"]
    assert law not in [r["expert_id"] for r in after]
    assert len(after) == 2
    assert expert_status(api, law) == "disabled"
    assert api.client.get(f"/v1/experts/{law}/datasheet").status_code == 451

    response = api.client.post(
        f"/v1/experts/{law}/enable", json={"reason": "license clarified"}, headers=moderator
    )
    assert response.status_code == 200, response.text
    again = search(api, queries, k=3).json()["results"]
    assert again[0]["expert_id"] == law
    assert again[0]["score"] == pytest.approx(before[0]["score"], abs=1e-6)

    listing = api.client.get(f"/v1/experts/{law}/moderation", headers=moderator).json()["items"]
    assert [(a["action"], a["reason"], a["actor"]) for a in listing] == [
        ("disable", "license violation", "moderator"),
        ("enable", "license clarified", "moderator"),
    ]
    with api.app.state.runtime.sessions() as session:
        rows = list(session.scalars(select(ModerationAction).order_by(ModerationAction.id)))
    assert [r.action for r in rows] == ["disable", "enable"]


@pytest.mark.parametrize(
    ("token", "body", "status", "code"),
    [
        ("alice", {"reason": "spam"}, 403, "insufficient_role"),
        (None, {"reason": "spam"}, 401, "missing_token"),
        ("moderator", {}, 400, "missing_reason"),
        ("moderator", None, 400, "missing_reason"),
        ("moderator", {"reason": "   "}, 400, "missing_reason"),
        ("admin", {"reason": "x" * 2001}, 400, "reason_too_long"),
    ],
)
def test_moderation_refusals(api, token, body, status, code) -> None:
    expert = submit_domain(api, "cooking", seed=0).id
    headers = api.auth(getattr(api.tokens, token)) if token else {}
    response = api.client.post(f"/v1/experts/{expert}/disable", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == code
    assert expert_status(api, expert) == "active"
    top = search(api, DOMAINS["cooking"]["queries"], k=1).json()["results"]
    assert top[0]["expert_id"] == expert


def test_moderation_state_conflicts(api, experts) -> None:
    expert = experts["astronomy"].id
    admin = api.auth(api.tokens.admin)
    enable = api.client.post(f"/v1/experts/{expert}/enable", json={"reason": "x"}, headers=admin)
    assert enable.status_code == 409
    assert enable.json()["code"] == "status_unchanged"
    missing = api.client.post("/v1/experts/ex_nope/disable", json={"reason": "x"}, headers=admin)
    assert missing.status_code == 404
    assert missing.json()["code"] == "expert_not_found"


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"k": 0}, 400, "invalid_k"),
        ({"k": 65}, 400, "invalid_k"),
        ({"texts": []}, 400, "empty_texts"),
        ({"texts": ["  ", "\n"]}, 400, "empty_texts"),
        ({"texts": ["a" * (64 * 1024 + 1)]}, 413, "texts_too_large"),
        ({"texts": ["word"] * 257}, 413, "too_many_texts"),
        ({"temperature": 0}, 400, "invalid_temperature"),
        ({"base_revision": "0" * 64}, 404, "base_model_not_found"),
        ({"texts": "not a list"}, 400, "invalid_request"),
        ({"k": "many"}, 400, "invalid_request"),
    ],
)
def test_bad_search_requests_are_problems(api, change, status, code) -> None:
    body = {"texts": ["bake the bread"], "base_revision": api.base.revision, "k": 4, **change}
    response = api.client.post("/v1/search", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status


def test_missing_base_revision_field(api) -> None:
    response = api.client.post("/v1/search", json={"texts": ["bread"]})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_only_experts_of_the_requested_base(api, experts) -> None:
    other_files = make_base_files(seed=7)
    response = api.client.post(
        "/v1/base-models", files=base_multipart_for(other_files), headers=api.auth(api.tokens.admin)
    )
    assert response.status_code == 201, response.text
    other = response.json()
    weights = make_expert_bytes(other["expert_schema"], base_revision=other["revision"])
    response = api.submit(
        weights=weights,
        datasheet=make_datasheet(samples=DOMAINS["law"]["samples"], name="Other law"),
        base_revision=other["revision"],
    )
    assert response.status_code == 201, response.text
    other_id = response.json()["id"]

    mine = search(api, DOMAINS["law"]["queries"], k=10).json()["results"]
    assert other_id not in [r["expert_id"] for r in mine]
    assert {r["expert_id"] for r in mine} == {e.id for e in experts.values()}
    theirs = search(api, DOMAINS["law"]["queries"], k=10, base_revision=other["revision"])
    assert [r["expert_id"] for r in theirs.json()["results"]] == [other_id]


def test_a_new_version_is_searched_by_its_own_samples(api, experts) -> None:
    cooking = experts["cooking"]
    before = search(api, DOMAINS["cooking"]["queries"], k=1).json()["results"][0]
    assert before["expert_id"] == cooking.id
    v2 = submit_domain(api, "astronomy", seed=11, expert_id=cooking.id)
    assert v2.version == 2
    results = search(api, DOMAINS["astronomy"]["queries"], k=2).json()["results"]
    assert {r["expert_id"] for r in results} == {cooking.id, experts["astronomy"].id}
    mine = next(r for r in results if r["expert_id"] == cooking.id)
    assert mine["version"] == 2
    # Its old (cooking) vectors are gone, not kept beside the new ones.
    now = search(api, DOMAINS["cooking"]["queries"], k=3).json()["results"]
    assert next(r for r in now if r["expert_id"] == cooking.id)["score"] < before["score"] - 0.1


def test_a_retried_disable_replays_instead_of_conflicting(api) -> None:
    """The SDK retries a POST with the same Idempotency-Key when a response is lost: the
    retry gets the first answer, not 409 status_unchanged, and one action is recorded."""
    expert = submit_domain(api, "law", seed=0).id
    headers = {**api.auth(api.tokens.moderator), "Idempotency-Key": "disable-once"}
    body = {"reason": "court order"}
    first = api.client.post(f"/v1/experts/{expert}/disable", json=body, headers=headers)
    again = api.client.post(f"/v1/experts/{expert}/disable", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    other = api.client.post(
        f"/v1/experts/{expert}/disable", json={"reason": "other"}, headers=headers
    )
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_key_reused"
    with api.app.state.runtime.sessions() as session:
        assert len(list(session.scalars(select(ModerationAction)))) == 1
