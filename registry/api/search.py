"""``POST /v1/search``: sample texts -> the experts of a base revision that fit them best."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from registry.api.deps import RuntimeDep
from registry.api.openapi import NOT_BLANK, problems
from registry.protocol.refs import JsonInt
from registry.retrieval.service import (
    DEFAULT_TEMPERATURE,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
)
from registry.settings import Settings

router = APIRouter(prefix="/v1", tags=["search"])


# The bounds the service checks (registry/retrieval/service.py), stated in the schema only
# (``json_schema_extra``), so that a refusal keeps its own code (invalid_k, empty_texts...).
_MAX_K = Settings.model_fields["search_max_k"].default
_MAX_TEXTS = Settings.model_fields["search_max_texts"].default


class SearchIn(BaseModel):
    # Strict: a JSON true is not a number, nor "4" an integer (the schema says so).
    model_config = ConfigDict(strict=True)

    texts: list[str] = Field(
        description="sample texts of the consumer's domain, at least one not blank "
        f"(at most AGORA_SEARCH_MAX_TEXTS, default {_MAX_TEXTS}: 413 too_many_texts)",
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NOT_BLANK}},
    )
    base_revision: str = Field(description="only experts of this base revision are returned")
    k: JsonInt = Field(
        default=4,
        description=f"how many experts, 1 to AGORA_SEARCH_MAX_K (default {_MAX_K})",
        json_schema_extra={"minimum": 1, "maximum": _MAX_K},
    )
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE,
        description="T of the weights softmax(-d^2/T)",
        json_schema_extra={"minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
    )


class SearchResultOut(BaseModel):
    expert_id: str
    version: int = Field(description="the version whose datasheet made the matched vectors")
    score: float = Field(description="cosine similarity of the query and the expert's best vector")
    distance: float = Field(description="Euclidean distance of the unit vectors")
    weight: float = Field(description="softmax(-d^2/T) over the returned experts; sums to 1")
    name: str
    domain: str


class SearchOut(BaseModel):
    results: list[SearchResultOut]
    embedder: str = Field(description="the embedder's id (name and version)")


@router.post(
    "/search",
    summary="Find the experts that fit sample texts",
    response_model=SearchOut,
    responses=problems(
        {
            400: "invalid_k, empty_texts, invalid_temperature",
            404: "base_model_not_found",
            413: "texts_too_large, too_many_texts",
        }
    ),
)
def search(body: SearchIn, runtime: RuntimeDep) -> dict[str, Any]:
    """Bad requests are 4xx problems: ``invalid_k``, ``empty_texts``, ``invalid_temperature``
    (400), ``texts_too_large`` / ``too_many_texts`` (413), ``base_model_not_found`` (404)."""
    retrieval = runtime.retrieval
    hits = retrieval.search(
        texts=body.texts, base_revision=body.base_revision, k=body.k, temperature=body.temperature
    )
    return {
        "results": [
            {
                "expert_id": hit.entry.id,
                "version": hit.entry.version,
                "score": hit.score,
                "distance": hit.distance,
                "weight": hit.weight,
                "name": hit.entry.name,
                "domain": hit.entry.domain,
            }
            for hit in hits
        ],
        "embedder": retrieval.embedder.id,
    }
