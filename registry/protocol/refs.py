"""The pieces every wire model is built from: an exact expert version and a base revision.

pydantic and the standard library only (``registry/protocol/__init__.py``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

# A base model revision: the sha256 of its bundle, 64 lowercase hex digits.
Revision = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
# A content address: "sha256:" + 64 lowercase hex digits.
Digest = Annotated[str, StringConstraints(strict=True, pattern=r"^sha256:[0-9a-f]{64}$")]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]


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
