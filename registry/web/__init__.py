"""Server-rendered web pages: browse, search by text, inspect lineage and evaluations,
moderate (docs/web.md).

Jinja2 templates over the same service functions as the API; plain HTML and one small
stylesheet, one small script for live job progress, nothing fetched from elsewhere.
``install_web`` mounts the assets and the page routers; pages never appear in the OpenAPI
document.
"""

from __future__ import annotations

from fastapi import FastAPI

from registry.web import account, catalogue, home, moderation
from registry.web.render import STATIC_DIR, STATIC_PATH, PageStatic


def install_web(app: FastAPI) -> None:
    app.mount(STATIC_PATH, PageStatic(directory=STATIC_DIR), name="web-assets")
    app.include_router(home.router)
    app.include_router(catalogue.router)
    app.include_router(account.router)
    app.include_router(moderation.router)
