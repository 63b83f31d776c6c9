"""Typed errors of the SDK, mapped back from the registry's problem+json responses.

The names mirror ``registry.errors`` (the server's hierarchy) so that ``except NotFound``
reads the same on both sides, but this module never imports the server: the SDK installs
with httpx and pydantic only. ::

    AgoraError                      .status .code .detail .problem
    ├── BadRequest                  400 (and any other 4xx without a class of its own)
    │   └── ValidationFailed        422 (an artifact failed validation; .errors has the fields)
    ├── Unauthenticated             401
    ├── Forbidden                   403
    ├── NotFound                    404
    ├── Conflict                    409
    │   └── LeaseLost               409 lease_lost (a worker's lease on a job is gone)
    │       └── JobCancelled        409 job_cancelled (an expert it uses was withdrawn)
    ├── PayloadTooLarge             413
    ├── UnsupportedMediaType        415
    ├── RangeNotSatisfiable         416 (.size: the blob's length, from Content-Range)
    ├── RateLimited                 429 (.retry_after in seconds, when the server sent one)
    ├── UnavailableForLegalReasons  451 (a disabled expert, or anything derived from one)
    ├── ServerError                 5xx
    │   └── ServiceUnavailable      503
    ├── TransportError              no response at all (connection refused, reset, timeout)
    │   └── DownloadInterrupted     a download kept breaking off; .received bytes kept to resume
    ├── DownloadIntegrityError      a download's bytes cannot be the declared blob; nothing kept
    │   └── DigestMismatch          the bytes received do not hash to the registry's digest
    └── JobFailed                   a job ended failed or dead (.job; .code job_failed/job_dead)

Clients switch on ``code`` (stable, snake_case, set by the server) rather than on messages.

A warning is not an error: ``CompositionWarning`` (a ``UserWarning``, with ``.code`` and
``.detail``) is what ``Agora.compose`` warns with when the registry accepted a composition
with a caution (``average_may_harm``); filter it with the ``warnings`` module as usual.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any, ClassVar

import httpx


class AgoraError(Exception):
    """Base of every error the SDK raises. ``status`` is None when no HTTP response came back."""

    default_status: ClassVar[int | None] = None
    default_code: ClassVar[str] = "error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status if status is not None else self.default_status
        self.code = code or self.default_code
        self.problem: dict[str, Any] = problem or {}

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Field-level problems (``problem["errors"]``), empty when the server sent none."""
        errors = self.problem.get("errors")
        return errors if isinstance(errors, list) else []

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{self.code}: {self.detail} ({where})"

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(status={self.status!r}, code={self.code!r}, detail={self.detail!r})"


class BadRequest(AgoraError):
    default_status = 400
    default_code = "bad_request"


class ValidationFailed(BadRequest):
    default_status = 422
    default_code = "validation_failed"


class Unauthenticated(AgoraError):
    default_status = 401
    default_code = "unauthenticated"


class Forbidden(AgoraError):
    default_status = 403
    default_code = "forbidden"


class NotFound(AgoraError):
    default_status = 404
    default_code = "not_found"


class Conflict(AgoraError):
    default_status = 409
    default_code = "conflict"


class LeaseLost(Conflict):
    """The job is no longer leased with this fencing token (it expired and another worker
    took it, or it ended): stop working on it and never complete it."""

    default_code = "lease_lost"


class JobCancelled(LeaseLost):
    """The job was cancelled: an expert it consumes was disabled or withdrawn
    (docs/governance.md). Stop working on it; nothing it sends is stored."""

    default_code = "job_cancelled"


class PayloadTooLarge(AgoraError):
    default_status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(AgoraError):
    default_status = 415
    default_code = "unsupported_media_type"


class RangeNotSatisfiable(AgoraError):
    default_status = 416
    default_code = "range_not_satisfiable"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, problem=problem)
        self.size = size


class RateLimited(AgoraError):
    default_status = 429
    default_code = "rate_limited"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, problem=problem)
        self.retry_after = retry_after


class UnavailableForLegalReasons(AgoraError):
    default_status = 451
    default_code = "expert_disabled"


class ServerError(AgoraError):
    default_status = 500
    default_code = "internal_error"


class ServiceUnavailable(ServerError):
    default_status = 503
    default_code = "service_unavailable"


class TransportError(AgoraError):
    """The request got no HTTP response: connection refused or reset, DNS, timeout."""

    default_code = "transport_error"


class DownloadInterrupted(TransportError):
    """A download broke off (dropped connection, short body) more often than the retries
    allow. ``received`` bytes of ``size`` stay in the cache's ``.part`` file, unverified;
    the next download of the same blob resumes after them (docs/sdk.md, "Downloads")."""

    default_code = "download_interrupted"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
        received: int = 0,
        size: int | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, problem=problem)
        self.received = received
        self.size = size


class DownloadIntegrityError(AgoraError):
    """What a download received cannot be the blob the registry's metadata declared (a
    response that names another digest, bytes that hash wrong); nothing was kept."""

    default_code = "download_integrity"


class DigestMismatch(DownloadIntegrityError):
    """Downloaded bytes do not hash to the digest the registry advertised; nothing was kept."""

    default_code = "digest_mismatch"


class JobFailed(AgoraError):
    """A job ended ``failed`` (a permanent error) or ``dead`` (attempts exhausted).

    ``detail`` is the job's error text; ``job`` is the job as last seen (``Job``, or None).
    """

    default_code = "job_failed"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
        job: Any = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, problem=problem)
        self.job = job

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class CompositionWarning(UserWarning):
    """The registry accepted a composition with a caution about its method: ``code``
    (``average_may_harm``) and ``detail``, as in the handle's ``warnings``."""

    def __init__(self, detail: str, *, code: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def warn_at_caller(warning: Warning) -> None:
    """Warn ``warning`` at the first frame outside the SDK: the user's line, whether they
    called ``Agora.compose`` or ``agora.compositions.create``."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is the frame that called this function
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "registry.client."
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(warning, stacklevel=level)


# Codes that have a class of their own, more specific than their status's.
_BY_CODE: dict[tuple[int, str], type[AgoraError]] = {
    (409, "lease_lost"): LeaseLost,
    (409, "job_cancelled"): JobCancelled,
}

_BY_STATUS: dict[int, type[AgoraError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    416: RangeNotSatisfiable,
    422: ValidationFailed,
    429: RateLimited,
    451: UnavailableForLegalReasons,
    503: ServiceUnavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import UTC, datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> AgoraError:
    """The typed error for a non-success response; its body must already be read."""
    status = response.status_code
    problem: dict[str, Any] = {}
    try:
        body = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        problem = body
    detail = problem.get("detail")
    if not isinstance(detail, str) or not detail:
        # Not a problem+json body (a proxy's HTML page, a bare 502): keep a short excerpt.
        text = response.text.strip() if response.content else ""
        detail = text[:200] or response.reason_phrase or f"HTTP {status}"
    code = problem.get("code") if isinstance(problem.get("code"), str) else None

    cls = _BY_CODE.get((status, code or "")) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else BadRequest
    if cls is RateLimited:
        return RateLimited(
            detail,
            status=status,
            code=code,
            problem=problem,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if cls is RangeNotSatisfiable:
        return RangeNotSatisfiable(
            detail,
            status=status,
            code=code,
            problem=problem,
            size=content_range_total(response.headers.get("Content-Range")),
        )
    return cls(detail, status=status, code=code, problem=problem)


def content_range_total(value: str | None) -> int | None:
    """The complete length from ``Content-Range: bytes a-b/N`` or ``bytes */N``."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None
