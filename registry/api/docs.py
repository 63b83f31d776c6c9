"""``/docs``: Swagger UI served from the package (registry/static/swagger-ui), never from a
CDN, so the API documentation works on a machine without internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_DIR = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
ASSETS_PATH = "/static/swagger-ui"


def install_docs(app: FastAPI, *, docs_url: str = "/docs") -> None:
    """Serve Swagger UI at ``docs_url`` with its assets at ``ASSETS_PATH``; the app is
    built with ``docs_url=None`` and ``redoc_url=None`` (ReDoc would need a CDN)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            # No online validator: it would send the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
