"""Strict validation of everything the registry accepts: experts, base models, datasheets.

Pure functions over files and bytes (safetensors + numpy + jsonschema, never torch).
Failures raise ``registry.errors.ValidationFailed`` (422) or ``PayloadTooLarge`` (413)
with a ``code`` from ``ErrorCode``; see docs/validation.md for the list.
"""

from registry.validation.base import (
    BaseConfig,
    validate_base_config,
    validate_base_weights,
    validate_tokenizer,
)
from registry.validation.codes import TOO_LARGE_CODES, ErrorCode
from registry.validation.datasheet import (
    DEFAULT_MAX_DATASHEET_BYTES,
    DEFAULT_MAX_SAMPLES_BYTES,
    Datasheet,
    Parent,
    Source,
    datasheet_schema,
    parse_datasheet,
)
from registry.validation.expert import (
    DEFAULT_MAX_EXPERT_BYTES,
    EXPERT_DTYPES,
    EXPERT_FORMAT,
    ExpertInfo,
    ExpertSchema,
    TensorSpec,
    validate_expert,
)
from registry.validation.safetensors_format import (
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    find_non_finite,
    read_header,
)

__all__ = [
    "DEFAULT_MAX_DATASHEET_BYTES",
    "DEFAULT_MAX_EXPERT_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_SAMPLES_BYTES",
    "EXPERT_DTYPES",
    "EXPERT_FORMAT",
    "TOO_LARGE_CODES",
    "BaseConfig",
    "Datasheet",
    "ErrorCode",
    "ExpertInfo",
    "ExpertSchema",
    "Parent",
    "SafetensorsHeader",
    "Source",
    "TensorInfo",
    "TensorSpec",
    "datasheet_schema",
    "find_non_finite",
    "parse_datasheet",
    "read_header",
    "validate_base_config",
    "validate_base_weights",
    "validate_expert",
    "validate_tokenizer",
]
