"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from registry.api.deps import RuntimeDep
from registry.api.openapi import problems
from registry.api.problems import problem_response
from registry.api.schemas import HealthOut
from registry.errors import AgoraError, ServiceUnavailable
from registry.runtime import Runtime

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers", response_model=HealthOut)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(runtime: Runtime) -> str | None:
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        return f"database unreachable: {type(exc).__name__}"
    return None


def _check_storage(runtime: Runtime) -> str | None:
    try:
        runtime.store.check()
    except AgoraError as exc:
        return exc.detail
    except Exception as exc:
        return f"storage unreachable: {type(exc).__name__}"
    return None


@router.get(
    "/readyz",
    summary="Readiness: database and blob storage reachable",
    responses=problems({503: "not_ready (with `checks`: which dependency failed)"}),
)
async def readyz(runtime: RuntimeDep) -> Response:
    db_error = await run_in_threadpool(_check_database, runtime)
    storage_error = await run_in_threadpool(_check_storage, runtime)
    checks = {
        "database": "ok" if db_error is None else "failed",
        "storage": "ok" if storage_error is None else "failed",
    }
    if db_error is None and storage_error is None:
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "; ".join(e for e in (db_error, storage_error) if e)
    body: dict[str, Any] = ServiceUnavailable(detail, code="not_ready").problem("/readyz")
    body["checks"] = checks
    return problem_response(body, 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics(runtime: RuntimeDep) -> Response:
    body, content_type = runtime.metrics.render()
    return Response(body, media_type=content_type)
