"""SDK downloads through a faulty proxy: the SDK returns a bit-exact file or a typed error.

A real registry (the app under uvicorn, in a thread, on SQLite: the SDK's behaviour does not
depend on the database) stores a base model and an expert of about half a MiB. The SDK
reaches it only through ``FaultyProxy``, a small HTTP/1.1 proxy on loopback that forwards
each request and then damages blob responses the way a bad network or a broken middlebox
does: it truncates them, flips a byte, drops or resets the connection mid-body, lies in
Content-Length (longer, shorter, junk appended), ignores Range, or answers a range request
with a wrong Content-Range. Most faults hit only the first response of each blob (the link
then behaves); the ``always`` ones hit every response.

For each mode: the download either returns the exact bytes (and, where a resume is
possible, the proxy saw a Range request and the SDK read less than twice the file) or
raises ``DigestMismatch`` / ``DownloadInterrupted``; the destination never holds bytes that
fail the digest, and no temporary file is left next to it. docs/sdk.md, "Downloads",
describes the behaviour.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.adversarial import report
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes, make_expert_schema

from registry.client import (
    Agora,
    AgoraError,
    DigestMismatch,
    DownloadIntegrityError,
    DownloadInterrupted,
    TransportError,
)

# --------------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class Reply:
    """A response as the proxy will send it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    content_length: int | None = None  # what the header says; None: len(body)
    drop_after: int | None = None  # close the connection after this many body bytes
    reset: bool = False  # close with a TCP RST instead of a FIN

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def with_header(self, name: str, value: str) -> Reply:
        kept = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        return replace(self, headers=[*kept, (name, value)])


Damage = Callable[[Reply], Reply]
Fault = Callable[[int, Reply], Reply]
"""(how many responses of this blob the proxy sent before, the honest reply) -> what is sent"""


def first(damage: Damage) -> Fault:
    """The first response of each blob is damaged; the link then behaves."""
    return lambda index, reply: damage(reply) if index == 0 else reply


def every(damage: Damage) -> Fault:
    return lambda index, reply: damage(reply)


def ranges(damage: Damage) -> Fault:
    """The first response is dropped a third of the way in, so the SDK has something to
    resume; every range answer (206) after it is damaged."""

    def fault(index: int, reply: Reply) -> Reply:
        if index == 0:
            return drop(1 / 3)(reply)
        return damage(reply) if reply.status == 206 else reply

    return fault


@dataclass
class Mode:
    name: str
    fault: Fault
    strip_range: bool = False  # the proxy drops Range (and If-Range) from requests
    expect: str = "ok"  # "ok", or the class name of the typed error
    resumes: bool = False  # a correct resume is possible: a Range request must be seen


@dataclass
class Seen:
    path: str
    range: str | None
    status: int
    body_sent: int


@dataclass
class FaultyProxy:
    upstream_port: int
    mode: Mode | None = None
    seen: list[Seen] = field(default_factory=list)
    faulted: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_mode(self, mode: Mode | None) -> None:
        with self.lock:
            self.mode = mode
            self.seen = []
            self.faulted = {}

    def blob_requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def serve(self, conn: socket.socket, method: str, target: str, headers: list, body: bytes):
        path = target.split("?", 1)[0]
        is_blob = method == "GET" and (path.endswith("/weights") or "/files/" in path)
        with self.lock:
            mode = self.mode if is_blob else None
        forwarded = [
            (k, v)
            for k, v in headers
            if k.lower() not in _HOP_BY_HOP
            and not (mode and mode.strip_range and k.lower() in ("range", "if-range"))
        ]
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            upstream.request(method, target, body=body or None, headers=dict(forwarded))
            answer = upstream.getresponse()
            reply = Reply(
                status=answer.status,
                reason=answer.reason,
                headers=[
                    (k, v)
                    for k, v in answer.getheaders()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
                ],
                body=answer.read(),
            )
        finally:
            upstream.close()
        if mode is not None:
            with self.lock:
                index = self.faulted.get(path, 0)
                self.faulted[path] = index + 1
            reply = mode.fault(index, reply)
        sent = _send(conn, reply, head=method == "HEAD")
        if is_blob:
            range_header = next((v for k, v in headers if k.lower() == "range"), None)
            with self.lock:
                self.seen.append(Seen(path, range_header, reply.status, sent))


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def _send(conn: socket.socket, reply: Reply, *, head: bool) -> int:
    length = len(reply.body) if reply.content_length is None else reply.content_length
    lines = [f"HTTP/1.1 {reply.status} {reply.reason}"]
    lines += [f"{k}: {v}" for k, v in reply.headers]
    lines += [f"Content-Length: {length}", "Connection: close", "", ""]
    body = b"" if head else reply.body
    if reply.drop_after is not None:
        body = body[: reply.drop_after]
    try:
        conn.sendall("\r\n".join(lines).encode("latin-1") + body)
    except OSError:
        return 0  # the client went away first
    if reply.reset:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return len(body)


class _Handler(socketserver.StreamRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        line = self.rfile.readline(65537)
        if not line:
            return
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while (raw := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        body = self.rfile.read(length) if length else b""
        self.server.proxy.serve(self.connection, method, target, headers, body)


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultyProxy


# --------------------------------------------------------------------------- the faults


def truncate(fraction: float) -> Damage:
    """A complete-looking response (honest Content-Length) that holds only the first part."""
    return lambda r: replace(r, body=r.body[: int(len(r.body) * fraction)])


def flip(fraction: float) -> Damage:
    def fault(r: Reply) -> Reply:
        body = bytearray(r.body)
        if body:
            body[min(int(len(body) * fraction), len(body) - 1)] ^= 0x20
        return replace(r, body=bytes(body))

    return fault


def drop(fraction: float, *, reset: bool = False) -> Damage:
    return lambda r: replace(r, drop_after=int(len(r.body) * fraction), reset=reset)


def content_length_plus(extra: int) -> Damage:
    """Content-Length says ``extra`` more bytes than are sent (then the connection closes)."""
    return lambda r: replace(r, content_length=len(r.body) + extra)


def content_length_minus(fewer: int) -> Damage:
    """Content-Length says ``fewer`` bytes less than the whole body, which is sent anyway."""
    return lambda r: replace(r, content_length=max(len(r.body) - fewer, 0))


def junk_appended(extra: int) -> Damage:
    """``extra`` bytes of junk after the body, counted in an honest Content-Length."""
    return lambda r: replace(r, body=r.body + b"\xa5" * extra)


def content_range_start_zero(r: Reply) -> Reply:
    """A range answer that says it starts at byte 0 (it does not)."""
    span, _, total = (r.header("Content-Range") or "bytes 0-0/0").partition("/")
    first, _, last = span.removeprefix("bytes ").partition("-")
    return r.with_header("Content-Range", f"bytes 0-{int(last) - int(first)}/{total}")


def content_range_wrong_total(r: Reply) -> Reply:
    span, _, total = (r.header("Content-Range") or "bytes 0-0/0").partition("/")
    return r.with_header("Content-Range", f"{span}/{int(total) + 7}")


def range_of_other_bytes(r: Reply) -> Reply:
    """A correct Content-Range over the wrong bytes (as a confused cache might serve)."""
    return replace(r, body=bytes(reversed(r.body)))


def other_digest(r: Reply) -> Reply:
    return r.with_header("X-Agora-Digest", "sha256:" + "ab" * 32)


def status_200_empty(r: Reply) -> Reply:
    return replace(r, status=200, reason="OK", body=b"")


def cut_at(n: int) -> Damage:
    """Every response ends after ``n`` body bytes (the connection closes)."""
    return lambda r: replace(r, drop_after=n)


EXPERT_MIN_SIZE = 400_000  # the fixture's expert is larger: 80 kB cuts need 5+ resumes

MODES = [
    Mode("truncate", first(truncate(0.4)), resumes=True),
    Mode("flip_byte", first(flip(0.7))),
    Mode("drop", first(drop(0.5)), resumes=True),
    Mode("reset", first(drop(0.3, reset=True)), resumes=True),
    Mode("content_length_longer", first(content_length_plus(4096))),
    Mode("content_length_shorter", first(content_length_minus(50_000)), resumes=True),
    Mode("junk_appended", first(junk_appended(10_000))),
    Mode("ignore_range", first(drop(0.5)), strip_range=True, resumes=True),
    Mode("wrong_content_range", ranges(content_range_start_zero), resumes=True),
    Mode("wrong_content_range_total", ranges(content_range_wrong_total), resumes=True),
    Mode("range_of_other_bytes", ranges(range_of_other_bytes)),
    Mode("trickle", every(cut_at(80_000)), resumes=True),
    # The proxy never heals: the SDK must refuse.
    Mode("flip_byte_always", every(flip(0.1)), expect="DigestMismatch"),
    Mode("drop_at_0_always", every(drop(0.0)), expect="DownloadInterrupted"),
    Mode("empty_200_always", every(status_200_empty), expect="DownloadInterrupted"),
    Mode("other_digest_header", every(other_digest), expect="DigestMismatch"),
]


# --------------------------------------------------------------------------- fixtures


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner = inner
        self.counter = counter

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.counter[0] += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class CountingTransport(httpx.BaseTransport):
    """The SDK's real network transport, counting the blob body bytes the SDK read."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.blob_bytes = [0]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        path = request.url.path
        if not (path.endswith("/weights") or "/files/" in path):
            return response
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountingStream(response.stream, self.blob_bytes),
            request=request,
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


@dataclass
class Stored:
    proxy: FaultyProxy
    url: str
    expert_id: str
    expert: bytes
    base_revision: str
    base_files: dict[str, bytes]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    import uvicorn

    from registry.app import create_app
    from registry.services.tokens import create_token
    from registry.settings import Settings

    root = tmp_path_factory.mktemp("sdk_download")
    settings = Settings(
        data_dir=root / "agora",
        database_url=f"sqlite:///{root / 'agora.db'}",
        # Every request comes from the proxy's one address: the retries this suite
        # provokes are not what the anonymous rate limit is for.
        rate_limit_anonymous_per_second=0,
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)

    proxy = FaultyProxy(upstream_port=port)
    proxy_server = _ProxyServer(("127.0.0.1", 0), _Handler)
    proxy_server.proxy = proxy
    proxy_thread = threading.Thread(target=proxy_server.serve_forever, daemon=True)
    proxy_thread.start()
    try:
        with app.state.runtime.sessions() as session, session.begin():
            _, admin = create_token(session=session, name="admin", role="admin")
            _, alice = create_token(session=session, name="alice", role="contributor")
        # Wide enough tensors that the expert is about half a MiB: every fault lands
        # mid-stream, well past the first socket read.
        schema = make_expert_schema(d_model=64, d_ffn=512)
        base_files = make_base_files(schema)
        direct = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=direct, timeout=60) as http:
            answer = http.post(
                "/v1/base-models",
                files={
                    "config": ("config.json", base_files["config.json"]),
                    "tokenizer": ("tokenizer.json", base_files["tokenizer.json"]),
                    "weights": ("model.safetensors", base_files["model.safetensors"]),
                },
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert answer.status_code == 201, answer.text
            revision = answer.json()["revision"]
            expert = make_expert_bytes(answer.json()["expert_schema"], base_revision=revision)
            answer = http.post(
                "/v1/experts",
                files={
                    "weights": ("expert.safetensors", expert),
                    "datasheet": ("DATASHEET.md", make_datasheet()),
                },
                data={"base_revision": revision},
                headers={"Authorization": f"Bearer {alice}"},
            )
            assert answer.status_code in (200, 201, 202), answer.text
        assert len(expert) > EXPERT_MIN_SIZE
        yield Stored(
            proxy=proxy,
            url=f"http://127.0.0.1:{proxy_server.server_address[1]}",
            expert_id=answer.json()["id"],
            expert=expert,
            base_revision=revision,
            base_files=base_files,
        )
    finally:
        proxy_server.shutdown()
        proxy_server.server_close()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def client(stored: Stored, cache: Path) -> tuple[Agora, CountingTransport]:
    counting = CountingTransport()
    # Short backoffs keep the suite inside its time budget; the retry counts are the
    # defaults a user gets.
    agora = Agora(stored.url, transport=counting, cache_dir=cache, backoff_factor=0.002)
    return agora, counting


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*agora-tmp"))


# --------------------------------------------------------------------------- tests


@dataclass
class Outcome:
    mode: Mode
    result: str  # "ok" or the error's class name
    read_ratio: float  # blob body bytes the SDK read / the file's size
    bad_file: bool = False
    problems: list[str] = field(default_factory=list)


def try_mode(stored: Stored, mode: Mode, work: Path) -> Outcome:
    """One download of the expert through the proxy in ``mode``, and what it left behind."""
    size = len(stored.expert)
    digest = hashlib.sha256(stored.expert).hexdigest()
    dest = work / "out" / "expert.safetensors"
    dest.parent.mkdir(parents=True)
    cache = work / "cache"
    agora, counting = client(stored, cache)
    stored.proxy.set_mode(mode)
    error: AgoraError | None = None
    path: Path | None = None
    try:
        path = agora.experts.download(stored.expert_id, dest=dest)
    except AgoraError as exc:
        error = exc
    seen = stored.proxy.blob_requests()
    out = Outcome(mode, "ok" if error is None else type(error).__name__, 0.0)
    out.read_ratio = counting.blob_bytes[0] / size
    problems = out.problems

    if out.result != mode.expect:
        problems.append(f"expected {mode.expect}, got {out.result}: {error}")
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() != digest:
        out.bad_file = True
        problems.append("the destination holds bytes that fail the digest")
    if leftovers(dest.parent):
        problems.append(f"temporary files left next to the destination: {leftovers(dest.parent)}")
    parts = list((cache / "sha256").glob("*.part"))
    if error is None:
        if path != dest or dest.read_bytes() != stored.expert:
            out.bad_file = True
            problems.append("returned a file that is not the expert's bytes")
        if parts:
            problems.append("a .part file was left after a verified download")
        if mode.resumes and not any(s.range for s in seen):
            problems.append("no Range request reached the proxy")
        if mode.resumes and out.read_ratio >= 2:
            problems.append(f"the SDK read {out.read_ratio:.2f}x the file")
        if out.read_ratio > 2:
            problems.append(f"the SDK read {out.read_ratio:.2f}x the file")
    else:
        if dest.exists():
            problems.append("a refused download left a file at the destination")
        if agora.cache.blob_path(digest).exists():
            problems.append("a refused download left a blob in the cache")
        if isinstance(error, DownloadIntegrityError) and parts:
            problems.append("an integrity error kept its .part file")
        if isinstance(error, DownloadInterrupted):
            if not isinstance(error, TransportError) or error.size != size:
                problems.append(f"DownloadInterrupted carries the wrong facts: {error!r}")
            # The link heals: the next call resumes what was kept and finishes.
            stored.proxy.set_mode(None)
            again = agora.experts.download(stored.expert_id, dest=dest)
            if again.read_bytes() != stored.expert:
                out.bad_file = True
                problems.append("the download after an interruption is not bit-exact")
            if error.received and not any(s.range for s in stored.proxy.blob_requests()):
                problems.append("the download after an interruption did not resume")
        elif not isinstance(error, DigestMismatch):
            problems.append(f"unexpected error type {type(error).__name__}")
    if problems:
        trace = [(s.range, s.status, s.body_sent) for s in seen]
        problems.append(f"requests (range, status, body bytes sent): {trace}")
    agora.close()
    stored.proxy.set_mode(None)
    return out


def test_expert_download_through_a_faulty_proxy(stored: Stored, tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes = [try_mode(stored, mode, tmp_path / mode.name) for mode in MODES]
    returned = [o for o in outcomes if o.result == "ok"]
    report(
        "sdk_download",
        modes=len(outcomes),
        returned_ok=len(returned),
        resumed=sum(1 for o in returned if o.mode.resumes),
        refused=len(outcomes) - len(returned),
        bad_files_returned=sum(o.bad_file for o in outcomes),
        worst_read_ratio=f"{max(o.read_ratio for o in returned):.2f}",
        seconds=f"{time.monotonic() - started:.1f}",
    )
    failed = [f"{o.mode.name}: " + "; ".join(o.problems) for o in outcomes if o.problems]
    assert failed == [], "\n".join(failed)
    assert sum(o.bad_file for o in outcomes) == 0


def test_base_bundle_download_through_a_faulty_proxy(stored: Stored, tmp_path: Path) -> None:
    """Each of the three files of a base revision is dropped mid-body once, then resumed."""
    agora, _ = client(stored, tmp_path / "cache")
    stored.proxy.set_mode(Mode("drop_each_file", first(drop(0.5))))
    try:
        target = agora.bases.download(stored.base_revision, tmp_path / "base")
        seen = stored.proxy.blob_requests()
    finally:
        stored.proxy.set_mode(None)
        agora.close()
    for kind in ("config", "tokenizer", "weights"):
        ranged = [s.range for s in seen if s.path.endswith(f"/files/{kind}")]
        assert len(ranged) == 2, (kind, seen)
        assert ranged[0] is None, (kind, seen)
        assert ranged[1], (kind, seen)
    assert (target / "config.json").read_bytes() == stored.base_files["config.json"]
    assert (target / "tokenizer.json").read_bytes() == stored.base_files["tokenizer.json"]
    assert (target / "model.safetensors").read_bytes() == stored.base_files["model.safetensors"]
    assert leftovers(target) == []
