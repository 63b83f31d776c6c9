"""The contracts the registry, the worker and the SDK share: one package, pydantic only.

* ``methods``: every composition method, declared once (``METHOD_SPECS``: parameters with
  bounds and defaults, minimum experts, whether it produces an expert, its paper), and the
  job kinds derived from it (``COMPOSE_KINDS``, ``EVALUATE_KIND``, ``JOB_KINDS``).
* ``jobs``: job payloads (``ComposePayload``, ``EvaluatePayload``) and results
  (``ComposeResult``, ``EvaluationResult``).
* ``manifest``: the ``agora.composition/1`` manifest.
* ``requests``: the evaluation request.

pydantic and the standard library only, and nothing else of the registry (an
import-linter contract in pyproject.toml holds it): the SDK imports this package and
installs light, the worker imports it without the server. Adding a composition method:
docs/architecture.md, "Adding a composition method".
"""

from registry.protocol.jobs import (
    ComposePayload,
    ComposeResult,
    CompositionSubject,
    ContinuationRequest,
    ContinuationScore,
    EvaluatePayload,
    EvaluationResult,
    EvaluationSubject,
    ExpertSubject,
    ForgettingSubject,
    TextSetScore,
    WithoutExpert,
)
from registry.protocol.manifest import MANIFEST_FORMAT, Manifest, ManifestExpert
from registry.protocol.methods import (
    AVERAGE,
    AVERAGE_CAUTION,
    BASE_WEIGHT,
    COMPOSE_KINDS,
    COMPOSE_PREFIX,
    DISTILL,
    ENSEMBLE,
    EVALUATE_KIND,
    JOB_KINDS,
    METHOD_SPECS,
    METHODS,
    MIXTURE,
    UNIFORM,
    WEIGHTED,
    WITH_BASE,
    Caution,
    MethodSpec,
    Param,
    ParamError,
    ParamValue,
    check_params,
    method_cautions,
    params_reference,
    params_summary,
    produces_expert,
    relative_change,
    spec_for_kind,
)
from registry.protocol.refs import Digest, ExpertRef, Revision
from registry.protocol.requests import EvaluationRequest

__all__ = [
    "AVERAGE",
    "AVERAGE_CAUTION",
    "BASE_WEIGHT",
    "COMPOSE_KINDS",
    "COMPOSE_PREFIX",
    "DISTILL",
    "ENSEMBLE",
    "EVALUATE_KIND",
    "JOB_KINDS",
    "MANIFEST_FORMAT",
    "METHODS",
    "METHOD_SPECS",
    "MIXTURE",
    "UNIFORM",
    "WEIGHTED",
    "WITH_BASE",
    "Caution",
    "ComposePayload",
    "ComposeResult",
    "CompositionSubject",
    "ContinuationRequest",
    "ContinuationScore",
    "Digest",
    "EvaluatePayload",
    "EvaluationRequest",
    "EvaluationResult",
    "EvaluationSubject",
    "ExpertRef",
    "ExpertSubject",
    "ForgettingSubject",
    "Manifest",
    "ManifestExpert",
    "MethodSpec",
    "Param",
    "ParamError",
    "ParamValue",
    "Revision",
    "TextSetScore",
    "WithoutExpert",
    "check_params",
    "method_cautions",
    "params_reference",
    "params_summary",
    "produces_expert",
    "relative_change",
    "spec_for_kind",
]
