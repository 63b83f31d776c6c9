"""The ``agora.composition/1`` manifest: what a ready composition is.

The registry writes one when a compose job succeeds (``registry/services/compositions.py``
``build_manifest``); the worker evaluates a composition from it and the SDK loads one
from it. It names the base revision, the experts by digest with their weights, the
method's params, the ``output`` expert of a method that produces one (it stands for the
inputs), and the job's metrics. A composition served as an ensemble says ``with_base``:
whether the unmodified base is one more path, last, with the prior weight
``base_weight`` (the experts' weights and it sum to 1). Manifests written before the base
became a path do not say, and were built without it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, StrictBool, model_validator

from registry.protocol.methods import METHOD_SPECS, MethodName, MethodSpec
from registry.protocol.refs import Contract, ExpertRef, NonNegative, Revision

MANIFEST_FORMAT = "agora.composition/1"


class ManifestExpert(ExpertRef):
    """An input expert and its share of the composition (None: none, or uniform)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    weight: NonNegative | None = None


class Manifest(Contract):
    """See the module docstring. ``as_json`` is the stored form."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: Literal["agora.composition/1"]
    id: str
    method: MethodName
    base_revision: Revision
    experts: list[ManifestExpert]
    params: dict[str, Any] = Field(default_factory=dict)
    output: ExpertRef | None = None
    metrics: dict[str, Any] | None = None
    with_base: StrictBool | None = None
    base_weight: NonNegative | None = None

    @model_validator(mode="after")
    def _inputs_present(self) -> Manifest:
        if self.spec.produces_expert and self.output is None:
            raise ValueError(f"a {self.method} manifest needs its 'output' expert")
        if not self.spec.produces_expert and not self.experts:
            raise ValueError(f"a {self.method} manifest needs a non-empty 'experts' list")
        return self

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    def refs(self) -> list[ExpertRef]:
        """The expert files the composition is computed from: its ``output`` for a method
        that produces an expert (the inputs were folded into it), else its experts."""
        if self.output is not None and self.spec.produces_expert:
            return [self.output]
        return list(self.experts)

    def weights(self) -> list[float] | None:
        """The experts' weights if every expert has one, else None (uniform)."""
        weights = [e.weight for e in self.experts]
        if not weights or any(w is None for w in weights):
            return None
        return [float(w) for w in weights if w is not None]

    def base_path(self) -> tuple[bool, float | None]:
        """``(with_base, base_weight)``: False where the manifest does not say."""
        return bool(self.with_base), self.base_weight

    def as_json(self) -> dict[str, Any]:
        """The stored JSON: ``with_base`` and ``base_weight`` only where they were set."""
        unset = {k for k in ("with_base", "base_weight") if getattr(self, k) is None}
        return self.model_dump(mode="json", exclude=unset)
