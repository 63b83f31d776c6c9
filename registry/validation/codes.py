"""The machine-readable codes the validators raise, and the two ways they raise them.

Every failure is a ``registry.errors.ValidationFailed`` (422) or, for size limits, a
``registry.errors.PayloadTooLarge`` (413), whose ``code`` is one of ``ErrorCode``. Clients
switch on the code; ``errors`` (when present) lists each individual problem.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from registry.errors import PayloadTooLarge, ValidationFailed

# Problem lists are capped so a file with a million bad entries cannot produce a
# multi-megabyte error body; the detail still says how many there were.
MAX_LISTED_ERRORS = 100


class ErrorCode(StrEnum):
    # safetensors framing (experts and base weights)
    NOT_SAFETENSORS = "not_safetensors"
    HEADER_TOO_LARGE = "header_too_large"
    HEADER_INVALID = "header_invalid"
    DUPLICATE_KEY = "duplicate_key"
    METADATA_NOT_STRING = "metadata_not_string"
    TENSOR_ENTRY_INVALID = "tensor_entry_invalid"
    TENSOR_OFFSETS_INVALID = "tensor_offsets_invalid"
    DATA_SIZE_MISMATCH = "data_size_mismatch"
    # experts against their base's expert_schema
    EXPERT_TOO_LARGE = "expert_too_large"
    WRONG_FORMAT = "wrong_format"
    BASE_REVISION_MISMATCH = "base_revision_mismatch"
    METADATA_INVALID = "metadata_invalid"
    TENSOR_SET_MISMATCH = "tensor_set_mismatch"
    TENSOR_SHAPE_MISMATCH = "tensor_shape_mismatch"
    DTYPE_NOT_ALLOWED = "dtype_not_allowed"
    MIXED_DTYPES = "mixed_dtypes"
    NON_FINITE_VALUES = "non_finite_values"
    # base model files
    CONFIG_INVALID = "config_invalid"
    EXPERT_SCHEMA_INVALID = "expert_schema_invalid"
    TOKENIZER_INVALID = "tokenizer_invalid"
    # datasheets
    DATASHEET_MISSING = "datasheet_missing"
    DATASHEET_TOO_LARGE = "datasheet_too_large"
    DATASHEET_FRONT_MATTER = "datasheet_front_matter"
    DATASHEET_INVALID = "datasheet_invalid"
    SAMPLES_TOO_LARGE = "samples_too_large"
    DATASHEET_UNFILLED = "datasheet_unfilled"


# The codes that mean "too big" rather than "malformed" (HTTP 413 instead of 422).
TOO_LARGE_CODES = frozenset({ErrorCode.EXPERT_TOO_LARGE, ErrorCode.DATASHEET_TOO_LARGE})


def invalid(
    code: ErrorCode, detail: str, errors: list[dict[str, Any]] | None = None
) -> ValidationFailed:
    """A 422 with ``code``; ``errors`` is truncated to ``MAX_LISTED_ERRORS`` entries."""
    if errors is not None and len(errors) > MAX_LISTED_ERRORS:
        detail = f"{detail} (first {MAX_LISTED_ERRORS} of {len(errors)} problems listed)"
        errors = errors[:MAX_LISTED_ERRORS]
    return ValidationFailed(detail, code=code.value, errors=errors)


def too_large(code: ErrorCode, detail: str) -> PayloadTooLarge:
    return PayloadTooLarge(detail, code=code.value)


def shorten(text: str, limit: int = 200) -> str:
    """Error messages quote user input; keep them short (a sample can be 64 KiB)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
