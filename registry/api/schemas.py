"""Response models: they document the API in OpenAPI (/docs) and pin the JSON shapes of
contract D. Routes build plain dicts (services' ``*_view``); FastAPI validates them here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ExpertVersionOut(BaseModel):
    version: int = Field(description="1, 2, ... in submission order; immutable")
    digest: str = Field(description="sha256:<hex> of the weights file")
    size: int
    base_revision: str
    layers: list[int]
    n_modules: int
    dtype: str
    created_at: str


class ExpertOut(BaseModel):
    id: str = Field(description="ex_ followed by 26 characters, time-ordered")
    name: str
    domain: str
    owner: str
    status: str = Field(description="active, quarantined, disabled or rejected")
    base_revision: str
    license: str
    language: str
    latest_version: int
    created_at: str
    updated_at: str


class ArrivalCheckOut(BaseModel):
    """The latest version's check on arrival (docs/governance.md, "Checks on arrival")."""

    version: int
    state: str = Field(
        description="pending, passed, flagged, failed, released, superseded or cancelled"
    )
    job_id: str | None = Field(description="the evaluate job (purpose arrival)")
    job_status: str | None
    text_set: str
    bits_per_byte: float | None = Field(description="base + this version, on its samples")
    base_bits_per_byte: float | None
    relative_change: float | None = Field(description="(expert - base) / base")
    min_gain: float = Field(description="it passes when relative_change < -min_gain")
    error: str | None
    report_id: int | None = Field(description="the report a flag filed")
    created_at: str
    decided_at: str | None


class ExpertDetailOut(ExpertOut):
    versions: list[ExpertVersionOut]
    arrival: ArrivalCheckOut | None = None


class ExpertPageOut(BaseModel):
    items: list[ExpertOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class VersionListOut(BaseModel):
    items: list[ExpertVersionOut]


class SubmittedOut(BaseModel):
    id: str
    version: int
    digest: str
    status: str


class FileOut(BaseModel):
    digest: str = Field(description="sha256:<hex>")
    size: int


class BaseModelOut(BaseModel):
    revision: str = Field(description="sha256 of the canonical manifest of the file digests")
    name: str
    files: dict[str, FileOut] = Field(description="config, tokenizer, weights")
    expert_schema: dict[str, Any] | None
    created_at: str


class BaseModelListOut(BaseModel):
    items: list[BaseModelOut]


class HealthOut(BaseModel):
    status: str
