"""Health, readiness, metrics and the problem+json shape of routing errors."""

from __future__ import annotations

from fastapi.testclient import TestClient

from registry.app import create_app
from registry.settings import Settings


def test_healthz_and_readyz(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}


def test_readyz_is_503_when_storage_is_unusable(database_url, tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"a file where the blob directory should be")
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, storage_url=str(blocker / "blobs")
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready"
    assert body["checks"] == {"database": "ok", "storage": "failed"}


def test_metrics_count_requests_by_route_and_uploads(api) -> None:
    expert_id = api.submit().json()["id"]
    api.client.get(f"/v1/experts/{expert_id}")
    api.submit(weights=b"not safetensors at all")
    text = api.client.get("/metrics").text
    assert (
        'agora_http_requests_total{method="GET",route="/v1/experts/{expert_id}",status="200"} 1.0'
        in text
    )
    assert 'agora_uploads_total{kind="expert",outcome="accepted"} 1.0' in text
    assert 'agora_uploads_total{kind="expert",outcome="rejected"} 1.0' in text
    assert expert_id not in text  # ids never become label values


def test_routing_errors_are_problem_json(client) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.json()["code"] == "not_found"
    wrong_method = client.delete("/v1/experts")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"
    bad_query = client.get("/v1/experts", params={"limit": "many"})
    assert bad_query.status_code == 400
    assert bad_query.json()["code"] == "invalid_request"
    assert bad_query.json()["errors"][0]["loc"] == ["query", "limit"]


def test_openapi_documents_the_upload_fields(client) -> None:
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/experts"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(schema["schema"]["required"]) == {"weights", "datasheet", "base_revision"}
    assert client.get("/docs").status_code == 200


def test_database_outage_is_503_with_retry_after(api) -> None:
    # Point the running app at a database that is gone: requests must say "retry", not 500.
    from registry.db.engine import make_engine, make_sessionmaker

    runtime = api.app.state.runtime
    gone = make_engine("sqlite:////nonexistent-dir/for/sure/agora.db")
    runtime.sessions = make_sessionmaker(gone)
    response = api.client.get("/v1/experts")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["code"] == "database_unavailable"


def test_docs_work_offline_from_the_package(client) -> None:
    """/docs names no URL outside this server, and every asset it loads is served here."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "SwaggerUIBundle" in html
    assert not re.search(r"https?://", html), "the page must not load anything from the web"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {a.rsplit("/", 1)[-1] for a in assets} == {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
    }
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 500, asset
    script = next(a for a in assets if a.endswith(".js"))
    assert "SwaggerUIBundle" in client.get(script).text
    openapi_url = re.search(r"url: '([^']+)'", html)
    assert openapi_url is not None
    assert client.get(openapi_url.group(1)).json()["info"]["title"] == "Agora registry"
    assert client.get("/redoc").status_code == 404
