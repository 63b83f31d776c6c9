"""What a client sends to ask for work: the evaluation request (``POST /v1/evaluations``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from registry.protocol.refs import NOT_BLANK, VersionNumber


class EvaluationRequest(BaseModel):
    """Score an expert version (``expert_id``, ``version``; None: its latest) or a ready
    composition (``composition_id``), one of the two, on named text sets."""

    # One subject, said in the schema too (a request naming both, or neither, is a 400
    # invalid_subject: registry/services/requests.py).
    model_config = ConfigDict(
        # A JSON true is not a version number (the schema says integer).
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": ["expert_id"], "properties": {"expert_id": {"type": "string"}}},
                {
                    "required": ["composition_id"],
                    "properties": {"composition_id": {"type": "string"}},
                },
            ]
        },
    )

    expert_id: str | None = None
    version: VersionNumber | None = None
    composition_id: str | None = None
    text_sets: dict[str, list[str]] = Field(
        description="name -> texts to score (registry/services/evaluations.py checks them: "
        "at least one set, names 1 to 200 characters, at least one text not blank in each)",
        json_schema_extra={
            "minProperties": 1,
            "propertyNames": {"maxLength": 200, "pattern": NOT_BLANK},
            "additionalProperties": {
                "type": "array",
                "items": {"type": "string"},
                "contains": {"type": "string", "pattern": NOT_BLANK},
            },
        },
    )
