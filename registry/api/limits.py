"""Resource limits at the edge of the app: request rates, a bound on concurrent searches,
and the pace of request bodies. One pure ASGI middleware (``BaseHTTPMiddleware`` would
buffer streamed bodies), installed by ``install_limits`` inside the metrics middleware, so
refusals are counted too.

Rates are token buckets (``rate`` per second, up to ``burst`` at once), keyed by who asks:

- a request whose ``Authorization`` this limiter has seen work is charged to that
  credential's bucket (``rate_limit_token_*``);
- any other request, anonymous or with a credential not yet seen to work, is charged to its
  client address (``rate_limit_anonymous_*``; an IPv6 client by its /64, the block one
  subscriber gets). A credential is learned from the app: once the auth dependency has
  verified it (registry/api/deps.py leaves the principal in the request's state), it is
  known to work; a 401 forgets it. So a stream of made-up tokens is charged to its
  address and cannot open a fresh bucket per request;
- a search, ``POST /v1/search`` or the home page's search form (``GET /?text=...``,
  registry/web/home.py), is also charged to a stricter search bucket of the same identity;
  one identity has at most ``search_max_per_client`` searches running or waiting (more:
  429), so a single client cannot fill the queue below. A search then runs only while
  fewer than ``search_max_concurrent`` run in this process; up to ``search_max_queued``
  wait for a slot (holding nothing but their connection: the body is read once a slot
  is free), the rest get 503 ``search_busy``. The bound on concurrent searches is the
  bound on their CPU and, with the heap trimmed after each search
  (``release_free_memory``), on their memory (docs/registry.md, "Limits"). A queued
  request whose client has gone still runs when its turn comes (nothing is read from it
  before).

A refused request gets 429 ``rate_limited`` problem+json with ``Retry-After`` (whole
seconds until the bucket holds a request again); the SDK waits that long and retries.
``/healthz``, ``/readyz`` and ``/metrics`` are never limited: probes must see a busy
server as alive.

The buckets live in this process's memory: N server processes enforce N independent
limits, and a restart forgets them. Each kind keeps at most ``MAX_KEYS`` buckets (the
least recently used are forgotten first), so a flood of addresses cannot grow memory
without bound.

While a request body is incomplete, every wait for its next chunk is bounded: no byte for
``body_timeout_seconds``, or a body slower on average than ``body_min_bytes_per_second``
after that grace, ends the request with 408 ``request_timeout`` and ``Connection: close``
(raised from ``receive`` as an ``HTTPException``, which FastAPI passes through its body
parsing; an upload's staging files are removed on the way out, registry/api/uploads.py).
The request head's own deadline is the server's (``agora serve``, agora/server.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import ipaddress
import json
import math
import time
import urllib.parse
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.api.problems import PROBLEM_JSON
from registry.errors import AgoraError, ServiceUnavailable, TooManyRequests
from registry.settings import Settings

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
SEARCH_PATH = "/v1/search"
# The home page searches when its form sends a text (registry/web/home.py).
PAGE_SEARCH_PATH = "/"
MAX_KEYS = 50_000
# A saturated search queue drains in about this many seconds at the default bound.
SEARCH_BUSY_RETRY_AFTER_S = 2


def is_search(scope: Scope) -> bool:
    """A request that runs a search: the API's, or the home page's form with a text."""
    method, path = scope["method"], scope["path"]
    if path == SEARCH_PATH:
        return bool(method == "POST")
    if path != PAGE_SEARCH_PATH or method not in ("GET", "HEAD"):
        return False
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return any(value.strip() for value in query.get("text", ()))


class TokenBucket:
    """Holds up to ``burst`` requests and refills at ``rate`` per second."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = float(burst)
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one request fits (0: it fits now)."""
        self.level = min(float(self.burst), self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.level >= 1.0 else (1.0 - self.level) / self.rate

    def take(self) -> None:
        self.level -= 1.0


class Buckets:
    """One bucket per key, at most ``max_keys`` (the least recently used are forgotten)."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket


def charge(buckets: list[TokenBucket], now: float) -> float:
    """Take one request from every bucket if each has one; else take nothing and return
    the seconds until all of them would."""
    wait = max((b.wait(now) for b in buckets), default=0.0)
    if wait == 0.0:
        for bucket in buckets:
            bucket.take()
    return wait


class _Recent:
    """A bounded set, least recently seen forgotten first."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def discard(self, key: str) -> None:
        self._keys.pop(key, None)


class Slots:
    """At most ``size`` holders at once and ``queue`` waiting; everyone else is refused.
    Used from one event loop (the server's)."""

    def __init__(self, size: int, queue: int) -> None:
        self.free = size
        self.queue = queue
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        if len(self._waiters) >= self.queue:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        return True

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next waiter
                return
        self.free += 1


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def credential_key(scope: Scope) -> str | None:
    """A digest of the ``Authorization`` header, whatever its scheme (never the secret)."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    return hashlib.sha256(value).hexdigest()[:32]


def client_address(scope: Scope) -> str:
    """The client's address; an IPv6 client by its /64."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a test client, a Unix socket
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return _header(scope, b"transfer-encoding") is not None


async def send_problem(
    send: Send, scope: Scope, error: AgoraError, headers: dict[str, str]
) -> None:
    body = json.dumps(error.problem(instance=scope.get("path", ""))).encode()
    raw = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyPace:
    """``receive`` with a deadline on each chunk while the body is incomplete."""

    def __init__(self, receive: Receive, *, idle: float, min_rate: float) -> None:
        self.receive = receive
        self.idle = idle
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        timeout = self.idle
        if self.min_rate > 0:
            deadline = self.started + self.idle + self.received / self.min_rate
            timeout = min(timeout, deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(self.receive(), timeout=max(timeout, 0.0))
        except TimeoutError:
            raise HTTPException(
                408,
                detail=f"the request body stalled: {self.received} bytes in "
                f"{time.monotonic() - self.started:.0f} s (no byte for {self.idle:g} s, or "
                f"under {self.min_rate:g} bytes/s on average)",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            self.done = True  # http.disconnect
        return message


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None
    return trim


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``).

    An embedding allocates a few hundred MiB of activations in whichever worker thread
    runs the search; glibc keeps what each thread freed in that thread's arena, so without
    this the server's RSS grows with every thread that ever searched, whatever the bound on
    concurrent searches (docs/registry.md, "Limits", has the figures). Takes milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        s = settings
        self.anonymous = Buckets(s.rate_limit_anonymous_per_second, s.rate_limit_anonymous_burst)
        self.tokens = Buckets(s.rate_limit_token_per_second, s.rate_limit_token_burst)
        self.searches = Buckets(s.rate_limit_search_per_second, s.rate_limit_search_burst)
        self.working = _Recent()
        self.search_slots = (
            Slots(s.search_max_concurrent, s.search_max_queued)
            if s.search_max_concurrent > 0
            else None
        )
        self.search_per_client = s.search_max_per_client
        self.searching: Counter[str] = Counter()
        self.body_timeout = s.body_timeout_seconds
        self.body_min_rate = s.body_min_bytes_per_second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        credential = credential_key(scope)
        address = client_address(scope)
        known = credential is not None and credential in self.working
        # Who a search is charged to: the token once it is known to work, else the address.
        identity = f"t:{credential}" if known else f"a:{address}"
        search = is_search(scope)
        buckets: list[TokenBucket] = []
        if credential is not None and self.tokens.enabled:
            buckets.append(self.tokens.get(credential, now))
        if not known and self.anonymous.enabled:
            buckets.append(self.anonymous.get(address, now))
        if search and self.searches.enabled:
            buckets.append(self.searches.get(identity, now))
        has_body = _has_body(scope)
        # A refused request's body is never read: the connection cannot be reused.
        close = {"Connection": "close"} if has_body else {}

        wait = charge(buckets, now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            who = "search" if search else "token" if known else "address"
            error = TooManyRequests(
                f"too many requests from this {who}; retry in {seconds} s", code="rate_limited"
            )
            await send_problem(send, scope, error, {"Retry-After": str(seconds), **close})
            return
        if not search:
            await self._call(scope, receive, send, credential, has_body)
            return

        if self.search_per_client and self.searching[identity] >= self.search_per_client:
            error = TooManyRequests(
                f"this client already has {self.search_per_client} search(es) running or "
                "waiting; send the next when one has answered",
                code="rate_limited",
            )
            retry = {"Retry-After": str(SEARCH_BUSY_RETRY_AFTER_S)}
            await send_problem(send, scope, error, {**retry, **close})
            return
        self.searching[identity] += 1
        try:
            if self.search_slots is not None and not await self.search_slots.acquire():
                busy = ServiceUnavailable(
                    "the server is running as many searches as it can; retry shortly",
                    code="search_busy",
                )
                retry = {"Retry-After": str(SEARCH_BUSY_RETRY_AFTER_S)}
                await send_problem(send, scope, busy, {**retry, **close})
                return
            try:
                await self._call(scope, receive, send, credential, has_body)
            finally:
                if self.search_slots is not None:
                    self.search_slots.release()
                await run_in_threadpool(release_free_memory)
        finally:
            self.searching[identity] -= 1
            if self.searching[identity] <= 0:
                del self.searching[identity]

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, credential: str | None, has_body: bool
    ) -> None:
        if has_body and self.body_timeout > 0:
            receive = BodyPace(receive, idle=self.body_timeout, min_rate=self.body_min_rate)
        if credential is None:
            await self.app(scope, receive, send)
            return

        # The auth dependency leaves the principal here once the credential is verified.
        state = scope.setdefault("state", {})

        async def learn(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state.get("principal") is not None:
                    self.working.add(credential)
                elif message["status"] == 401:
                    self.working.discard(credential)
            await send(message)

        await self.app(scope, receive, learn)


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Add the limits middleware (call before the metrics middleware is added, so that
    one stays outermost and counts the refusals)."""
    app.add_middleware(LimitsMiddleware, settings=settings)
