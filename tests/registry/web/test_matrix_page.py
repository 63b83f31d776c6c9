"""The evaluation matrix page (docs/web.md, "Matrix"), on SQLite and PostgreSQL, with the
checks on arrival on: each expert's arrival job (run here by the worker API, as a worker
would) scores it on its own samples, the diagonal. The fill form queues evaluations of
each expert on the other domains; completing those jobs fills the rest."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_base_files
from helpers.retrieval import DOMAINS, base_multipart_for, submit_domain
from sqlalchemy import select

from registry.db.models import Job
from registry.settings import Settings

Api = Any
SVG = "{http://www.w3.org/2000/svg}"
BASE_BPB = 2.0
# bits per byte an expert scores: on its own domain, on another.
OWN, OTHER = 1.6, 2.3


@pytest.fixture
def payload_limit() -> int:
    return 1024 * 1024


@pytest.fixture
def settings(database_url: str, tmp_path: Path, payload_limit: int) -> Settings:
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        arrival_checks=True,
        arrival_min_gain=0.0,
        max_job_payload_bytes=payload_limit,
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def lease(api: Api) -> dict[str, Any] | None:
    response = api.client.post(
        "/v1/jobs/lease", json={"worker": "test-worker"}, headers=auth(api.tokens.worker)
    )
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    job = response.json()["job"]
    return dict(job) if job else None


def run_jobs(api: Api) -> list[dict[str, Any]]:
    """Lease and complete every queued evaluate job: OWN on the subject's own samples, OTHER
    on any other domain, the base at BASE_BPB."""
    done = []
    while (job := lease(api)) is not None:
        subject = job["payload"]["subject"]["expert"]["id"]
        results = {
            name: {
                "bits_per_byte": OWN if name in ("samples", subject) else OTHER,
                "base_bits_per_byte": BASE_BPB,
                "tokens": 10,
                "bytes": 40,
            }
            for name in job["payload"]["text_sets"]
        }
        answer = api.client.post(
            f"/v1/jobs/{job['id']}/complete",
            json={"fencing_token": job["fencing_token"], "result": {"results": results}},
            headers=auth(api.tokens.worker),
        )
        assert answer.status_code == 200, answer.text
        done.append(job)
    return done


def seed_three(api: Api) -> dict[str, str]:
    """Three domain experts, active once their arrival checks pass: domain -> expert id."""
    ids = {d: submit_domain(api, d, seed=i + 1).id for i, d in enumerate(DOMAINS)}
    assert len(run_jobs(api)) == 3
    return ids


def heatmap(html: str) -> ET.Element:
    at = html.index('<svg id="matrix"')
    return ET.fromstring(html[at : html.index("</svg>", at) + 6])


def cells(tree: ET.Element) -> dict[tuple[str, str], tuple[ET.Element, str]]:
    """(expert, domain) -> (the filled rect, its link)."""
    out = {}
    for link in tree.iter(f"{SVG}a"):
        for rect in link.iter(f"{SVG}rect"):
            assert rect.get("class") == "cell"
            key = (rect.get("data-expert-id", ""), rect.get("data-text-set", ""))
            out[key] = (rect, link.get("href", ""))
    return out


def empties(tree: ET.Element, kind: str = "empty") -> set[tuple[str, str]]:
    """Cells without a value: ``empty``, or ``empty pending`` (an evaluation queued)."""
    return {
        (r.get("data-expert-id", ""), r.get("data-text-set", ""))
        for r in tree.iter(f"{SVG}rect")
        if r.get("class") == kind
    }


def error_code(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    found = re.search(r'<code id="error-code">([^<]+)</code>', response.text)
    assert found is not None, response.text
    return found.group(1)


def queued_jobs(api: Api) -> list[Job]:
    with api.app.state.runtime.sessions() as session:
        return list(
            session.scalars(select(Job).where(Job.status == "queued").order_by(Job.id)).all()
        )


def test_the_matrix_shows_each_filled_cell_with_its_value_and_link(api: Api) -> None:
    ids = seed_three(api)
    page = api.client.get("/matrix")  # no base: the newest base with experts
    assert page.status_code == 200
    tree = heatmap(page.text)
    filled = cells(tree)
    assert set(filled) == {(e, e) for e in ids.values()}  # the arrival checks: the diagonal
    assert len(empties(tree)) == 6
    for expert in ids.values():
        rect, href = filled[(expert, expert)]
        assert rect.get("data-value") == f"{OWN:.4f}"
        title = "".join(rect.itertext())
        assert f"{OWN:.4f} bits/byte, base {BASE_BPB:.4f} (−20.0%), version 1" in title
        anchor = re.fullmatch(rf"/experts/{expert}#(evaluation-\d+)", href)
        assert anchor is not None
        assert f'id="{anchor.group(1)}"' in api.client.get(f"/experts/{expert}").text
        assert rect.get("fill") == "#2457c5"  # the only change there is: the scale's end
    assert 'id="matrix-legend"' in page.text
    assert 'id="matrix-fill"' not in page.text  # signed out
    base_cells = [r for r in tree.iter(f"{SVG}rect") if r.get("class") == "base-cell"]
    assert {r.get("data-base-value") for r in base_cells} == {f"{BASE_BPB:.4f}"}
    row = api.client.get(f"/experts/{ids['law']}").text
    assert f'data-value="{OWN:.4f}"' in row[row.index('<table id="matrix-row"') :]


def test_fill_queues_one_evaluation_per_expert_over_its_empty_domains(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    ids = seed_three(api)
    base = api.base.revision
    csrf = web_sign_in(api.tokens.alice)
    page = api.client.get(f"/matrix?base={base}")
    assert 'id="matrix-fill-button"' in page.text

    refused = api.client.post("/matrix/fill", data={"base": base}, follow_redirects=False)
    assert error_code(refused, 403) == "csrf_failed"
    assert queued_jobs(api) == []

    answer = api.client.post(
        "/matrix/fill", data={"base": base, "csrf_token": csrf}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"/matrix?base={base}&queued=3"
    samples = {ids[d]: DOMAINS[d]["samples"] for d in DOMAINS}
    jobs = queued_jobs(api)
    assert len(jobs) == 3
    for job in jobs:
        subject = job.payload["subject"]["expert"]["id"]
        assert job.kind == "evaluate"
        assert job.created_by == "alice"
        assert job.payload["text_sets"] == {e: samples[e] for e in samples if e != subject}
    shown = api.client.get(answer.headers["location"]).text
    assert "Queued 3 evaluation jobs" in shown
    off_diagonal = {(e, d) for e in ids.values() for d in ids.values() if e != d}
    assert empties(heatmap(shown), "empty pending") == off_diagonal
    assert 'id="matrix-fill"' not in shown  # nothing left that is not on its way

    again = api.client.post(
        "/matrix/fill", data={"base": base, "csrf_token": csrf}, follow_redirects=False
    )
    assert again.headers["location"].endswith("queued=0")  # already on their way
    assert len(queued_jobs(api)) == 3
    assert "Nothing to fill" in api.client.get(again.headers["location"]).text

    run_jobs(api)
    full = api.client.get(f"/matrix?base={base}").text
    tree = heatmap(full)
    filled = cells(tree)
    assert len(filled) == 9
    assert empties(tree) == empties(tree, "empty pending") == set()
    for (expert, domain), (rect, _) in filled.items():
        value = OWN if expert == domain else OTHER
        assert rect.get("data-value") == f"{value:.4f}"
        assert f"{value:.4f} bits/byte" in "".join(rect.itertext())
    assert 'id="matrix-fill"' not in full


def test_matrix_refusals_and_empty_states(api: Api, web_sign_in: Callable[[str], str]) -> None:
    assert "No expert is active" in api.client.get("/matrix").text
    assert error_code(api.client.get("/matrix?base=0123abcd"), 404) == "base_model_not_found"
    assert error_code(api.client.get("/matrix?queued=lots"), 400) == "invalid_queued"
    # A second base, with no experts yet.
    other = make_base_files(seed=7)
    stored = api.client.post(
        "/v1/base-models", files=base_multipart_for(other), headers=auth(api.tokens.admin)
    )
    assert stored.status_code == 201, stored.text
    empty = api.client.get(f"/matrix?base={stored.json()['revision']}")
    assert empty.status_code == 200
    assert "has no active experts yet" in empty.text
    assert 'id="matrix"' not in empty.text

    web_sign_in(api.tokens.worker)  # workers run evaluations, they do not ask for them
    csrf = web_sign_in(api.tokens.worker)
    refused = api.client.post("/matrix/fill", data={"base": api.base.revision, "csrf_token": csrf})
    assert error_code(refused, 403) == "insufficient_role"


@pytest.mark.parametrize("payload_limit", [300])
def test_a_fill_too_large_for_one_job_is_a_413_that_queues_nothing(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    seed_three(api)
    csrf = web_sign_in(api.tokens.moderator)
    answer = api.client.post("/matrix/fill", data={"base": api.base.revision, "csrf_token": csrf})
    assert error_code(answer, 413) == "texts_too_large"
    assert queued_jobs(api) == []


def test_a_quarantined_expert_is_shown_to_its_owner_and_staff_only(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    waiting = submit_domain(api, "law", seed=1).id  # its arrival check not run yet
    assert error_code(api.client.get(f"/experts/{waiting}"), 404) == "expert_not_found"
    web_sign_in(api.tokens.bob)
    assert error_code(api.client.get(f"/experts/{waiting}"), 404) == "expert_not_found"
    for who in (api.tokens.alice, api.tokens.moderator):
        web_sign_in(who)
        page = api.client.get(f"/experts/{waiting}")
        assert page.status_code == 200
        assert re.search(r'id="expert-status"[^>]*>quarantined<', page.text)
    assert "No expert is active" in api.client.get("/matrix").text
