"""Agora's Python SDK: ``from registry.client import Agora``.

It depends on httpx and pydantic only, so it installs without the server.
"""

from registry.client.client import Agora, ProgressCallback
from registry.client.errors import (
    AgoraError,
    BadRequest,
    Conflict,
    DigestMismatch,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthenticated,
    UnavailableForLegalReasons,
    UnsupportedMediaType,
    ValidationFailed,
)
from registry.client.models import (
    BaseModelFiles,
    BaseModelRevision,
    Expert,
    ExpertPage,
    ExpertVersion,
    FileInfo,
    ModerationAction,
    SearchResult,
    SearchResults,
    SubmittedExpert,
)

__all__ = [
    "Agora",
    "AgoraError",
    "BadRequest",
    "BaseModelFiles",
    "BaseModelRevision",
    "Conflict",
    "DigestMismatch",
    "Expert",
    "ExpertPage",
    "ExpertVersion",
    "FileInfo",
    "Forbidden",
    "ModerationAction",
    "NotFound",
    "PayloadTooLarge",
    "ProgressCallback",
    "RangeNotSatisfiable",
    "RateLimited",
    "SearchResult",
    "SearchResults",
    "ServerError",
    "ServiceUnavailable",
    "SubmittedExpert",
    "TransportError",
    "Unauthenticated",
    "UnavailableForLegalReasons",
    "UnsupportedMediaType",
    "ValidationFailed",
]
