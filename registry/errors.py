"""One error hierarchy for the registry service, mapped to HTTP in one place (``registry.api``).

::

    AgoraError                      500 internal
    ├── BadRequest                  400 (malformed request: fields, parameters)
    │   └── ValidationFailed        422 (an artifact failed validation: weights, datasheet, config)
    ├── Unauthenticated             401 (no or unknown bearer token)
    ├── Forbidden                   403 (known token, not allowed)
    ├── NotFound                    404
    ├── Conflict                    409 (state conflict: stale fencing token, reused key...)
    ├── PayloadTooLarge             413
    ├── UnsupportedMediaType        415 (a body that is not multipart/form-data where one is needed)
    ├── RangeNotSatisfiable         416 (a Range header outside the blob)
    ├── TooManyRequests             429 (a rate limit; Retry-After says when to come back)
    ├── UnavailableForLegalReasons  451 (a disabled expert, or anything derived from one)
    └── ServiceUnavailable          503 (database or storage unreachable)

Every error carries a machine-readable ``code`` (snake_case, stable: clients switch on it)
and a human ``detail``. Bodies are RFC 9457 problem+json: ``type``, ``title``, ``status``,
``detail``, ``code`` and, where useful, ``errors`` (a list of field-level problems).

A reference to something that does not exist is one mistake with one code, whether the
reference is in the URL or in a request body: ``base_model_not_found``,
``expert_not_found`` and ``version_not_found`` (404), raised only through the constructors
at the end of this module, whose detail names where the valid values are listed.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AgoraError(Exception):
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.errors = errors

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://agora.dev/problems/{self.code.replace('_', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance is not None:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


class BadRequest(AgoraError):
    status = 400
    title = "Bad request"
    default_code = "bad_request"


class ValidationFailed(BadRequest):
    status = 422
    title = "Validation failed"
    default_code = "validation_failed"


class Unauthenticated(AgoraError):
    status = 401
    title = "Authentication required"
    default_code = "unauthenticated"


class Forbidden(AgoraError):
    status = 403
    title = "Forbidden"
    default_code = "forbidden"


class NotFound(AgoraError):
    status = 404
    title = "Not found"
    default_code = "not_found"


class Conflict(AgoraError):
    status = 409
    title = "Conflict"
    default_code = "conflict"


class PayloadTooLarge(AgoraError):
    status = 413
    title = "Payload too large"
    default_code = "payload_too_large"


class TooManyRequests(AgoraError):
    status = 429
    title = "Too many requests"
    default_code = "rate_limited"


class UnavailableForLegalReasons(AgoraError):
    status = 451
    title = "Unavailable for legal reasons"
    default_code = "expert_disabled"


class ServiceUnavailable(AgoraError):
    status = 503
    title = "Service unavailable"
    default_code = "service_unavailable"


class UnsupportedMediaType(AgoraError):
    status = 415
    title = "Unsupported media type"
    default_code = "unsupported_media_type"


class RangeNotSatisfiable(AgoraError):
    status = 416
    title = "Range not satisfiable"
    default_code = "range_not_satisfiable"

    def __init__(self, detail: str, *, size: int, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.size = size
        # RFC 9110: a 416 tells the client the representation's length.
        self.headers = {"Content-Range": f"bytes */{size}"}


# -- references to something that does not exist: one code each, wherever they appear ------


def base_model_not_found(revision: str) -> NotFound:
    return NotFound(
        f"no base model revision {revision!r}; `agora base list` (GET /v1/base-models) "
        "lists the stored revisions",
        code="base_model_not_found",
    )


def expert_not_found(expert_id: str) -> NotFound:
    return NotFound(
        f"no expert {expert_id!r}; `agora expert list` (GET /v1/experts) lists the experts",
        code="expert_not_found",
    )


def version_not_found(expert_id: str, version: int, latest: int) -> NotFound:
    return NotFound(
        f"expert {expert_id} has no version {version}; its versions are 1 to {latest}",
        code="version_not_found",
    )
