"""The three files of a base model revision: config.json, tokenizer.json, model.safetensors.

The registry never runs the base; it needs the config's ``expert_schema`` (to check
experts against) and reasonable assurance the other two files are what they claim.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from registry.validation import strict_json
from registry.validation.codes import ErrorCode, invalid
from registry.validation.expert import ExpertSchema
from registry.validation.safetensors_format import (
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    read_header,
)
from registry.validation.text import text_problems


@dataclass(frozen=True)
class BaseConfig:
    raw: Mapping[str, Any]  # the whole config.json (modelcore's architecture keys included)
    expert_schema: ExpertSchema
    vocab_size: int | None  # for display only; None when absent or not a positive integer
    n_layers: int | None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def validate_base_config(data: bytes) -> BaseConfig:
    """config.json bytes -> ``BaseConfig`` (codes ``config_invalid``, ``expert_schema_invalid``)."""
    try:
        config = strict_json.loads_bytes(data)
    except strict_json.StrictJSONError as exc:
        raise invalid(ErrorCode.CONFIG_INVALID, f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise invalid(ErrorCode.CONFIG_INVALID, "config.json must be a JSON object")
    # The config is stored in a row (and its name may become the revision's name).
    unstorable = text_problems(config)
    if unstorable:
        raise invalid(
            ErrorCode.CONFIG_INVALID,
            f"config.json holds text that cannot be stored ({unstorable[0].path})",
            [p.as_error() for p in unstorable],
        )
    if "expert_schema" not in config:
        raise invalid(
            ErrorCode.EXPERT_SCHEMA_INVALID,
            "config.json has no expert_schema",
            [{"path": "$.expert_schema", "message": "required"}],
        )
    schema = ExpertSchema.from_dict(config["expert_schema"])
    return BaseConfig(
        raw=config,
        expert_schema=schema,
        vocab_size=_positive_int(config.get("vocab_size")),
        n_layers=_positive_int(config.get("n_layers")),
    )


def validate_base_weights(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """model.safetensors: the same strict framing as experts (values are not scanned)."""
    return read_header(path, max_header_bytes=max_header_bytes)


def validate_tokenizer(data: bytes) -> dict[str, Any]:
    """tokenizer.json bytes -> the parsed object; raises ``tokenizer_invalid``."""
    try:
        tokenizer = strict_json.loads_bytes(data)
    except strict_json.StrictJSONError as exc:
        raise invalid(
            ErrorCode.TOKENIZER_INVALID, f"tokenizer.json is not valid JSON: {exc}"
        ) from None
    if not isinstance(tokenizer, dict):
        raise invalid(ErrorCode.TOKENIZER_INVALID, "tokenizer.json must be a JSON object")
    return tokenizer
