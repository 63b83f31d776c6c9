"""The SDK against the real registry app, in-process.

The parent conftest's ``app`` / ``client`` / ``tokens`` / ``base`` fixtures are reused; this
file pins them to SQLite (the SDK's behaviour does not depend on the database backend, the
service tests cover both) and adds SDK clients whose transport is the in-process app's,
wrapped to record what crossed the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from registry.client import Agora
from registry.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "agora", database_url=f"sqlite:///{tmp_path / 'agora.db'}")


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    range: str | None
    idempotency_key: str | None
    body_bytes: int = 0  # response body bytes actually read by the client


@dataclass
class Wire:
    """Every request the SDK made, and how many response bytes it read for each."""

    exchanges: list[Exchange] = field(default_factory=list)

    def weights(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.endswith("/weights") or "/files/" in e.path]


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, exchange: Exchange) -> None:
        self.inner = inner
        self.exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.exchange.body_bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class RecordingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, wire: Wire) -> None:
        self.inner = inner
        self.wire = wire

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        exchange = Exchange(
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            range=request.headers.get("Range"),
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        self.wire.exchanges.append(exchange)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountingStream(response.stream, exchange),
            request=request,
        )


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def transport(client: TestClient, wire: Wire) -> httpx.BaseTransport:
    # TestClient is an httpx.Client whose transport runs the ASGI app in-process.
    return RecordingTransport(client._transport, wire)


@pytest.fixture
def make_agora(transport: httpx.BaseTransport, tmp_path: Path) -> Iterator[Callable[..., Agora]]:
    made: list[Agora] = []

    def factory(token: str | None = None, **kwargs: object) -> Agora:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        agora = Agora("http://testserver", token=token, transport=transport, **kwargs)  # type: ignore[arg-type]
        agora._sleep = lambda _s: None
        made.append(agora)
        return agora

    yield factory
    for agora in made:
        agora.close()


@pytest.fixture
def alice(make_agora, tokens) -> Agora:
    return make_agora(tokens.alice)


@dataclass(frozen=True)
class LiveServer:
    url: str
    app: FastAPI


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    """The app behind a real uvicorn on a loopback port, in a thread (for the CLI)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
