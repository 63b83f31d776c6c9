"""The home page (registry/web/home.py): the registry's counts, the search form and its
results, and requesting an ensemble from them (POST /compose), on SQLite and PostgreSQL.

Experts are submitted through the real API (helpers.retrieval); the hashing embedder is
the search's (tests/conftest.py)."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from typing import Any

import pytest
from helpers.retrieval import DOMAINS, submit_domain
from sqlalchemy import func, select, update

from registry.db.models import Composition, Job, JobResult
from registry.settings import Settings

Api = Any
MAX_K = 64  # Settings.search_max_k's default
# Small enough that a text over it still fits in a test client's URL.
MAX_TEXT_BYTES = 4096


@pytest.fixture
def settings(database_url: str, tmp_path: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        search_max_text_bytes=MAX_TEXT_BYTES,
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def counts(page: Any) -> dict[str, int]:
    section = page.find(id="counts")
    return {
        card.attrs["data-count"]: int(card.find(class_="n").text)
        for card in section.find_all(class_="card")
    }


def count_rows(api: Api, model: Any) -> int:
    with api.app.state.runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def search_page(api: Api, text: str, **params: Any) -> Any:
    return api.client.get("/", params={"text": text, "base": api.base.revision, **params})


def lease_as(api: Api, worker: str) -> dict[str, Any]:
    response = api.client.post(
        "/v1/jobs/lease", json={"worker": worker}, headers=auth(api.tokens.worker)
    )
    assert response.status_code == 200, response.text
    return dict(response.json()["job"])


def queue_ensemble(api: Api, expert_id: str) -> dict[str, Any]:
    response = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "ensemble", "experts": [expert_id]},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def compose_form(page: Any) -> dict[str, str]:
    form = page.find(id="compose")
    assert form.attrs["method"] == "post"
    assert form.attrs["action"] == "/compose"
    return {field.attrs["name"]: field.attrs["value"] for field in form.find_all("input")}


# -- counts ----------------------------------------------------------------------------------


def test_counts_are_the_registrys_numbers(api: Api, web_html) -> None:
    cooking = submit_domain(api, "cooking", seed=1)
    submit_domain(api, "law", seed=2)
    page = web_html(api.client.get("/").text)
    assert counts(page) == {
        "base_revisions": 1,
        "active_experts": 2,
        "compositions": 0,
        "workers_last_hour": 0,
        "jobs_queued": 0,
    }

    first = queue_ensemble(api, cooking.id)
    assert counts(web_html(api.client.get("/").text))["jobs_queued"] == 1
    job = lease_as(api, "gpu-box-1")
    now = counts(web_html(api.client.get("/").text))
    assert (now["jobs_queued"], now["workers_last_hour"]) == (0, 1)
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"fencing_token": job["fencing_token"], "result": {"weights": [1.0]}},
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    now = counts(web_html(api.client.get("/").text))
    # The one that completed is still seen (its result), once: one worker, not two.
    assert (now["compositions"], now["workers_last_hour"]) == (1, 1)

    queue_ensemble(api, cooking.id)
    lease_as(api, "gpu-box-2")
    assert counts(web_html(api.client.get("/").text))["workers_last_hour"] == 2
    # A result accepted two hours ago is not "the last hour".
    with api.app.state.runtime.sessions() as session, session.begin():
        session.execute(
            update(JobResult)
            .where(JobResult.job_id == first["job_id"])
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
        )
    assert counts(web_html(api.client.get("/").text))["workers_last_hour"] == 1


def test_the_compositions_count_says_it_counts_ready_ones(api: Api, web_html) -> None:
    page = web_html(api.client.get("/").text)
    card = page.find(class_="card", **{"data-count": "compositions"})
    assert "ready" in card.text


def test_without_a_base_the_page_says_how_to_publish_one(client, web_html) -> None:
    page = web_html(client.get("/").text)
    assert "agora base upload" in page.find(id="no-base").text
    assert counts(page)["base_revisions"] == 0
    refused = client.get("/", params={"text": "some text"})
    assert refused.status_code == 404
    assert web_html(refused.text).find(id="error-code").text == "base_model_not_found"


# -- search ----------------------------------------------------------------------------------


def test_searching_a_domains_text_lists_its_expert_first(api: Api, web_html) -> None:
    submitted = {d: submit_domain(api, d, seed=i) for i, d in enumerate(DOMAINS)}
    text = DOMAINS["law"]["queries"][0]
    response = search_page(api, text, k=3)
    assert response.status_code == 200, response.text
    page = web_html(response.text)
    items = page.find(id="results").find_all("li", class_="result")
    assert len(items) == 3
    assert items[0].attrs["data-expert-id"] == submitted["law"].id

    # The page shows what the API answers, in its order, with its weights.
    api_hits = api.client.post(
        "/v1/search", json={"texts": [text], "base_revision": api.base.revision, "k": 3}
    ).json()["results"]
    assert [i.attrs["data-expert-id"] for i in items] == [h["expert_id"] for h in api_hits]
    for item, hit in zip(items, api_hits, strict=True):
        link = item.find("a", class_="expert-link")
        assert link.attrs["href"] == f"/experts/{hit['expert_id']}"
        assert link.text == hit["name"]
        assert hit["domain"] in item.text
        weight = item.find(class_="weight").text
        assert re.fullmatch(r"\d{1,3}\.\d%", weight), weight
        assert weight == f"{hit['weight'] * 100:.1f}%"
        bar = item.find("svg").find("rect", class_="fill")
        assert float(bar.attrs["width"]) == pytest.approx(hit["weight"] * 100, abs=0.06)
    assert sum(float(i.find(class_="weight").text[:-1]) for i in items) == pytest.approx(100, 0.5)

    # The form keeps what was asked.
    form = page.find(id="search")
    assert (form.attrs["method"], form.attrs["action"]) == ("get", "/")
    assert form.find("textarea", name="text").text.strip() == text
    assert form.find("input", name="k").attrs["value"] == "3"
    chosen = form.find("select", name="base").find_all("option", selected=None)
    assert [o.attrs["value"] for o in chosen] == [api.base.revision]


def test_the_newest_base_is_preselected(api: Api, web_html) -> None:
    from helpers.artifacts import make_base_files
    from helpers.retrieval import base_multipart_for

    response = api.client.post(
        "/v1/base-models",
        files=base_multipart_for(make_base_files(seed=7)),
        headers=auth(api.tokens.admin),
    )
    assert response.status_code == 201, response.text
    newest = response.json()["revision"]
    select_ = web_html(api.client.get("/").text).find(id="search").find("select", name="base")
    options = select_.find_all("option")
    assert {o.attrs["value"] for o in options} == {api.base.revision, newest}
    assert [o.attrs["value"] for o in options if "selected" in o.attrs] == [newest]


@pytest.mark.parametrize("k", ["0", "abc", str(MAX_K + 1), "-1", "2.5", ""])
def test_k_outside_its_range_is_refused_not_clamped(api: Api, web_html, k: str) -> None:
    submit_domain(api, "cooking", seed=1)
    response = search_page(api, DOMAINS["cooking"]["queries"][0], k=k)
    assert response.status_code == 400, response.text
    page = web_html(response.text)
    assert page.find(id="error-code").text == "invalid_k"
    assert f"1 to {MAX_K}" in page.find(id="error").text
    assert not page.has(id="results")


def test_k_is_honoured(api: Api, web_html) -> None:
    for i, domain in enumerate(DOMAINS):
        submit_domain(api, domain, seed=i)
    for k in (1, 2):
        page = web_html(search_page(api, DOMAINS["cooking"]["queries"][0], k=k).text)
        assert len(page.find(id="results").find_all("li", class_="result")) == k


def test_bad_searches_are_clean_4xx_pages(api: Api, web_html) -> None:
    submit_domain(api, "cooking", seed=1)
    cases = [
        ({"text": "bread", "base": "f" * 64}, 404, "base_model_not_found"),
        ({"text": "   ", "base": api.base.revision}, 400, "empty_texts"),
        ({"text": "é" * MAX_TEXT_BYTES, "base": api.base.revision}, 413, "texts_too_large"),
    ]
    for params, status, code in cases:
        response = api.client.get("/", params=params)
        assert response.status_code == status, (params, response.text[:300])
        assert response.headers["content-type"].startswith("text/html")
        assert web_html(response.text).find(id="error-code").text == code


def test_no_expert_found_says_so(api: Api, web_html) -> None:
    page = web_html(search_page(api, "anything at all").text)
    assert "No active expert" in page.find(id="no-results").text
    assert not page.has(id="compose")


# -- composing -------------------------------------------------------------------------------


def test_signed_out_search_offers_sign_in_not_compose(api: Api, web_html) -> None:
    submit_domain(api, "cooking", seed=1)
    page = web_html(search_page(api, "bake bread", k=2).text)
    assert not page.has(id="compose")
    link = page.find(id="compose-sign-in").find("a")
    url = urllib.parse.urlsplit(link.attrs["href"])
    assert url.path == "/sign-in"
    back = urllib.parse.urlsplit(urllib.parse.parse_qs(url.query)["next"][0])
    assert back.path == "/"
    assert urllib.parse.parse_qs(back.query)["text"] == ["bake bread"]


def test_a_contributor_composes_the_results(api: Api, web_html, web_viewer) -> None:
    submitted = {d: submit_domain(api, d, seed=i) for i, d in enumerate(DOMAINS)}
    viewer = web_viewer(api.tokens.alice)
    text = DOMAINS["astronomy"]["queries"][0]
    page = web_html(search_page(api, text, k=2).text)
    ranked = [i.attrs["data-expert-id"] for i in page.find(id="results").find_all("li")]
    assert ranked[0] == submitted["astronomy"].id
    fields = compose_form(page)
    assert fields["csrf_token"] == viewer.csrf
    assert (fields["text"], fields["base"], fields["k"]) == (text, api.base.revision, "2")
    assert fields["idempotency_key"]

    response = api.client.post("/compose", data=fields, follow_redirects=False)
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert re.fullmatch(r"/compositions/cmp_\w+", location)

    shown = web_html(api.client.get(location).text)
    assert shown.find(id="method").text == "ensemble"
    rows = shown.find(id="composition-experts").find("tbody").find_all("tr")
    assert [r.attrs["data-expert-id"] for r in rows] == ranked
    assert shown.find(id="composition").attrs["data-status"] == "pending"
    assert shown.find(id="job-status").text == "queued"
    assert "alice" in shown.find(id="requested-by").text
    with api.app.state.runtime.sessions() as session:
        row = session.get(Composition, location.rsplit("/", 1)[1])
        assert row is not None
        assert row.created_by == "alice"
        job = session.get(Job, row.job_id)
        assert job is not None
        assert job.payload["texts"] == [text]


def test_a_double_click_makes_one_composition(api: Api, web_html, web_viewer) -> None:
    submit_domain(api, "cooking", seed=1)
    web_viewer(api.tokens.bob)
    fields = compose_form(web_html(search_page(api, "knead the dough", k=1).text))
    first = api.client.post("/compose", data=fields, follow_redirects=False)
    again = api.client.post("/compose", data=fields, follow_redirects=False)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    assert count_rows(api, Composition) == 1
    assert count_rows(api, Job) == 1

    # Each rendering of the page carries a fresh key: a new search composes anew.
    fresh = compose_form(web_html(search_page(api, "knead the dough", k=1).text))
    assert fresh["idempotency_key"] != fields["idempotency_key"]
    other = api.client.post("/compose", data=fresh, follow_redirects=False)
    assert other.headers["location"] != first.headers["location"]
    assert count_rows(api, Composition) == 2


def test_compose_without_the_csrf_token_is_refused(api: Api, web_html, web_viewer) -> None:
    submit_domain(api, "cooking", seed=1)
    web_viewer(api.tokens.alice)
    fields = compose_form(web_html(search_page(api, "roast the vegetables", k=1).text))
    for csrf in (None, "forged"):
        data = {k: v for k, v in fields.items() if k != "csrf_token"}
        if csrf is not None:
            data["csrf_token"] = csrf
        response = api.client.post("/compose", data=data, follow_redirects=False)
        assert response.status_code == 403, response.text
        assert web_html(response.text).find(id="error-code").text == "csrf_failed"
    assert count_rows(api, Composition) == 0
    assert count_rows(api, Job) == 0


def test_signed_out_compose_goes_to_sign_in(api: Api) -> None:
    submit_domain(api, "cooking", seed=1)
    response = api.client.post(
        "/compose",
        data={"text": "bake", "base": api.base.revision, "k": "1", "csrf_token": "x"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?next=/"
    assert count_rows(api, Composition) == 0


def test_a_worker_may_not_compose(api: Api, web_html, web_viewer) -> None:
    submit_domain(api, "cooking", seed=1)
    viewer = web_viewer(api.tokens.worker)
    page = web_html(search_page(api, "bake", k=1).text)
    assert not page.has(id="compose")
    assert "may not request compositions" in page.find(id="compose-not-allowed").text
    data = {"text": "bake", "base": api.base.revision, "k": "1", "csrf_token": viewer.csrf}
    response = api.client.post("/compose", data=data, follow_redirects=False)
    assert response.status_code == 403
    assert web_html(response.text).find(id="error-code").text == "insufficient_role"
    assert count_rows(api, Composition) == 0


def test_compose_refuses_bad_input_with_4xx_pages(api: Api, web_html, web_viewer) -> None:
    submit_domain(api, "cooking", seed=1)
    viewer = web_viewer(api.tokens.alice)
    good = {"text": "bake", "base": api.base.revision, "k": "1", "csrf_token": viewer.csrf}
    for change, status, code in [
        ({"k": "0"}, 400, "invalid_k"),
        ({"base": "f" * 64}, 404, "base_model_not_found"),
        ({"text": ""}, 400, "empty_texts"),
    ]:
        response = api.client.post("/compose", data={**good, **change}, follow_redirects=False)
        assert response.status_code == status, (change, response.text[:300])
        assert web_html(response.text).find(id="error-code").text == code
    assert count_rows(api, Composition) == 0


# -- what every page carries -----------------------------------------------------------------


def test_pages_carry_the_security_headers_and_no_inline_code(api: Api) -> None:
    submit_domain(api, "cooking", seed=1)
    for response in (api.client.get("/"), search_page(api, "bake", k=1)):
        csp = response.headers["content-security-policy"]
        assert "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        # What the policy would block must not be there to block.
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
        assert " style=" not in response.text
        assert "<style" not in response.text
