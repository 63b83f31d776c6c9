"""Prometheus metrics: what an operator's dashboard sees after real traffic."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.artifacts import make_datasheet
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import PlainTextResponse

from registry.metrics import UNMATCHED_ROUTE, Metrics, MetricsMiddleware


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_uploads_downloads_and_routes_are_counted(api: Any) -> None:
    weights = api.expert_bytes(seed=1)
    accepted = api.submit(weights=weights)
    assert accepted.status_code == 201
    rejected = api.submit(weights=b"\x80\x04 not safetensors, a pickle")
    assert rejected.status_code == 422
    expert_id = accepted.json()["id"]
    assert api.client.get(f"/v1/experts/{expert_id}/weights").content == weights
    assert api.client.get("/v1/experts/ex_00000000000000000000000000").status_code == 404
    assert api.client.get("/no/such/page").status_code == 404

    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    assert value(text, "agora_uploads_total", kind="expert", outcome="accepted") == 1
    assert value(text, "agora_uploads_total", kind="expert", outcome="rejected") == 1
    # Bytes received: the weights and the datasheet of the accepted upload.
    assert value(text, "agora_upload_bytes_total", kind="expert", outcome="accepted") == len(
        weights
    ) + len(make_datasheet())
    assert value(text, "agora_download_bytes_total", kind="expert") == len(weights)

    # Requests are labelled by route template: ids never become label values.
    assert expert_id not in text
    assert "ex_00000000000000000000000000" not in text
    routes = {
        dict(labels)["route"]
        for (name, labels) in samples(text)
        if name == "agora_http_requests_total"
    }
    assert "/v1/experts" in routes
    assert UNMATCHED_ROUTE in routes
    assert any(r.startswith("/v1/experts/{") and r.endswith("}/weights") for r in routes)
    requests = "agora_http_requests_total"
    assert value(text, requests, method="POST", route="/v1/experts", status="201") == 1
    assert value(text, requests, method="POST", route="/v1/experts", status="422") == 1
    assert value(text, requests, method="POST", route="/v1/base-models", status="201") == 1


def _tiny_app(metrics: Metrics) -> FastAPI:
    app = FastAPI()

    @app.get("/hello/{name}", response_class=PlainTextResponse)
    def hello(name: str) -> str:
        return "hi"

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("handler bug")

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def test_each_app_has_its_own_registry_and_errors_count_as_500() -> None:
    first, second = Metrics(), Metrics()
    with TestClient(_tiny_app(first), raise_server_exceptions=False) as client:
        for name in ("a", "b", "c"):
            assert client.get(f"/hello/{name}").text == "hi"
        assert client.get("/boom").status_code == 500
    with TestClient(_tiny_app(second)) as client:
        client.get("/hello/z")

    text, content_type = first.render()
    assert content_type.startswith("text/plain")
    decoded = text.decode()
    assert (
        value(
            decoded, "agora_http_requests_total", method="GET", route="/hello/{name}", status="200"
        )
        == 3
    )
    assert (
        value(decoded, "agora_http_requests_total", method="GET", route="/boom", status="500") == 1
    )
    other = second.render()[0].decode()
    assert (
        value(other, "agora_http_requests_total", method="GET", route="/hello/{name}", status="200")
        == 1
    )


@pytest.mark.parametrize("kind", ["expert", "base_model"])
def test_record_upload_counts_bytes(kind: str) -> None:
    metrics = Metrics()
    metrics.record_upload(kind=kind, outcome="accepted", size=10)
    metrics.record_upload(kind=kind, outcome="accepted", size=5)
    text = metrics.render()[0].decode()
    assert value(text, "agora_uploads_total", kind=kind, outcome="accepted") == 2
    assert value(text, "agora_upload_bytes_total", kind=kind, outcome="accepted") == 15
