"""Resource limits, against a real `agora serve` with its default limits (issue 14, defect 7).

* Rates: 500 rapid requests from one token get 429 ``rate_limited`` with ``Retry-After``;
  no more requests pass than the token bucket holds; another token, and the same token
  once ``Retry-After`` has passed, are served. The same per client address for anonymous
  requests, and made-up tokens cannot open a fresh bucket per request.
* Searches: concurrent maximum-size searches from many addresses saturate the server; only
  ``search_max_concurrent`` run, the queue beyond is refused with 503 ``search_busy``, and
  ``/healthz`` keeps answering (its latency and the server's RSS are reported, not
  asserted).
* Sizes: a body declared far over a route's limit is refused before a byte of it is read.
* Timeouts: a request head sent a byte at a time, or never, is cut off; an upload body that
  stalls, or trickles, gets 408 ``request_timeout`` and leaves no staging file.

Each client connects from its own loopback address (127.0.0.x, Linux), so the per-address
buckets of one test never drain another's. The limiter keeps no state in the database, so
the server runs on SQLite only. ``AGORA_ADVERSARIAL=heavy`` fires ten times the requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from helpers.adversarial import report, scaled
from helpers.artifacts import BASE_FILE_FIELDS, make_base_files
from helpers.processes import Processes, Registry, start_registry, wait_until

from registry.api.limits import Slots, TokenBucket, charge, client_address, is_search
from registry.settings import Settings

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
PROBLEM_JSON = "application/problem+json"
DEFAULTS = Settings()
# The server under test runs with rates below the defaults (set through the real settings),
# so a slow machine that serves the flood slowly still sees the bucket empty.
LIMITS = DEFAULTS.model_copy(
    update={
        "rate_limit_token_per_second": 20.0,
        "rate_limit_token_burst": 100,
        "rate_limit_anonymous_per_second": 10.0,
        "rate_limit_anonymous_burst": 50,
    }
)


@dataclass
class Server:
    registry: Registry
    host: str
    port: int
    revision: str
    contributor: str

    def http(self, address: str, token: str | None = None) -> httpx.Client:
        """A client whose connections come from ``address`` (127.0.0.x)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(
            base_url=self.registry.url, headers=headers, timeout=30, transport=transport
        )

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=30)

    def staging_files(self) -> list[Path]:
        return sorted((self.registry.data_dir / "staging").glob("*/upload-*"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("limits")
    procs = Processes(root / "logs")
    try:
        registry = start_registry(
            procs,
            root / "data",
            f"sqlite:///{root / 'data' / 'agora.db'}",
            settings={
                "AGORA_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
                "AGORA_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S),
                "AGORA_RATE_LIMIT_TOKEN_PER_SECOND": str(LIMITS.rate_limit_token_per_second),
                "AGORA_RATE_LIMIT_TOKEN_BURST": str(LIMITS.rate_limit_token_burst),
                "AGORA_RATE_LIMIT_ANONYMOUS_PER_SECOND": str(
                    LIMITS.rate_limit_anonymous_per_second
                ),
                "AGORA_RATE_LIMIT_ANONYMOUS_BURST": str(LIMITS.rate_limit_anonymous_burst),
            },
        )
        files = make_base_files()
        admin = registry.create_token("admin", "admin")
        with registry.http(admin) as http:
            response = http.post(
                "/v1/base-models",
                files={field: (name, files[name]) for field, name in BASE_FILE_FIELDS.items()},
            )
        assert response.status_code == 201, response.text
        host, port = registry.url.removeprefix("http://").split(":")
        yield Server(
            registry=registry,
            host=host,
            port=int(port),
            revision=response.json()["revision"],
            contributor=registry.create_token("contributor", "alice"),
        )
    finally:
        procs.stop_all()


def _flood(
    server: Server, address: str, tokens: list[str | None], path: str = "/v1/base-models"
) -> tuple[list[httpx.Response], float]:
    """GET ``path`` once per entry of ``tokens`` (None: anonymous), from 8 threads with a
    keep-alive connection each; the responses and the seconds it took."""
    chunks = [tokens[i::8] for i in range(8)]

    def run(chunk: list[str | None]) -> list[httpx.Response]:
        with server.http(address) as http:
            return [
                http.get(path, headers={"Authorization": f"Bearer {t}"} if t else {}) for t in chunk
            ]

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        responses = [r for part in pool.map(run, chunks) for r in part]
    return responses, time.monotonic() - start


def _assert_rate_limited(response: httpx.Response) -> int:
    """A 429 as the limiter sends it; its Retry-After in seconds."""
    assert response.status_code == 429
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["code"] == "rate_limited"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def test_rapid_requests_from_one_token_are_limited_with_retry_after(server: Server) -> None:
    n = scaled(500, 5000)
    responses, seconds = _flood(server, "127.0.0.10", [server.contributor] * n)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    retry_after = max(_assert_rate_limited(r) for r in responses if r.status_code == 429)
    # No more pass than the bucket holds: its burst plus what it refilled meanwhile.
    allowed = LIMITS.rate_limit_token_burst + LIMITS.rate_limit_token_per_second * seconds
    assert statuses[200] <= math.ceil(allowed) + 1, (statuses, seconds)

    # Another token, from the same address, is not held back by this one's bucket.
    other = server.registry.create_token("contributor", "bob")
    with server.http("127.0.0.10", other) as http:
        assert http.get("/v1/base-models").status_code == 200
    # Once Retry-After has passed, the token is served again.
    time.sleep(retry_after)
    with server.http("127.0.0.10", server.contributor) as http:
        assert http.get("/v1/base-models").status_code == 200
    report(
        "rate limit per token",
        requests=n,
        seconds=f"{seconds:.1f}",
        ok=statuses[200],
        limited=statuses[429],
        retry_after_s=retry_after,
        bucket=f"{LIMITS.rate_limit_token_burst}+{LIMITS.rate_limit_token_per_second:g}/s",
    )


def test_rapid_anonymous_requests_are_limited_per_address(server: Server) -> None:
    n = scaled(500, 5000)
    responses, seconds = _flood(server, "127.0.0.11", [None] * n)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            _assert_rate_limited(response)
    burst, rate = LIMITS.rate_limit_anonymous_burst, LIMITS.rate_limit_anonymous_per_second
    assert statuses[200] <= math.ceil(burst + rate * seconds) + 1, (statuses, seconds)
    # Another address is served at once.
    with server.http("127.0.0.12") as http:
        assert http.get("/v1/base-models").status_code == 200

    # A new made-up token per request is charged to the address: no fresh bucket each time.
    made_up = [f"agora_madeup{i:06d}" for i in range(n)]
    forged, forged_seconds = _flood(server, "127.0.0.13", list(made_up))
    forged_statuses = Counter(r.status_code for r in forged)
    assert set(forged_statuses) == {401, 429}, forged_statuses
    assert forged_statuses[401] <= math.ceil(burst + rate * forged_seconds) + 1, forged_statuses
    report(
        "rate limit per address",
        requests=n,
        ok=statuses[200],
        limited=statuses[429],
        made_up_tokens=n,
        made_up_refused_401=forged_statuses[401],
        made_up_limited=forged_statuses[429],
        bucket=f"{burst}+{rate:g}/s",
    )


def _max_size_search(revision: str) -> bytes:
    """The largest search the registry accepts, in its most expensive shape for the
    hashing embedder: one text of ``search_max_text_bytes`` of distinct words."""
    words: list[str] = []
    size = 0
    i = 0
    while size < DEFAULTS.search_max_text_bytes - 16:
        word = f"w{i * 7919 % 1_000_003:x}q"
        words.append(word)
        size += len(word) + 1
        i += 1
    text = " ".join(words)[: DEFAULTS.search_max_text_bytes]
    return json.dumps({"texts": [text], "base_revision": revision, "k": 4}).encode()


def test_healthz_answers_while_searches_saturate_the_server(server: Server) -> None:
    body = _max_size_search(server.revision)
    process = psutil.Process(server.registry.process.pid)
    idle_rss = process.memory_info().rss
    n = scaled(24, 64)
    barrier = threading.Barrier(n + 1)

    def search(i: int) -> httpx.Response:
        with server.http(f"127.0.1.{i + 2}") as http:
            barrier.wait()
            return http.post(
                "/v1/search", content=body, headers={"Content-Type": "application/json"}
            )

    latencies: list[float] = []
    peak_rss = idle_rss
    with ThreadPoolExecutor(n) as pool, server.http("127.0.0.20") as probe:
        futures = [pool.submit(search, i) for i in range(n)]
        barrier.wait()
        while not all(f.done() for f in futures):
            start = time.monotonic()
            health = probe.get("/healthz")
            latencies.append(time.monotonic() - start)
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            peak_rss = max(peak_rss, process.memory_info().rss)
            time.sleep(0.05)
        searches = [f.result() for f in futures]

    statuses = Counter(r.status_code for r in searches)
    assert statuses[200] >= 1, statuses
    assert set(statuses) <= {200, 503}, statuses
    for response in searches:
        if response.status_code == 503:
            assert response.json()["code"] == "search_busy"
            assert int(response.headers["retry-after"]) >= 1
    report(
        "healthz under search load",
        searches=n,
        ok=statuses[200],
        busy_503=statuses[503],
        healthz_probes=len(latencies),
        healthz_p50_ms=f"{statistics.median(latencies) * 1e3:.0f}",
        healthz_max_ms=f"{max(latencies) * 1e3:.0f}",
        rss_idle_mib=idle_rss >> 20,
        rss_peak_mib=peak_rss >> 20,
    )


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return status, headers, body


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reading nothing else before it)."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        extra = sock.recv(65536)
    except ConnectionResetError:
        extra = b""
    assert extra == b"", f"the server answered instead of closing: {extra!r}"
    return time.monotonic() - start


def test_a_huge_declared_body_is_refused_before_it_is_read(server: Server) -> None:
    """Content-Length of 10 TB and no body at all: an answer that comes without waiting
    for the body (which would end in a 408 after the body timeout) is a 413."""
    cases = [
        ("/v1/experts", "multipart/form-data; boundary=agora", server.contributor),
        ("/v1/search", "application/json", None),
    ]
    for path, content_type, token in cases:
        with server.connect() as sock:
            sock.sendall(
                (
                    f"POST {path} HTTP/1.1\r\nHost: registry\r\n"
                    + (f"Authorization: Bearer {token}\r\n" if token else "")
                    + f"Content-Type: {content_type}\r\nContent-Length: {10**13}\r\n\r\n"
                ).encode()
            )
            status, headers, body = _read_response(sock)
        assert status == 413, (path, status, body)
        assert headers["content-type"] == PROBLEM_JSON
    assert server.staging_files() == []


def test_a_slow_or_silent_request_head_is_cut_off(server: Server) -> None:
    # A head sent a byte at a time, a header line every quarter second: never complete.
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: registry\r\n")
        start = time.monotonic()
        closed = False
        for i in range(int(20 / 0.25)):
            try:
                sock.sendall(f"X-Slow-{i}: a\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.25)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
                break
        slow_head_s = time.monotonic() - start
    assert closed, "a request head trickled for 20 s was never cut off"
    # A connection that never sends a byte.
    with server.connect() as sock:
        silent_s = _closed_within(sock, 20)
    # A request sent at once is answered, and its connection is kept alive.
    with server.connect() as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: registry\r\n\r\n")
            status, _, body = _read_response(sock)
            assert (status, json.loads(body)) == (200, {"status": "ok"})
    report(
        "slow request head",
        header_timeout_s=HEADER_TIMEOUT_S,
        trickled_head_closed_after_s=f"{slow_head_s:.1f}",
        silent_connection_closed_after_s=f"{silent_s:.1f}",
    )


def _upload_head(server: Server, length: int) -> bytes:
    return (
        "POST /v1/experts HTTP/1.1\r\nHost: registry\r\n"
        f"Authorization: Bearer {server.contributor}\r\n"
        "Content-Type: multipart/form-data; boundary=agora\r\n"
        f"Content-Length: {length}\r\n\r\n"
        "--agora\r\n"
        'Content-Disposition: form-data; name="weights"; filename="e.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("pace", ["stalled", "trickling"])
def test_a_slow_upload_body_gets_408_and_leaves_no_staging_file(server: Server, pace: str) -> None:
    """``stalled``: 4 KiB, then nothing. ``trickling``: a byte every 0.4 s, under the
    idle timeout each time, but far below the minimum average rate."""
    first = 4096 if pace == "stalled" else 16
    with server.connect() as sock:
        sock.sendall(_upload_head(server, 10_000_000) + b"\0" * first)
        # The server is receiving: it has opened a staging file for the weights.
        staged = wait_until(server.staging_files, timeout=BODY_TIMEOUT_S, interval=0.02)
        start = time.monotonic()
        if pace == "trickling":
            sock.settimeout(0.4)
            answer = b""
            while not answer and time.monotonic() - start < 30:
                sock.sendall(b"\0")
                try:
                    answer = sock.recv(65536, socket.MSG_PEEK)
                except TimeoutError:
                    continue
        status, headers, body = _read_response(sock)
        answered_s = time.monotonic() - start
        assert status == 408, body
        assert headers["content-type"] == PROBLEM_JSON
        assert json.loads(body)["code"] == "request_timeout"
        assert headers["connection"] == "close"
        _closed_within(sock, 10)
    assert all(not path.exists() for path in staged)
    assert server.staging_files() == []
    report(
        f"slow upload body ({pace})",
        body_timeout_s=BODY_TIMEOUT_S,
        answered_408_after_s=f"{answered_s:.1f}",
        staging_files_left=0,
    )


# -- the limiter's parts, in-process ------------------------------------------------------


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [charge([bucket], 0.0) for _ in range(6)] == [0.0] * 5 + [pytest.approx(0.1)]
    # A refusal takes nothing: one request fits again 0.1 s later, and only one.
    assert charge([bucket], 0.1) == 0.0
    assert charge([bucket], 0.1) > 0
    # A request charged to two buckets passes only if both have room, and then takes both.
    full, empty = TokenBucket(1.0, 3, 0.0), TokenBucket(1.0, 1, 0.0)
    assert charge([full, empty], 0.0) == 0.0
    assert charge([full, empty], 0.0) == pytest.approx(1.0)
    assert full.wait(0.0) == 0.0
    assert full.level == 2.0


def test_clients_are_told_apart_by_address_and_an_ipv6_client_by_its_64() -> None:
    def address(host: str) -> str:
        return client_address({"type": "http", "client": (host, 1234)})

    assert address("192.0.2.7") != address("192.0.2.8")
    assert address("2001:db8:1:2::1") == address("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address("2001:db8:1:3::1") != address("2001:db8:1:2::1")
    assert address("::ffff:192.0.2.7") == "192.0.2.7"


def test_the_search_slots_admit_their_size_and_queue_and_refuse_the_rest() -> None:
    async def scenario() -> tuple[list[bool], list[str]]:
        slots = Slots(size=2, queue=1)
        order: list[str] = []
        admitted = [await slots.acquire(), await slots.acquire()]
        queued = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        admitted.append(await slots.acquire())  # a fourth: the queue is full
        slots.release()
        admitted.append(await queued)  # the released slot goes to the waiter
        order.append(f"free={slots.free}")
        for _ in range(2):  # the two holders left
            slots.release()
        order.append(f"free={slots.free}")
        return admitted, order

    admitted, order = asyncio.run(scenario())
    assert admitted == [True, True, False, True]
    assert order == ["free=0", "free=2"]


def test_a_stalled_json_body_gets_408(server: Server) -> None:
    """The JSON routes' bodies are read before any route runs (registry/api/hygiene.py):
    a stall there is the same 408, not a server error."""
    with server.connect() as sock:
        sock.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: registry\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"texts": ["a'
        )
        status, headers, body = _read_response(sock)
        assert status == 408, body
        assert json.loads(body)["code"] == "request_timeout"
        assert headers["connection"] == "close"
        _closed_within(sock, 10)


def test_the_home_pages_search_form_is_a_search_for_the_limits() -> None:
    """The home page's form (GET /?text=...) runs the same retrieval as POST /v1/search, so
    it is charged to the same search bucket and waits for the same slots."""

    def scope(method: str, path: str, query: bytes = b"") -> dict[str, object]:
        return {"type": "http", "method": method, "path": path, "query_string": query}

    assert is_search(scope("POST", "/v1/search"))
    assert is_search(scope("GET", "/", b"text=the+sum+of&base=abc&k=2"))
    assert not is_search(scope("GET", "/"))  # the page without a search
    assert not is_search(scope("GET", "/", b"text=+%20&base=abc"))  # a blank text searches nothing
    assert not is_search(scope("GET", "/v1/search"))
    assert not is_search(scope("GET", "/experts", b"text=x"))


def test_home_page_searches_beyond_the_search_burst_are_refused(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from registry.app import create_app

    settings = Settings(
        data_dir=tmp_path / "agora",
        embedder="hashing",
        rate_limit_search_per_second=0.001,
        rate_limit_search_burst=2,
    )
    with TestClient(create_app(settings)) as client:
        statuses = [client.get("/", params={"text": f"words {i}"}).status_code for i in range(3)]
        # Pages that do not search are not charged to the search bucket.
        assert client.get("/").status_code != 429
    assert 429 not in statuses[:2], statuses
    assert statuses[2] == 429, statuses
