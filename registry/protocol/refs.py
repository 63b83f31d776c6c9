"""The pieces every wire model is built from: an exact expert version and a base revision.

pydantic and the standard library only (``registry/protocol/__init__.py``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints

# A base model revision: the sha256 of its bundle, 64 lowercase hex digits.
Revision = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
# A content address: "sha256:" + 64 lowercase hex digits.
Digest = Annotated[str, StringConstraints(strict=True, pattern=r"^sha256:[0-9a-f]{64}$")]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]

# A number a client sends is bounded by the database column it reaches (INTEGER: 32 bits,
# BIGINT: 64 bits, signed), so an out-of-range value is a 400 problem, never a database error.
INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A pattern for a text ``str.strip()`` leaves non-empty: one character outside Python's
# whitespace (what the services call blank), for JSON Schemas.
NOT_BLANK = (
    "[^\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a"
    "\\u2028\\u2029\\u202f\\u205f\\u3000]"
)


def _integral(value: object) -> object:
    """JSON has one number type: ``2.0`` is the integer 2 to a JSON Schema, so a strict
    model takes it as one (and still refuses ``2.5``, ``true`` and ``"2"``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer in a JSON body, under a strict model (registry/api: request bodies). The
# validator comes after the bounds, or the JSON Schema loses them ("ge" for "minimum").
JsonInt = Annotated[int, BeforeValidator(_integral)]
# An expert's version number (1, 2, ...), wherever a client names one.
VersionNumber = Annotated[int, Field(ge=1, le=INT32_MAX), BeforeValidator(_integral)]
# Any value of a BIGINT column (a job's fencing token).
BigInt = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), BeforeValidator(_integral)]


class Contract(BaseModel):
    """A wire model: immutable; fields a newer sender adds are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class ExpertRef(Contract):
    """One immutable expert version, as jobs and manifests name it: the worker downloads
    the file by ``digest`` and checks its bytes against it."""

    id: Annotated[str, StringConstraints(strict=True, min_length=1)]
    version: Annotated[StrictInt, Field(ge=1)]
    digest: Digest
    size: Count | None = None
