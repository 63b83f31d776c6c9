"""Job payloads and results: what the registry queues and what a worker completes with.

* ``ComposePayload``: a ``compose.<method>`` job (``MethodSpec.job_kind``): the experts as
  exact versions, their weights (one each, or None), the texts, the checked params.
* ``EvaluatePayload``: an ``evaluate`` job: an expert version or a ready composition (its
  manifest), scored with the base on named text sets.
* ``ComposeResult`` / ``EvaluationResult``: what the worker completes them with; the
  registry validates what arrives with them (a result that does not fit is 422
  ``invalid_result``).

The registry builds payloads with these models and stores ``model_dump(mode="json")``;
the worker parses them back with ``model_validate`` (a payload that does not fit can
never succeed, so it fails the job for good). Fields a newer registry adds are ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from registry.protocol.manifest import Manifest
from registry.protocol.methods import AVERAGE, ENSEMBLE, MIXTURE, MethodName, relative_change
from registry.protocol.refs import Contract, Count, ExpertRef, Finite, NonNegative, Revision

# -- payloads ---------------------------------------------------------------------------------


class ComposePayload(Contract):
    """A ``compose.<method>`` job. ``params`` were checked against the method's spec by
    the registry (defaults filled in); ``weights`` are one per expert, not all zero."""

    composition_id: Annotated[str, StringConstraints(strict=True, min_length=1)]
    method: MethodName
    base_revision: Revision
    experts: list[ExpertRef]
    weights: list[NonNegative] | None = None
    texts: list[StrictStr] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, value: list[ExpertRef]) -> list[ExpertRef]:
        if not value:
            raise ValueError("must be a non-empty list of expert references")
        return value

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_weight_per_expert(self) -> ComposePayload:
        if self.weights is not None and (
            len(self.weights) != len(self.experts) or not sum(self.weights) > 0
        ):
            raise ValueError(
                f"weights must be a list of {len(self.experts)} non-negative numbers, "
                "not all zero, or null"
            )
        return self


class ExpertSubject(Contract):
    """An expert version evaluated as the base with it inserted."""

    kind: Literal["expert"]
    expert: ExpertRef


class CompositionSubject(Contract):
    """A ready composition, evaluated as its manifest says."""

    kind: Literal["composition"]
    composition_id: Annotated[str, StringConstraints(strict=True, min_length=1)]
    manifest: Manifest


# How a model without the disabled expert is computed: the base alone, or a method's name.
WITHOUT_METHODS = ("base", MIXTURE.name, ENSEMBLE.name, AVERAGE.name)


class WithoutExpert(Contract):
    """How a forgetting measurement computes a model without the disabled expert
    (docs/governance.md, "Proof of forgetting"): ``method`` ``base`` (no expert remains),
    ``mixture`` or ``ensemble`` over ``experts`` (``weights`` their prior, None for
    uniform; the base a path as the composition had it), or ``average`` (``experts``
    merged again with ``params``: ``merge``, ``density``)."""

    method: StrictStr
    experts: list[ExpertRef] = Field(default_factory=list)
    weights: list[NonNegative] | None = None
    with_base: StrictBool = False
    base_weight: NonNegative | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in WITHOUT_METHODS:
            raise ValueError(f"must be one of {', '.join(WITHOUT_METHODS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WithoutExpert:
        if (self.method == "base") != (not self.experts):
            raise ValueError("experts must be empty exactly when method is 'base'")
        if self.weights is not None and len(self.weights) != len(self.experts):
            raise ValueError(f"weights must be one per expert ({len(self.experts)}) or null")
        return self


class ForgettingSubject(Contract):
    """A disabled expert's forgetting measurement: the model with it (``manifest``, a
    composition that used it; None: the base with ``expert`` inserted) and ``without``
    it, each next to the base, on the same text sets."""

    kind: Literal["forgetting"]
    expert: ExpertRef
    composition_id: Annotated[str, StringConstraints(strict=True, min_length=1)] | None = None
    manifest: Manifest | None = None
    without: WithoutExpert

    def with_refs(self) -> list[ExpertRef]:
        return [self.expert] if self.manifest is None else self.manifest.refs()


EvaluationSubject = Annotated[
    ExpertSubject | CompositionSubject | ForgettingSubject, Discriminator("kind")
]


class ContinuationRequest(Contract):
    """Greedy continuations to generate with the subject and with the base (a monitoring
    run's degenerate-output check, docs/governance.md, "Monitoring"): the first
    ``prompt_tokens`` tokens of each of the first ``prompts`` texts of ``text_set``, each
    continued by ``new_tokens`` argmax steps; scored by the share of repeated ``ngram``-grams
    (``modelcore.repetition``)."""

    text_set: Annotated[str, StringConstraints(strict=True, min_length=1)]
    prompts: Annotated[StrictInt, Field(ge=1, le=16)] = 3
    prompt_tokens: Annotated[StrictInt, Field(ge=1, le=256)] = 16
    new_tokens: Annotated[StrictInt, Field(ge=1, le=512)] = 48
    ngram: Annotated[StrictInt, Field(ge=1, le=16)] = 4


class EvaluatePayload(Contract):
    """An ``evaluate`` job: the subject and the base on each named text set."""

    base_revision: Revision
    subject: EvaluationSubject
    text_sets: dict[str, list[StrictStr]]
    # Why the registry queued it: a user's request, a new expert's arrival check, a
    # scheduled monitoring run, or a forgetting measurement after a disable
    # (docs/governance.md). The registry acts on the result by it; a worker computes the
    # same scores whatever it is.
    purpose: Literal["request", "arrival", "monitor", "forgetting"] = "request"
    # Optional: greedy continuations to score for repetition (monitoring); an older payload
    # has none.
    continuations: ContinuationRequest | None = None

    @field_validator("text_sets")
    @classmethod
    def _some_text(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("must name at least one text set")
        empty = [name for name, texts in value.items() if not any(texts)]
        if empty:
            raise ValueError(f"text set {empty[0]!r} has no text")
        return value

    @model_validator(mode="after")
    def _one_base(self) -> EvaluatePayload:
        subject = self.subject
        if (
            isinstance(subject, CompositionSubject | ForgettingSubject)
            and subject.manifest is not None
            and subject.manifest.base_revision != self.base_revision
        ):
            raise ValueError("base_revision is not the composition's (its manifest's)")
        if self.continuations is not None and self.continuations.text_set not in self.text_sets:
            raise ValueError("continuations.text_set must name one of the text sets")
        return self

    def refs(self) -> list[ExpertRef]:
        """The expert files the subject is computed from."""
        if isinstance(self.subject, ExpertSubject):
            return [self.subject.expert]
        if isinstance(self.subject, ForgettingSubject):
            refs = self.subject.with_refs() + self.subject.without.experts
            return list({r.digest: r for r in refs}.values())
        return self.subject.manifest.refs()


# -- results ----------------------------------------------------------------------------------


class ComposeResult(Contract):
    """What a worker completes a ``compose.*`` job with.

    ``weights``: one per expert, the shares the composition used (ensemble: its prior;
    average: the merge weights; distill: the teacher's prior), or None. With the base as a
    path (``with_base``) ``base_weight`` is its share, and weights + base_weight sum to 1.
    ``metrics``: base vs composition bits per byte on the payload texts (numbers only).
    """

    weights: list[NonNegative] | None = None
    base_weight: NonNegative | None = None
    with_base: StrictBool | None = None
    metrics: dict[str, Any] | None = None
    details: dict[str, Any] | None = None

    @field_validator("metrics")
    @classmethod
    def _numbers(cls, value: dict[str, Any] | None) -> dict[str, int | float] | None:
        if value is None:
            return None
        out: dict[str, int | float] = {}
        for name, v in value.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue  # only numbers are metrics; anything else belongs in details
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"metrics.{name} must be a finite number >= 0")
            out[str(name)] = v
        return out


class TextSetScore(Contract):
    """Bits per byte of the subject on one text set, next to the base's on the same
    windows; ``delta_vs_base`` their relative change (``relative_change``)."""

    bits_per_byte: NonNegative
    base_bits_per_byte: NonNegative | None = None
    delta_vs_base: Finite | None = None
    tokens: Count
    bytes: Count
    # A forgetting measurement's subject without the disabled expert (ForgettingSubject),
    # on the same windows; None for any other evaluation.
    without_bits_per_byte: NonNegative | None = None

    @classmethod
    def of(
        cls, *, bits_per_byte: float, base_bits_per_byte: float, tokens: int, bytes: int
    ) -> TextSetScore:
        return cls(
            bits_per_byte=bits_per_byte,
            base_bits_per_byte=base_bits_per_byte,
            delta_vs_base=relative_change(bits_per_byte, base_bits_per_byte),
            tokens=tokens,
            bytes=bytes,
        )


Share = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]


class ContinuationScore(Contract):
    """The repetition rate of the subject's and of the base's greedy continuations
    (``ContinuationRequest``), pooled over the prompts, the tokens each generated, and the
    subject's first continuation as text (at most 1000 characters), for a reader."""

    repetition: Share
    base_repetition: Share
    ngram: Annotated[StrictInt, Field(ge=1)]
    prompts: Count
    tokens: Count
    base_tokens: Count
    sample: Annotated[str, StringConstraints(strict=True, max_length=1000)] = ""


class EvaluationResult(Contract):
    """What a worker completes an ``evaluate`` job with: one score per named text set
    and, when the payload asked for them, the continuations' repetition."""

    results: dict[str, TextSetScore]
    continuations: ContinuationScore | None = None
