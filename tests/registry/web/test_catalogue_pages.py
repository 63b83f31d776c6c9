"""The experts list and an expert's page (docs/web.md, "Experts"), through the app with
TestClient on SQLite and PostgreSQL: filters, sorts and pages and their refusals, the
datasheet rendered inert, versions and downloads, lineage, evaluations as a chart, and who
sees a disabled or withdrawn expert (moderators, audited; nobody else)."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from helpers.artifacts import make_datasheet
from sqlalchemy import select

from registry.db.models import AuditEvent

Api = Any
SVG = "{http://www.w3.org/2000/svg}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(api: Api, name: str, *, seed: int, expert_id: str | None = None, **sheet: Any) -> str:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, samples=[f"{name} sample text"], **sheet),
        expert_id=expert_id,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def element(html: str, start: str, tag: str) -> str:
    """The markup from ``start`` (e.g. '<table id="experts"') to its closing ``tag``."""
    at = html.index(start)
    return html[at : html.index(f"</{tag}>", at) + len(tag) + 3]


def listed(html: str) -> list[str]:
    if '<table id="experts"' not in html:
        return []
    return re.findall(
        r'<tr data-expert-id="([^"]+)"', element(html, '<table id="experts"', "table")
    )


def error_code(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    found = re.search(r'<code id="error-code">([^<]+)</code>', response.text)
    assert found is not None, response.text
    return found.group(1)


def moderate(api: Api, expert_id: str, action: str) -> None:
    response = api.client.post(
        f"/v1/experts/{expert_id}/{action}",
        json={"reason": "test"},
        headers=auth(api.tokens.moderator),
    )
    assert response.status_code == 200, response.text


def lease(api: Api) -> dict[str, Any]:
    response = api.client.post(
        "/v1/jobs/lease", json={"worker": "test-worker"}, headers=auth(api.tokens.worker)
    )
    assert response.status_code == 200, response.text
    return dict(response.json()["job"])


def review_entries(api: Api, expert_id: str) -> list[dict[str, Any]]:
    with api.app.state.runtime.sessions() as session:
        rows = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "expert.review_download",
                AuditEvent.target == f"expert:{expert_id}",
            )
        ).all()
        return [{"actor": r.actor, **r.detail} for r in rows]


# ---------------------------------------------------------------------------- the list


def test_the_list_filters_sorts_and_pages(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    cook = submit(api, "Cooking notes", seed=1, license="MIT", language=["en", "fr"])
    law = submit(api, "Law reports", seed=2, domain="Court rulings and statutes.")
    astro = submit(api, "Astronomy logs", seed=3, language=["de"])
    client = api.client

    page = client.get("/experts")
    assert page.status_code == 200
    assert listed(page.text) == [astro, law, cook]  # newest first
    assert listed(client.get("/experts?sort=oldest").text) == [cook, law, astro]
    assert listed(client.get("/experts?sort=name").text) == [astro, cook, law]
    assert listed(client.get("/experts?q=STATUTES").text) == [law]
    assert listed(client.get("/experts?license=mit").text) == [cook]
    assert listed(client.get("/experts?language=fr").text) == [cook]
    assert listed(client.get("/experts?language=e").text) == []  # a whole language only
    assert listed(client.get(f"/experts?base={api.base.revision}").text) == [astro, law, cook]
    assert "<th>State</th>" not in page.text  # the public sees active experts only

    monkeypatch.setattr("registry.web.catalogue.PAGE_SIZE", 2)
    first = client.get("/experts?sort=name")
    assert listed(first.text) == [astro, cook]
    link = re.search(r'<a id="next-page" href="([^"]+)"', first.text)
    assert link is not None
    second = client.get(link.group(1).replace("&amp;", "&"))
    assert listed(second.text) == [law]
    assert 'id="next-page"' not in second.text


@pytest.mark.parametrize(
    ("query", "status", "code", "names"),
    [
        ("sort=popular", 400, "invalid_sort", "newest, oldest, name"),
        ("page=0", 400, "invalid_page", "1 to 10000"),
        ("page=two", 400, "invalid_page", "whole number"),
        ("base=nope", 400, "invalid_base", "stored base revision"),
        ("q=" + "x" * 201, 400, "invalid_q", "200 characters"),
        ("status=disabled", 403, "insufficient_role", "moderators and admins"),
        ("status=gone", 400, "invalid_status", "active, quarantined, disabled"),
    ],
)
def test_the_list_refuses_a_bad_parameter_naming_what_is_allowed(
    api: Api, query: str, status: int, code: str, names: str
) -> None:
    response = api.client.get(f"/experts?{query}")
    assert error_code(response, status) == code
    assert names in response.text


def test_staff_list_experts_in_any_state_with_the_state_column(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    kept = submit(api, "Kept", seed=1)
    gone = submit(api, "Gone", seed=2)
    moderate(api, gone, "disable")
    assert listed(api.client.get("/experts").text) == [kept]

    web_sign_in(api.tokens.moderator)
    page = api.client.get("/experts?status=disabled")
    assert listed(page.text) == [gone]
    assert '<span class="state disabled">disabled</span>' in page.text
    web_sign_in(api.tokens.alice)
    assert error_code(api.client.get("/experts?status=disabled"), 403) == "insufficient_role"


# ---------------------------------------------------------------------------- an expert


def test_a_datasheet_renders_as_inert_text(api: Api) -> None:
    body = (
        "# Notes\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n"
        "[click me](javascript:alert(1)) and [docs](https://example.org/docs)\n"
    )
    expert = submit(api, "Sneaky <b>name</b>", seed=1, body=body)
    page = api.client.get(f"/experts/{expert}")
    assert page.status_code == 200
    html = page.text
    # The page's own scripts are external files; no other script tag exists.
    assert html.count("<script") == html.count('<script src="/assets/web/')
    assert "<img" not in html
    assert 'href="javascript:' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in element(html, '<div id="datasheet"', "div")
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert '<a href="https://example.org/docs">docs</a>' in html
    assert "Sneaky &lt;b&gt;name&lt;/b&gt;" in html
    # The front matter as a field table, the samples folded away.
    fields = element(html, '<table id="datasheet-fields"', "table")
    for text in ("CC-BY-4.0", "1,250,000", "Observer names and GPS traces removed"):
        assert text in fields
    assert '<a href="mailto:tidepools@example.org"' in fields
    assert "Sneaky &lt;b&gt;name&lt;/b&gt; sample text" in element(
        html, '<details id="samples"', "details"
    )


def test_versions_show_digests_and_sizes_and_link_their_downloads(api: Api) -> None:
    first, second = api.expert_bytes(seed=1), api.expert_bytes(seed=2)
    response = api.submit(weights=first, datasheet=make_datasheet(name="Versioned"))
    expert = response.json()["id"]
    again = api.submit(weights=second, datasheet=make_datasheet(name="Versioned"), expert_id=expert)
    assert again.status_code == 201, again.text
    html = api.client.get(f"/experts/{expert}").text
    versions = element(html, '<table id="versions"', "table")
    for number, weights in ((1, first), (2, second)):
        assert f"sha256:{hashlib.sha256(weights).hexdigest()}" in versions
        assert f'data-size="{len(weights)}"' in versions
        link = f'href="/v1/experts/{expert}/weights?version={number}"'
        assert link in versions
        download = api.client.get(f"/v1/experts/{expert}/weights?version={number}")
        assert download.content == weights
    latest = re.search(r'<a id="download" href="([^"]+)"', html)
    assert latest is not None
    assert api.client.get(latest.group(1)).content == second


def test_an_average_shows_its_parents_and_hides_withdrawn_ones_from_the_public(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    a = submit(api, "Parent A", seed=1)
    b = submit(api, "Parent B", seed=2)
    asked = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "average", "experts": [a, b]},
        headers=auth(api.tokens.alice),
    )
    assert asked.status_code == 202, asked.text
    job = lease(api)
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        data={"fencing_token": str(job["fencing_token"]), "result": json.dumps({})},
        files={"weights": ("merged.safetensors", api.expert_bytes(seed=3))},
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    child = done.json()["result"]["expert_id"]

    lineage = element(api.client.get(f"/experts/{child}").text, '<div id="lineage"', "div")
    parents = re.findall(r'<a class="parent" href="/experts/([^"]+)"', lineage)
    assert sorted(parents) == sorted([a, b])
    assert '<span class="state active">active</span>' in lineage
    assert f'<a class="child" href="/experts/{child}"' in api.client.get(f"/experts/{a}").text

    moderate(api, a, "disable")  # the average is withdrawn with it
    assert error_code(api.client.get(f"/experts/{child}"), 404) == "expert_not_found"
    public = api.client.get(f"/experts/{b}").text
    assert child not in public
    assert "1 withdrawn" in public
    web_sign_in(api.tokens.moderator)
    staff = api.client.get(f"/experts/{b}").text
    assert f'<a class="child" href="/experts/{child}"' in staff
    assert "withdrawn_by_lineage" in staff


def test_a_disabled_expert_is_a_404_but_to_staff_who_are_audited(
    api: Api, web_sign_in: Callable[[str], str]
) -> None:
    expert = submit(api, "Disabled one", seed=1)
    web_sign_in(api.tokens.moderator)
    assert 'class="moderate-expert' in api.client.get(f"/experts/{expert}").text
    assert review_entries(api, expert) == []  # an active expert's page is not a review
    moderate(api, expert, "disable")

    api.client.cookies.clear()
    assert error_code(api.client.get(f"/experts/{expert}"), 404) == "expert_not_found"
    assert error_code(api.client.get("/experts/ex_unknown"), 404) == "expert_not_found"
    web_sign_in(api.tokens.alice)
    assert error_code(api.client.get(f"/experts/{expert}"), 404) == "expert_not_found"
    assert 'class="moderate-expert' not in api.client.get("/experts").text

    web_sign_in(api.tokens.moderator)
    page = api.client.get(f"/experts/{expert}")
    assert page.status_code == 200
    assert re.search(r'id="expert-status"[^>]*>disabled<', page.text)
    form = element(page.text, '<form class="moderate-expert', "form")
    assert 'action="/moderation/experts"' in form
    assert f'name="expert_id" value="{expert}"' in form
    assert f'name="return_to" value="/experts/{expert}"' in form
    assert '<select id="moderate-action" name="action">' in form
    assert re.search(r'<input type="text" name="reason" required', form)
    assert 'name="csrf_token"' in form
    assert review_entries(api, expert) == [
        {
            "actor": "moderator",
            "artifact": "datasheet",
            "version": 1,
            "status": "disabled",
            "actor_token": review_entries(api, expert)[0]["actor_token"],
        }
    ]


def test_evaluations_are_charted_one_line_per_text_set(api: Api) -> None:
    expert = submit(api, "Charted", seed=1)
    numbers = {"news": [1.9, 1.7], "code": [2.4, 2.2]}
    for run in range(2):
        asked = api.client.post(
            "/v1/evaluations",
            json={"expert_id": expert, "text_sets": {"news": ["a headline"], "code": ["x = 1"]}},
            headers=auth(api.tokens.alice),
        )
        assert asked.status_code == 202, asked.text
        job = lease(api)
        results = {
            name: {
                "bits_per_byte": numbers[name][run],
                "base_bits_per_byte": 2.5,
                "tokens": 4,
                "bytes": 10,
            }
            for name in job["payload"]["text_sets"]
        }
        done = api.client.post(
            f"/v1/jobs/{job['id']}/complete",
            json={"fencing_token": job["fencing_token"], "result": {"results": results}},
            headers=auth(api.tokens.worker),
        )
        assert done.status_code == 200, done.text

    html = api.client.get(f"/experts/{expert}").text
    chart = ET.fromstring(element(html, '<svg id="eval-chart"', "svg"))
    series = {g.get("data-text-set"): g for g in chart.iter(f"{SVG}g") if g.get("data-text-set")}
    assert set(series) == {"news", "code"}
    for name, group in series.items():
        assert len(group.findall(f"{SVG}polyline")) == 1
        points = group.findall(f"{SVG}circle")
        titles = sorted("".join(p.itertext()) for p in points)
        assert [t.split(": ")[1][:6] for t in titles] == sorted(f"{v:.4f}" for v in numbers[name])
        assert group.find(f"{SVG}line[@class='baseline']") is not None  # the base, dashed
    table = element(html, '<table id="evaluations"', "table")
    assert len(re.findall(r'<tr id="evaluation-\d+"', table)) == 4
    assert "1.7000" in table
    assert "−32.0%" in table  # 1.7 against the base's 2.5


@pytest.mark.parametrize(
    "path", ["/experts/ex_%00", "/experts?q=a%00b", "/experts?license=%00", "/matrix?base=%00"]
)
def test_a_nul_in_an_id_or_a_filter_is_a_400_never_a_500(api: Api, path: str) -> None:
    # Refused before any page runs (registry/api/limits.py), as for the API.
    assert api.client.get(path).status_code == 400


def test_an_overlong_id_is_the_unknown_expert_page(api: Api) -> None:
    assert error_code(api.client.get("/experts/" + "x" * 300), 404) == "expert_not_found"
