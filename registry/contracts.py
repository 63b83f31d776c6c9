"""Wire contracts shared by the registry, the worker and the SDK.

* ``METHOD_SPECS``: every composition method, declared once with its parameters (type,
  bounds, default, what it does) and its paper. The registry checks requests against it,
  the worker takes its defaults from it, and the API's OpenAPI text and the CLI's help
  list the parameters from it, so no list of parameters is written twice.
* ``ComposeResult`` and ``EvaluationResult``: what a worker completes a job with. The
  worker builds them, the registry validates what arrives with them (a result that does
  not fit is 422 ``invalid_result``).

An ensemble (and a distillation's teacher, which is an ensemble) has the unmodified base
as one more path by default, the "null expert" (``with_base``): its posterior falls back
on the base on text no expert fits, so adding an expert harms nothing outside its domain
(docs/composition.md, "Do no harm"). Its prior weight is ``base_weight``, on the scale of
the experts' weights; without one the base gets the mean of theirs.

A method may carry a ``Caution``: what the registry says with every request for it (the
202's and the composition's ``warnings``; the SDK warns it as a ``CompositionWarning``,
the CLIs print it). ``average`` has one, ``AVERAGE_CAUTION``: measured, a parameter average
of independently trained experts harms (docs/composition.md, "Do no harm").

pydantic and the standard library only: the SDK imports this module and installs light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

ParamValue = int | float | str | bool


class ParamError(ValueError):
    """A method parameter that is unknown, of the wrong type or out of its bounds."""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Param:
    """One method parameter. ``default`` None: optional, absent unless given."""

    name: str
    kind: type[ParamValue]
    default: ParamValue | None
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound ``low`` itself is excluded
    choices: tuple[str, ...] = ()

    def check(self, value: object) -> ParamValue | None:
        """The value checked (floats as float); ``ParamError`` naming the parameter."""
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ParamError(f"params.{self.name} must be true or false")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise ParamError(f"params.{self.name} must be one of {', '.join(self.choices)}")
            return str(value)
        integer = self.kind is int
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else int | float)
            or not math.isfinite(value)
            or not self._in_bounds(float(value))
        ):
            kind = "an integer" if integer else "a number"
            raise ParamError(f"params.{self.name} must be {kind} {self.bounds()}".rstrip())
        return int(value) if integer else float(value)

    def _in_bounds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def bounds(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        low = "" if self.low is None else _number(self.low)
        high = "" if self.high is None else _number(self.high)
        if low and high:
            return f"in {'(' if self.low_open else '['}{low}, {high}]"
        if low:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"<= {high}" if high else ""

    def describe(self) -> str:
        """``name`` (type bounds, default): help; as the API docs and the CLI help say it."""
        if self.kind is str:
            shape = self.bounds()
        else:
            kind = {bool: "bool", int: "int", float: "number"}[self.kind]
            shape = f"{kind} {self.bounds()}".rstrip()
        if self.default is None:
            default = "optional"
        else:
            default = f"default {str(self.default).lower() if self.kind is bool else self.default}"
        return f"{self.name} ({shape}, {default}): {self.help}"


@dataclass(frozen=True)
class Caution:
    """A warning that comes with every request for a method: a stable ``code`` clients
    switch on, and the ``detail`` a person reads (what was measured, what to use instead)."""

    code: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


# The one place this text is written: the API, the SDK and both CLIs show it from here.
AVERAGE_CAUTION = Caution(
    "average_may_harm",
    "A parameter average of independently trained experts does not do no harm at this "
    "scale: measured on 3 seeds (tiny base, CLI defaults), the uniform average of the "
    "c_headers and licenses experts was worse than the base on its own domains on 2 seeds "
    "(+1.4% to +3.7% bits per byte) and did nothing on the third, and raised domains "
    "outside it by up to +1.6% (+2.6% for two unseen-domain experts); TIES at density 0.2 "
    "trims the modules until they almost never fire (within 0.1% of the base everywhere). "
    "Prefer ensemble (the base is a path: at most +0.01% outside its domains, measured) "
    "or distill; see docs/composition.md, 'Do no harm'.",
)


@dataclass(frozen=True)
class MethodSpec:
    """A composition method: its experts, what its ``weights`` mean, its parameters, and
    the ``caution`` every request for it is answered with (None: none)."""

    name: str
    summary: str
    paper: str
    min_experts: int
    takes_weights: bool
    params: tuple[Param, ...] = ()
    caution: Caution | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}")

    def defaults(self) -> dict[str, ParamValue]:
        return {p.name: p.default for p in self.params if p.default is not None}

    def check_params(self, given: Mapping[str, object] | None) -> dict[str, ParamValue]:
        """Every parameter checked, defaults filled in, optional ones only when given."""
        values = dict(given or {})
        unknown = sorted(set(values) - {p.name for p in self.params})
        if unknown:
            allowed = ", ".join(p.name for p in self.params) or "none"
            raise ParamError(
                f"unknown params for {self.name}: {', '.join(unknown)} (allowed: {allowed})"
            )
        out: dict[str, ParamValue] = {}
        for p in self.params:
            value = p.check(values.get(p.name, p.default))
            if value is not None:
                out[p.name] = value
        if "base_weight" in out and out.get("with_base") is False:
            raise ParamError("params.base_weight is the base path's weight: it needs with_base")
        return out


# The base as one more path of an ensemble: ensemble and distill (whose teacher is one).
WITH_BASE = Param(
    "with_base",
    bool,
    True,
    "the unmodified base is one more path (the null expert) that the posterior falls back "
    "on where no expert fits (false: the experts alone)",
)
BASE_WEIGHT = Param(
    "base_weight",
    float,
    None,
    "the base path's prior weight, on the scale of weights (needs weights; absent: the "
    "mean of the experts' weights)",
    low=0.0,
    low_open=True,
)

METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "mixture",
            "the experts inserted into the base's MoE layers; token-level top-k routing",
            "Shen et al. 2023, ModuleFormer, https://arxiv.org/abs/2306.04640",
            min_experts=1,
            takes_weights=False,
        ),
        MethodSpec(
            "ensemble",
            "DEMix output ensembling with a Bayesian posterior over the paths (the experts, "
            "and the base unless with_base is false); weights are the prior",
            "Gururangan et al. 2022, DEMix Layers, https://arxiv.org/abs/2108.05036",
            min_experts=1,
            takes_weights=True,
            params=(
                Param(
                    "prior_windows",
                    int,
                    8,
                    "windows of the texts the prior is estimated on (without weights)",
                    low=1,
                    high=64,
                ),
                WITH_BASE,
                BASE_WEIGHT,
            ),
        ),
        MethodSpec(
            "average",
            "the experts' parameters averaged into one new expert",
            "Wortsman et al. 2022, Model soups, https://arxiv.org/abs/2203.05482; "
            "Yadav et al. 2023, TIES-Merging, https://arxiv.org/abs/2306.01708",
            min_experts=2,
            takes_weights=True,
            params=(
                Param(
                    "merge",
                    str,
                    "uniform",
                    "how the experts are averaged",
                    choices=("uniform", "weighted", "ties"),
                ),
                Param(
                    "density", float, 0.2, "ties: the fraction of each delta kept", low=0, high=1
                ),
            ),
            caution=AVERAGE_CAUTION,
        ),
        MethodSpec(
            "distill",
            "one new expert trained on the ensemble's distributions over the texts (KL)",
            "Hinton et al. 2015, Distilling the Knowledge, https://arxiv.org/abs/1503.02531",
            min_experts=1,
            takes_weights=True,
            params=(
                Param("steps", int, 50, "optimizer steps", low=1, high=5000),
                Param("lr", float, 1e-2, "learning rate", low=1e-6, high=1.0),
                Param("seq_len", int, 64, "tokens per training window", low=8, high=4096),
                Param("batch_size", int, 8, "windows per step", low=1, high=256),
                Param("seed", int, 0, "batch order and initialisation", low=0, high=2**31 - 1),
                WITH_BASE,
                BASE_WEIGHT,
            ),
        ),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)


def check_params(method: str, params: Mapping[str, object] | None) -> dict[str, ParamValue]:
    """``METHOD_SPECS[method].check_params``; ``ParamError`` for an unknown method too."""
    spec = METHOD_SPECS.get(method)
    if spec is None:
        raise ParamError(f"method must be one of {', '.join(METHODS)}")
    return spec.check_params(params)


def method_cautions(method: str) -> list[Caution]:
    """The cautions a request for ``method`` is answered with: [] for most methods (and
    for an unknown one, which is refused anyway)."""
    spec = METHOD_SPECS.get(method)
    return [] if spec is None or spec.caution is None else [spec.caution]


def params_summary() -> str:
    """One line per method with parameters: ``method: name, name``."""
    return "; ".join(
        f"{s.name}: {', '.join(p.name for p in s.params)}"
        for s in METHOD_SPECS.values()
        if s.params
    )


def params_reference() -> str:
    """Every method's parameters, described (the API's and the CLI's help text)."""
    return "\n".join(
        f"{s.name}: " + "; ".join(p.describe() for p in s.params)
        for s in METHOD_SPECS.values()
        if s.params
    )


def relative_change(value: float, base: float | None) -> float | None:
    """``(value - base) / base``: +0.004 is 0.4% more bits per byte than the base (worse);
    None without a base (or a base of 0 bits, where no change is relative)."""
    if base is None or base <= 0:
        return None
    return (value - base) / base


# -- job results ------------------------------------------------------------------------------

NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True)


class ComposeResult(_Contract):
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


class TextSetScore(_Contract):
    """Bits per byte of the subject on one text set, next to the base's on the same
    windows; ``delta_vs_base`` their relative change (``relative_change``)."""

    bits_per_byte: NonNegative
    base_bits_per_byte: NonNegative | None = None
    delta_vs_base: Finite | None = None
    tokens: Count
    bytes: Count

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


class EvaluationResult(_Contract):
    """What a worker completes an ``evaluate`` job with: one score per named text set."""

    results: dict[str, TextSetScore]
