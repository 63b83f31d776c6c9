"""The SDK against a TestClient's app, in-process: tests that run the real worker or the
SDK without a server on a port (tests/worker, tests/registry)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from registry.client import Agora


class _Stream(httpx.SyncByteStream):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        yield from self.inner

    def close(self) -> None:
        self.inner.close()


class AppTransport(httpx.BaseTransport):
    """TestClient's in-process ASGI transport, with the sync stream type httpx.Client
    expects (TestClient's own responses carry Starlette's)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Stream(response.stream),
            request=request,
        )


def in_process_agora(client: TestClient, token: str, *, cache_dir: Path, **kwargs: Any) -> Agora:
    """An SDK client of ``client``'s app that never sleeps between retries."""
    agora = Agora(
        "http://testserver",
        token=token,
        transport=AppTransport(client._transport),
        cache_dir=cache_dir,
        **kwargs,
    )
    agora._sleep = lambda _s: None  # type: ignore[method-assign]
    return agora
