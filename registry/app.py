"""The app factory. Nothing is built at import: ``create_app`` wires routes, and its lifespan
opens the database (migrating the embedded SQLite default, refusing a PostgreSQL that is
behind), the blob store and the staging area."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool

from registry.api import (
    audit,
    base_models,
    compositions,
    experts,
    forgetting,
    health,
    jobs,
    moderation,
    monitoring,
    reports,
    search,
    tokens,
)
from registry.api.deps import optional_principal
from registry.api.docs import install_docs
from registry.api.hygiene import RequestHygiene
from registry.api.limits import install_limits
from registry.api.openapi import install_methods, install_openapi
from registry.api.problems import install_problem_handlers
from registry.db.engine import ensure_migrated, make_engine, make_sessionmaker, upgrade
from registry.metrics import Metrics, MetricsMiddleware
from registry.retrieval.embedders import Embedder, make_embedder
from registry.retrieval.service import Retrieval
from registry.runtime import Runtime
from registry.settings import Settings
from registry.storage import open_blob_store, open_staging
from registry.web import install_web

log = logging.getLogger("registry")

API_DESCRIPTION = """\
Agora's registry: base model revisions, experts (weights + datasheet, strictly validated),
content-addressed downloads with HTTP Range, search by sample text (FAISS over datasheet
sample embeddings), moderation (disable / enable with a reason), compositions and evaluations
computed by workers that lease jobs over HTTP (lease, heartbeat, fenced complete / fail).
Errors are RFC 9457 problem+json with a stable machine-readable `code`. Writes need
`Authorization: Bearer agora_...` (`agora admin create-token --role ROLE --name NAME`).
"""


def build_runtime(
    settings: Settings, metrics: Metrics, *, embedder: Embedder | None = None
) -> Runtime:
    """Open the database, blob store and staging; the retrieval index is built separately
    (``runtime.retrieval.start()``, in the lifespan), so CLI commands stay fast."""
    engine = make_engine(settings.resolved_database_url)
    try:
        if settings.should_auto_migrate:
            upgrade(engine)
        else:
            ensure_migrated(engine)
        store = open_blob_store(settings)
        staging = open_staging(settings)
        # The staging files of uploads whose server process was killed: nobody finishes them.
        dead = staging.open()
        if dead:
            log.info("removed %d staging file(s) of killed uploads", len(dead))
    except BaseException:
        engine.dispose()
        raise
    sessions = make_sessionmaker(engine)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        store=store,
        staging=staging,
        metrics=metrics,
        retrieval=Retrieval(
            sessions=sessions,
            # The MiniLM embedder loads its model on first use, not here.
            embedder=embedder if embedder is not None else make_embedder(settings.embedder),
            settings=settings,
        ),
    )


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """``embedder`` overrides ``settings.embedder`` (tests and benchmarks pass their own)."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = build_runtime(settings, metrics, embedder=embedder)
        try:
            # Re-embeds what the configured embedder lacks, then builds the FAISS indexes.
            await run_in_threadpool(runtime.retrieval.start)
        except BaseException:
            runtime.engine.dispose()
            raise
        app.state.runtime = runtime
        log.info(
            "registry ready: database %s, blobs in %s",
            runtime.engine.url.render_as_string(hide_password=True),
            runtime.store.location,
        )
        try:
            yield
        finally:
            app.state.runtime = None
            runtime.staging.close()
            runtime.engine.dispose()

    app = FastAPI(
        title="Agora registry",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        # /docs is served from the package (install_docs): no CDN, no ReDoc.
        docs_url=None,
        redoc_url=None,
        # /openapi.json is a route of install_openapi, so the credential check applies.
        openapi_url=None,
        # A credential that is sent and fails is a 401 on every route (registry/api/deps.py).
        dependencies=[Depends(optional_principal)],
    )
    app.state.settings = settings
    app.state.runtime = None
    # Innermost of the three: it reads bodies through the limits' paced `receive`, after
    # their rate and search-slot checks (registry/api/hygiene.py).
    app.add_middleware(RequestHygiene, router=app.router, max_body_bytes=settings.json_body_limit)
    # Added first, so the metrics middleware (added next, outermost) counts its refusals.
    install_limits(app, settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_problem_handlers(app)
    install_openapi(app)
    install_docs(app)
    app.include_router(health.router)
    app.include_router(base_models.router)
    app.include_router(search.router)
    app.include_router(moderation.router)
    app.include_router(reports.router)
    app.include_router(compositions.router)
    app.include_router(experts.router)
    app.include_router(forgetting.router)
    app.include_router(monitoring.router)
    app.include_router(jobs.router)
    app.include_router(audit.router)
    app.include_router(tokens.router)
    install_methods(app)
    install_web(app)
    return app
