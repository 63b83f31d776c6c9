"""catalogue pages (being written)"""

from __future__ import annotations

from registry.web.render import page_router

router = page_router()
