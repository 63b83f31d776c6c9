"""What a client sends to ask for work: the evaluation request (``POST /v1/evaluations``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class EvaluationRequest(BaseModel):
    """Score an expert version (``expert_id``, ``version``; None: its latest) or a ready
    composition (``composition_id``), one of the two, on named text sets."""

    expert_id: str | None = None
    version: int | None = None
    composition_id: str | None = None
    text_sets: dict[str, list[str]] = Field(description="name -> texts to score")
