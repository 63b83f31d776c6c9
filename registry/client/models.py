"""Pydantic models of the registry's JSON responses (contract: HTTP API v1).

Unknown fields are kept (``extra="allow"``) rather than rejected, so an older SDK keeps
working against a newer server that adds fields.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class FileInfo(_Model):
    digest: str
    size: int


class BaseModelFiles(_Model):
    config: FileInfo
    tokenizer: FileInfo
    weights: FileInfo


class BaseModelRevision(_Model):
    """An immutable base model revision: config.json + tokenizer.json + model.safetensors."""

    revision: str
    name: str | None = None
    files: BaseModelFiles
    created_at: datetime | None = None


class SubmittedExpert(_Model):
    """The answer to a submission: the expert's id, the new version and its content digest."""

    id: str
    version: int
    digest: str
    status: str


class ExpertVersion(_Model):
    version: int
    digest: str
    size: int
    base_revision: str
    created_at: datetime | None = None


class Expert(_Model):
    id: str
    name: str | None = None
    domain: str | None = None
    owner: str | None = None
    status: str
    base_revision: str
    license: str | None = None
    latest_version: int
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Present on GET /v1/experts/{id}; list pages leave it out.
    versions: list[ExpertVersion] = Field(default_factory=list)


class ExpertPage(_Model):
    items: list[Expert]
    next_cursor: str | None = None


class SearchResult(_Model):
    """One expert that fits the searched texts; ``weight`` is its share of the ensemble."""

    expert_id: str
    version: int
    score: float
    weight: float
    distance: float | None = None
    name: str | None = None
    domain: str | None = None


class SearchResults(_Model):
    """The answer to ``Agora.search``: best first; weights sum to 1 (c-BTM softmax(-d^2/T))."""

    results: list[SearchResult]
    embedder: str

    @property
    def expert_ids(self) -> list[str]:
        return [r.expert_id for r in self.results]

    @property
    def weights(self) -> dict[str, float]:
        return {r.expert_id: r.weight for r in self.results}


class ModerationAction(_Model):
    """A disable or enable of an expert, with its reason and who did it."""

    id: int
    expert_id: str
    action: str
    status: str
    reason: str
    actor: str
    at: datetime | None = None
