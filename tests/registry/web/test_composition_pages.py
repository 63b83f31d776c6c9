"""The composition page and its progress endpoint (registry/web/home.py): the manifest,
the job's state and progress, the result once ready, evaluations, and the 451 page once
an expert it uses is withdrawn; on SQLite and PostgreSQL. The test plays the worker
through the jobs API, as tests/registry/test_jobs.py does."""

from __future__ import annotations

from typing import Any

from helpers.retrieval import submit_domain

Api = Any
RESULT = {"bits_per_byte": 1.234567, "base_bits_per_byte": 1.5}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def worker_post(api: Api, path: str, body: dict[str, Any]) -> Any:
    response = api.client.post(path, json=body, headers=auth(api.tokens.worker))
    assert response.status_code == 200, response.text
    return response.json()


def request_ensemble(api: Api, experts: list[str], **extra: Any) -> dict[str, Any]:
    response = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "ensemble", "experts": experts} | extra,
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def lease(api: Api) -> dict[str, Any]:
    return dict(worker_post(api, "/v1/jobs/lease", {"worker": "gpu-box"})["job"])


def complete(api: Api, job: dict[str, Any], result: dict[str, Any]) -> None:
    worker_post(
        api,
        f"/v1/jobs/{job['id']}/complete",
        {"fencing_token": job["fencing_token"], "result": result},
    )


def two_experts(api: Api) -> tuple[str, str]:
    return submit_domain(api, "cooking", seed=1).id, submit_domain(api, "law", seed=2).id


def page_of(api: Api, web_html: Any, composition_id: str) -> Any:
    response = api.client.get(f"/compositions/{composition_id}")
    assert response.status_code == 200, response.text
    return web_html(response.text)


def progress(api: Api, composition_id: str) -> dict[str, Any]:
    response = api.client.get(f"/compositions/{composition_id}/progress")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    return dict(response.json())


def test_the_manifest_while_pending(api: Api, web_html) -> None:
    a, b = two_experts(api)
    queued = request_ensemble(api, [a, b], weights=[3, 1])
    page = page_of(api, web_html, queued["composition_id"])
    root = page.find(id="composition")
    assert root.attrs["data-status"] == "pending"
    # The page opts in to live progress, and refreshes itself without JavaScript.
    assert root.attrs["data-job-status"] == f"/compositions/{queued['composition_id']}/progress"
    assert page.has("script", src="/assets/web/agora.js")
    refresh = page.find("noscript").find("meta")
    assert refresh.attrs["http-equiv"] == "refresh"
    assert page.find(id="method").text == "ensemble"
    assert page.find(id="job-status").text == "queued"
    assert "alice" in page.find(id="requested-by").text

    rows = page.find("table", id="composition-experts").find("tbody").find_all("tr")
    assert [r.attrs["data-expert-id"] for r in rows] == [a, b]
    assert [r.find(class_="weight").text for r in rows] == ["75.0%", "25.0%"]
    assert rows[0].find("a").attrs["href"] == f"/experts/{a}"
    assert "Cooking expert" in rows[0].text
    # Nothing to show yet: the result panel is there for the script to fill, but hidden.
    assert "hidden" in page.find(id="result").attrs
    assert page.find(id="result-bpb").text == "–"
    params = page.find(id="params").text
    assert "with_base" in params


def test_progress_shows_the_job_then_the_result(api: Api, web_html) -> None:
    a, b = two_experts(api)
    queued = request_ensemble(api, [a, b])
    cid = queued["composition_id"]
    body = progress(api, cid)
    assert body["status"] == "pending"
    assert body["job"]["status"] == "queued"
    assert body["bits_per_byte"] is None
    assert body["display"] is None

    job = lease(api)
    worker_post(
        api,
        f"/v1/jobs/{job['id']}/heartbeat",
        {
            "fencing_token": job["fencing_token"],
            "progress": {"done": 1, "total": 2, "message": "bits per byte"},
        },
    )
    body = progress(api, cid)
    assert body["job"] | {"final": False} == {
        "status": "leased",
        "done": 1,
        "total": 2,
        "message": "bits per byte",
        "final": False,
    }
    page = page_of(api, web_html, cid)
    bar = page.find("progress", id="job-progress")
    assert (float(bar.attrs["value"]), float(bar.attrs["max"])) == (1, 2)
    assert page.find(id="job-status").text == "leased"
    assert page.find(id="job-message").text == "bits per byte"

    complete(api, job, {"weights": [0.6, 0.4], "metrics": RESULT})
    body = progress(api, cid)
    assert body["status"] == "ready"
    assert body["job"]["status"] == "succeeded"
    assert body["job"]["final"] is True
    assert body["bits_per_byte"] == RESULT["bits_per_byte"]
    assert body["base_bits_per_byte"] == RESULT["base_bits_per_byte"]
    assert body["display"] == {
        "bits_per_byte": "1.2346",
        "base_bits_per_byte": "1.5000",
        "relative_change": "−17.7%",
    }


def test_a_ready_composition_shows_its_result(api: Api, web_html) -> None:
    a, b = two_experts(api)
    queued = request_ensemble(api, [a, b])
    complete(api, lease(api), {"weights": [0.6, 0.4], "metrics": RESULT})
    page = page_of(api, web_html, queued["composition_id"])
    root = page.find(id="composition")
    assert root.attrs["data-status"] == "ready"
    assert "data-job-status" not in root.attrs  # nothing left to poll
    assert not page.has("script", src="/assets/web/agora.js")
    assert "hidden" not in page.find(id="result").attrs
    assert page.find(id="result-bpb").text == "1.2346"
    assert page.find(id="result-base-bpb").text == "1.5000"
    assert page.find(id="result-change").text == "−17.7%"
    assert page.find(id="job-status").text == "succeeded"
    bar = page.find("progress", id="job-progress")
    assert bar.attrs["value"] == bar.attrs["max"]
    # The weights the worker used, once there is a manifest.
    rows = page.find("table", id="composition-experts").find("tbody").find_all("tr")
    assert [r.find(class_="weight").text for r in rows] == ["60.0%", "40.0%"]


def test_evaluations_of_the_composition_are_listed(api: Api, web_html) -> None:
    a, _ = two_experts(api)
    queued = request_ensemble(api, [a])
    cid = queued["composition_id"]
    complete(api, lease(api), {"weights": [1.0], "metrics": RESULT})
    empty = page_of(api, web_html, cid).find("table", id="evaluations")
    assert not empty.find("tbody").has("tr", **{"data-evaluation-id": None})

    asked = api.client.post(
        "/v1/evaluations",
        json={"composition_id": cid, "text_sets": {"recipes": ["Bake the bread."]}},
        headers=auth(api.tokens.alice),
    )
    assert asked.status_code == 202, asked.text
    score = {"bits_per_byte": 1.25, "base_bits_per_byte": 1.5, "tokens": 3, "bytes": 15}
    complete(api, lease(api), {"results": {"recipes": score}})
    table = page_of(api, web_html, cid).find("table", id="evaluations")
    rows = table.find("tbody").find_all("tr", **{"data-evaluation-id": None})
    assert len(rows) == 1
    cells = [td.text for td in rows[0].find_all("td")]
    assert cells[:4] == ["recipes", "1.2500", "1.5000", "−16.7%"]


def test_the_job_error_is_shown_to_its_requester_only(api: Api, web_html, web_viewer) -> None:
    a, _ = two_experts(api)
    cid = request_ensemble(api, [a])["composition_id"]
    job = lease(api)
    worker_post(
        api,
        f"/v1/jobs/{job['id']}/fail",
        {"fencing_token": job["fencing_token"], "error": "out of memory", "retryable": False},
    )
    anonymous = page_of(api, web_html, cid)
    assert anonymous.find(id="composition").attrs["data-status"] == "failed"
    assert anonymous.find(id="job-status").text == "failed"
    assert not anonymous.has(id="job-error")
    web_viewer(api.tokens.bob)
    assert not page_of(api, web_html, cid).has(id="job-error")
    web_viewer(api.tokens.alice)
    assert "out of memory" in page_of(api, web_html, cid).find(id="job-error").text


def test_an_unknown_composition_is_a_404_page(api: Api, web_html) -> None:
    response = api.client.get("/compositions/cmp_nope")
    assert response.status_code == 404
    assert web_html(response.text).find(id="error-code").text == "composition_not_found"
    polled = api.client.get("/compositions/cmp_nope/progress")
    assert polled.status_code == 404
    assert polled.headers["content-type"] == "application/problem+json"
    assert polled.json()["code"] == "composition_not_found"


def test_a_composition_of_a_disabled_expert_is_a_451_page(api: Api, web_html) -> None:
    a, b = two_experts(api)
    cid = request_ensemble(api, [a, b])["composition_id"]
    complete(api, lease(api), {"weights": [0.5, 0.5], "metrics": RESULT})
    disabled = api.client.post(
        f"/v1/experts/{b}/disable",
        json={"reason": "licence revoked"},
        headers=auth(api.tokens.moderator),
    )
    assert disabled.status_code == 200, disabled.text
    response = api.client.get(f"/compositions/{cid}")
    assert response.status_code == 451
    page = web_html(response.text)
    assert page.find(id="error-code").text == "expert_disabled"
    assert b in page.find(id="error").text
    assert not page.has(id="composition")
    assert "'unsafe-inline'" not in response.headers["content-security-policy"]
    polled = api.client.get(f"/compositions/{cid}/progress")
    assert polled.status_code == 451
    assert polled.json()["code"] == "expert_disabled"


def test_the_page_carries_the_security_headers(api: Api) -> None:
    a, _ = two_experts(api)
    cid = request_ensemble(api, [a])["composition_id"]
    response = api.client.get(f"/compositions/{cid}")
    csp = response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert " style=" not in response.text
    assert "<script>" not in response.text


def test_the_progress_endpoint_is_not_in_the_api_document(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if not p.startswith("/v1/") and "composition" in p]
