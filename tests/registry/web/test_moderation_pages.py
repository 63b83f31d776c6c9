"""The moderation page and its forms, on SQLite and PostgreSQL: who may see it, disabling
and enabling an expert with a reason (gone from the list and search, recorded in the
audit log, whose chain the page verifies), refusals (no CSRF token, a blank reason, an
unknown expert), resolving reports, flags with their numbers, proofs of forgetting and the
audit log's pages (docs/web.md, "Moderation")."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient
from helpers.retrieval import DOMAINS, Submitted, search, submit_domain
from sqlalchemy import func, select

from registry.db.models import AuditEvent
from registry.services import audit

Api = Any
Read = Callable[[str], Any]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sign_in(client: TestClient, token: str) -> str:
    """Sign ``client`` in through the sign-in form; the session's CSRF secret."""
    client.cookies.clear()
    form = client.get("/sign-in")
    pre = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert pre is not None
    done = client.post(
        "/sign-in", data={"token": token, "csrf_token": pre.group(1)}, follow_redirects=False
    )
    assert done.status_code == 303, done.text
    page = client.get("/sign-in").text
    found = re.search(r'action="/sign-out".*?name="csrf_token" value="([^"]+)"', page, re.S)
    assert found is not None
    return found.group(1)


def moderate(client: TestClient, csrf: str | None, **fields: str) -> httpx.Response:
    data = {**fields, **({"csrf_token": csrf} if csrf is not None else {})}
    return client.post("/moderation/experts", data=data, follow_redirects=False)


def error_code(read: Read, response: httpx.Response) -> str:
    return str(read(response.text).find(id="error-code").text)


def flash_of(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    (flash,) = parse_qs(urlsplit(response.headers["location"]).query)["flash"]
    return flash


def listed(api: Api) -> set[str]:
    return {e["id"] for e in api.client.get("/v1/experts", params={"limit": 100}).json()["items"]}


def found_by_search(api: Api, domain: str) -> set[str]:
    response = search(api, DOMAINS[domain]["queries"], k=4)
    assert response.status_code == 200, response.text
    return {r["expert_id"] for r in response.json()["results"]}


def audit_count(api: Api) -> int:
    with api.app.state.runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def moderation_page(client: TestClient, read: Read, **params: str) -> Any:
    response = client.get("/moderation", params=params)
    assert response.status_code == 200, response.text
    return read(response.text)


def test_anonymous_visitors_are_sent_to_sign_in_and_contributors_refused(
    api: Api, web_html: Read
) -> None:
    client = api.client
    response = client.get("/moderation", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (
        303,
        "/sign-in?next=/moderation",
    )
    csrf = sign_in(client, api.tokens.alice)
    refused = client.get("/moderation")
    assert refused.status_code == 403
    assert error_code(web_html, refused) == "insufficient_role"
    # Nor may a contributor post the form, even with a valid CSRF token.
    expert = submit_domain(api, "law", seed=1)
    posted = moderate(client, csrf, expert_id=expert.id, action="disable", reason="mine now")
    assert (posted.status_code, error_code(web_html, posted)) == (403, "insufficient_role")
    assert expert.id in listed(api)


def test_a_moderator_sees_every_section_and_a_verified_chain(api: Api, web_html: Read) -> None:
    expert = submit_domain(api, "law", seed=1)
    sign_in(api.client, api.tokens.moderator)
    page = moderation_page(api.client, web_html)
    for section in ("reports", "withdrawn", "flagged", "audit", "forgetting"):
        assert page.has(id=section), section
    form = page.find("form", id="moderate")
    assert (form.attrs["method"], form.attrs["action"]) == ("post", "/moderation/experts")
    assert form.has("input", name="expert_id")
    assert [o.attrs["value"] for o in form.find("select", name="action").find_all("option")] == [
        "disable",
        "enable",
    ]
    assert form.has("input", name="reason")
    assert form.has("button", id="moderate-button")
    verified = page.find(id="audit-verify")
    assert "ok" in verified.attrs["class"].split()
    assert "verified" in verified.text
    # The newest entry: the submission.
    newest = page.find_all("tr", class_="audit-entry")[0]
    assert newest.find(class_="action").text == "expert.submit"
    assert newest.find(class_="target").text == f"expert:{expert.id}"
    assert newest.find(class_="actor").text == "alice"
    assert page.find("nav").find("a", href="/moderation").text == "Moderation"


def test_disabling_through_the_form_withdraws_the_expert_and_is_audited(
    api: Api, web_html: Read
) -> None:
    cooking, law = (submit_domain(api, d, seed=i) for i, d in enumerate(("cooking", "law")))
    assert cooking.id in found_by_search(api, "cooking")
    csrf = sign_in(api.client, api.tokens.moderator)

    reason = "copied from a paywalled <cookbook>"
    response = moderate(api.client, csrf, expert_id=cooking.id, action="disable", reason=reason)
    assert urlsplit(response.headers["location"]).path == "/moderation"
    assert flash_of(response) == f"Disabled {cooking.id} ({reason})"

    # Gone from the public list and from search; the other expert stays.
    assert listed(api) == {law.id}
    assert cooking.id not in found_by_search(api, "cooking")
    assert api.client.get(f"/v1/experts/{cooking.id}/datasheet").status_code == 451

    page_response = api.client.get(response.headers["location"])
    assert "&lt;cookbook&gt;" in page_response.text  # the flash, escaped
    page = web_html(page_response.text)
    assert page.find(id="flash").text == f"Disabled {cooking.id} ({reason})"
    entries = page.find_all("tr", class_="audit-entry")
    newest = entries[0]
    assert newest.find(class_="action").text == "expert.disable"
    assert newest.find(class_="target").text == f"expert:{cooking.id}"
    assert newest.find(class_="actor").text == "moderator"
    assert newest.find(class_="reason").text == reason
    verified = page.find(id="audit-verify")
    assert "ok" in verified.attrs["class"].split()
    assert "verified" in verified.text
    assert f"{len(entries)} entries" in verified.text
    # Listed among the experts that are not active, with its state and reason.
    row = page.find(id="withdrawn").find("tr", **{"data-expert-id": cooking.id})
    assert row.find(class_="state").text == "disabled"
    assert reason in row.find(class_="reason").text
    # Its proof of forgetting is queued (the expert alone: no composition used it).
    proof = page.find(id="forgetting").find(class_="forgetting-report")
    assert cooking.id in proof.text
    assert proof.attrs["data-status"] == "pending"

    # Enabled again: back in the list and in search.
    again = moderate(api.client, csrf, expert_id=cooking.id, action="enable", reason="licensed")
    assert flash_of(again) == f"Enabled {cooking.id} (licensed)"
    assert listed(api) == {cooking.id, law.id}
    assert cooking.id in found_by_search(api, "cooking")
    page = moderation_page(api.client, web_html)
    assert page.find("tr", class_="audit-entry").find(class_="action").text == "expert.enable"
    assert not page.find(id="withdrawn").has("tr", **{"data-expert-id": cooking.id})


def test_a_form_post_without_its_csrf_token_changes_nothing(api: Api, web_html: Read) -> None:
    expert = submit_domain(api, "law", seed=1)
    csrf = sign_in(api.client, api.tokens.moderator)
    before = audit_count(api)
    for sent in (None, "", "forged", csrf[:-1]):
        response = moderate(api.client, sent, expert_id=expert.id, action="disable", reason="r")
        assert response.status_code == 403, response.text
        assert error_code(web_html, response) == "csrf_failed"
    report = api.client.post(
        f"/v1/experts/{expert.id}/reports", json={"reason": "spam"}, headers=auth(api.tokens.bob)
    ).json()
    before = audit_count(api)
    resolved = api.client.post(
        f"/moderation/reports/{report['id']}",
        data={"resolution": "disable"},
        follow_redirects=False,
    )
    assert (resolved.status_code, error_code(web_html, resolved)) == (403, "csrf_failed")
    assert expert.id in listed(api)
    assert audit_count(api) == before
    # Signed out, a form post is refused the same way.
    api.client.cookies.clear()
    response = moderate(api.client, csrf, expert_id=expert.id, action="disable", reason="r")
    assert (response.status_code, error_code(web_html, response)) == (403, "csrf_failed")


def test_refusals_are_pages_with_their_codes(api: Api, web_html: Read) -> None:
    expert = submit_domain(api, "law", seed=1)
    csrf = sign_in(api.client, api.tokens.moderator)
    cases = [
        ({"expert_id": expert.id, "action": "disable", "reason": "   "}, 400, "missing_reason"),
        ({"expert_id": expert.id, "action": "disable"}, 400, "missing_reason"),
        ({"expert_id": expert.id, "action": "withdraw", "reason": "r"}, 400, "invalid_action"),
        ({"expert_id": "", "action": "disable", "reason": "r"}, 400, "missing_expert_id"),
        ({"expert_id": "ex_nope", "action": "disable", "reason": "r"}, 404, "expert_not_found"),
        ({"expert_id": expert.id, "action": "enable", "reason": "r"}, 409, "status_unchanged"),
        (
            {"expert_id": expert.id, "action": "disable", "reason": "a\x00b"},
            400,
            "invalid_characters",
        ),
        (
            {"expert_id": expert.id, "action": "disable", "reason": "r" * 2001},
            400,
            "reason_too_long",
        ),
    ]
    before = audit_count(api)
    for fields, status, code in cases:
        response = moderate(api.client, csrf, **fields)
        assert response.status_code == status, (fields, response.text)
        assert response.headers["content-type"].startswith("text/html")
        assert error_code(web_html, response) == code, fields
    assert expert.id in listed(api)
    assert audit_count(api) == before
    disabled = moderate(api.client, csrf, expert_id=expert.id, action="disable", reason="r")
    assert disabled.status_code == 303
    twice = moderate(api.client, csrf, expert_id=expert.id, action="disable", reason="r")
    assert (twice.status_code, error_code(web_html, twice)) == (409, "status_unchanged")


def test_return_to_comes_back_to_a_local_page_only(api: Api) -> None:
    expert = submit_domain(api, "law", seed=1)
    csrf = sign_in(api.client, api.tokens.moderator)
    back = moderate(
        api.client,
        csrf,
        expert_id=expert.id,
        action="disable",
        reason="r",
        return_to=f"/experts/{expert.id}?tab=versions",
    )
    target = urlsplit(back.headers["location"])
    assert target.path == f"/experts/{expert.id}"
    assert parse_qs(target.query) == {"tab": ["versions"], "flash": [f"Disabled {expert.id} (r)"]}
    # The expert's page says what was done, as every page shows its redirect's flash.
    shown = api.client.get(back.headers["location"])
    assert shown.status_code == 200
    assert f'id="flash" role="status">Disabled {expert.id} (r)<' in shown.text
    away = moderate(
        api.client,
        csrf,
        expert_id=expert.id,
        action="enable",
        reason="r",
        return_to="//evil.example/",
    )
    assert urlsplit(away.headers["location"]).path == "/"
    assert urlsplit(away.headers["location"]).netloc == ""


def file_report(api: Api, expert: Submitted, reason: str) -> dict[str, Any]:
    response = api.client.post(
        f"/v1/experts/{expert.id}/reports", json={"reason": reason}, headers=auth(api.tokens.bob)
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def report_status(api: Api, report_id: int) -> dict[str, Any]:
    response = api.client.get(f"/v1/reports/{report_id}", headers=auth(api.tokens.moderator))
    return dict(response.json())


def test_resolving_reports_through_the_form(api: Api, web_html: Read) -> None:
    cooking, law = (submit_domain(api, d, seed=i) for i, d in enumerate(("cooking", "law")))
    first = file_report(api, cooking, "looks like spam")
    second = file_report(api, law, "trained on stolen briefs")
    csrf = sign_in(api.client, api.tokens.moderator)
    page = moderation_page(api.client, web_html)
    queue = page.find(id="reports")
    assert [r.attrs["data-report-id"] for r in queue.find_all("tr")[1:]] == [
        str(first["id"]),
        str(second["id"]),
    ]
    form = queue.find("tr", **{"data-report-id": str(first["id"])}).find("form")
    assert form.attrs["action"] == f"/moderation/reports/{first['id']}"
    assert {b.attrs["value"] for b in form.find_all("button")} == {"dismiss", "disable"}

    dismissed = api.client.post(
        form.attrs["action"],
        data={"csrf_token": csrf, "resolution": "dismiss", "note": "it is a recipe"},
        follow_redirects=False,
    )
    assert flash_of(dismissed) == f"Report {first['id']} on {cooking.id} dismissed (it is a recipe)"
    assert report_status(api, first["id"])["status"] == "dismissed"
    assert cooking.id in listed(api)

    disabled = api.client.post(
        f"/moderation/reports/{second['id']}",
        data={"csrf_token": csrf, "resolution": "disable"},
        follow_redirects=False,
    )
    assert flash_of(disabled) == f"Report {second['id']}: disabled {law.id}"
    assert report_status(api, second["id"])["status"] == "disabled"
    assert listed(api) == {cooking.id}
    page = moderation_page(api.client, web_html)
    assert not page.find(id="reports").has("tr", **{"data-report-id": str(first["id"])})
    assert "No open reports" in page.find(id="reports").text
    actions = [e.find(class_="action").text for e in page.find_all("tr", class_="audit-entry")]
    assert actions[:3] == ["report.resolve", "expert.disable", "report.resolve"]

    # Resolved already, unknown, or no resolution: pages with their codes.
    for path, data, status, code in [
        (f"/moderation/reports/{second['id']}", {"resolution": "dismiss"}, 409, "report_resolved"),
        ("/moderation/reports/999999", {"resolution": "dismiss"}, 404, "report_not_found"),
        ("/moderation/reports/abc", {"resolution": "dismiss"}, 404, "report_not_found"),
        (f"/moderation/reports/{first['id']}", {}, 400, "invalid_resolution"),
    ]:
        response = api.client.post(path, data={"csrf_token": csrf, **data})
        assert (response.status_code, error_code(web_html, response)) == (status, code), path


def monitor_and_flag(api: Api) -> str:
    """A monitoring run of the one active expert whose continuations repeat (90% against
    the base's 30%): the registry flags it with the run's numbers."""
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat()
    scheduled = api.client.post(
        "/v1/monitoring/schedules", json={"not_before": when}, headers=auth(api.tokens.moderator)
    )
    assert scheduled.status_code == 201, scheduled.text
    job = api.client.post(
        "/v1/jobs/lease", json={"worker": "test-worker"}, headers=auth(api.tokens.worker)
    ).json()["job"]
    scores = {"bits_per_byte": 2.25, "base_bits_per_byte": 3.5, "tokens": 10, "bytes": 40}
    result = {
        "results": {name: scores for name in job["payload"]["text_sets"]},
        "continuations": {
            "repetition": 0.9,
            "base_repetition": 0.3,
            "ngram": 4,
            "prompts": 1,
            "tokens": 48,
            "base_tokens": 48,
            "sample": "x x x x",
        },
    }
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"fencing_token": job["fencing_token"], "result": result},
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    return str(job["id"])


def test_flagged_experts_show_the_monitoring_numbers(api: Api, web_html: Read) -> None:
    expert = submit_domain(api, "law", seed=1)
    job_id = monitor_and_flag(api)
    sign_in(api.client, api.tokens.moderator)
    page = moderation_page(api.client, web_html)
    (row,) = page.find(id="flagged").find_all("tr", **{"data-expert-id": expert.id})
    assert f"monitoring run {job_id}" in row.text
    numbers = dict(
        zip(
            (t.text for t in row.find_all("dt")),
            (d.text for d in row.find_all("dd")),
            strict=True,
        )
    )
    assert numbers["own-domain bits per byte"] == "2.2500"
    assert numbers["repetition"] == "90.0%"
    assert numbers["base repetition"] == "30.0%"
    # The same flag waits in the report queue.
    assert page.find(id="reports").has("tr", **{"data-report-id": row.attrs["data-report-id"]})


def test_the_audit_log_pages_back_and_shows_a_broken_chain(api: Api, web_html: Read) -> None:
    with api.app.state.runtime.sessions() as session, session.begin():
        for n in range(1, audit.DEFAULT_PAGE + 6):
            audit.append(session, actor="tester", action="test.entry", target=f"test:{n}")
    total = audit_count(api)  # the tokens' and base's entries, and these
    page_size = audit.DEFAULT_PAGE
    sign_in(api.client, api.tokens.moderator)
    page = moderation_page(api.client, web_html)
    seqs = [int(e.find(class_="seq").text) for e in page.find_all("tr", class_="audit-entry")]
    assert seqs == list(range(total, total - page_size, -1))
    older = page.find("a", id="audit-older").attrs["href"]
    page = web_html(api.client.get(older).text)
    seqs = [int(e.find(class_="seq").text) for e in page.find_all("tr", class_="audit-entry")]
    assert seqs == list(range(total - page_size, 0, -1))
    assert not page.has("a", id="audit-older")
    assert page.find("a", id="audit-newest").attrs["href"].startswith("/moderation")
    bad = api.client.get("/moderation", params={"cursor": "nonsense!"})
    assert (bad.status_code, error_code(web_html, bad)) == (400, "invalid_cursor")

    # An entry altered behind the log's back: the page names the break.
    engine = sa.create_engine(api.app.state.runtime.settings.database_url)
    postgres = engine.dialect.name == "postgresql"
    try:
        with engine.begin() as connection:
            if postgres:
                connection.execute(sa.text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            connection.execute(sa.text("UPDATE audit_events SET reason = 'forged' WHERE seq = 3"))
            if postgres:
                connection.execute(sa.text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    finally:
        engine.dispose()
    verdict = moderation_page(api.client, web_html).find(id="audit-verify")
    assert "broken" in verdict.attrs["class"].split()
    assert "verified" not in verdict.text
    assert "entry 3" in verdict.text
    assert "hash_mismatch" in verdict.text
