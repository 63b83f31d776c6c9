"""``POST /v1/search``: sample texts -> the experts of a base revision that fit them best."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from registry.api.deps import RuntimeDep
from registry.retrieval.service import DEFAULT_TEMPERATURE

router = APIRouter(prefix="/v1", tags=["search"])


class SearchIn(BaseModel):
    texts: list[str] = Field(description="sample texts of the consumer's domain (non-empty)")
    base_revision: str = Field(description="only experts of this base revision are returned")
    k: int = Field(default=4, description="how many experts, 1..64")
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE, description="T of the weights softmax(-d^2/T)"
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


@router.post("/search", summary="Find the experts that fit sample texts", response_model=SearchOut)
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
