"""Composition methods: one ``MethodSpec`` per method, the only place one is declared.

``METHOD_SPECS`` holds every composition method with its parameters (type, bounds,
default, what it does), its paper, how many experts it takes, what its ``weights`` mean,
and whether it produces a new expert. The registry checks requests against it, the worker
derives its handlers and its parameter parsing from it, and the API's OpenAPI text and
the CLI's help list the parameters from it, so no list of methods or parameters is
written twice. ``MIXTURE``, ``ENSEMBLE``, ``AVERAGE`` and ``DISTILL`` name the specs for
code that has to single one out (docs/architecture.md, "Adding a composition method").

An ensemble (and a distillation's teacher, which is an ensemble) has the unmodified base
as one more path by default, the "null expert" (``with_base``): its posterior falls back
on the base on text no expert fits, so adding an expert harms nothing outside its domain
(docs/composition.md, "Do no harm"). Its prior weight is ``base_weight``, on the scale of
the experts' weights; without one the base gets the mean of theirs.

A method may carry a ``Caution``: what the registry says with every request for it (the
202's and the composition's ``warnings``; the SDK warns it as a ``CompositionWarning``,
the CLIs print it). ``average`` has one, ``AVERAGE_CAUTION``: measured, a parameter average
of independently trained experts harms (docs/composition.md, "Do no harm").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

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
    the ``caution`` every request for it is answered with (None: none).

    Behaviour the registry and the worker take from here instead of from the name:

    * ``takes_weights``: weights are the experts' shares (False: the method routes per
      token and refuses weights); ``retrieval_weights``: when retrieval picked the
      experts, its scores are the weights.
    * ``weighting``: the name of a str parameter that says how weights are used:
      ``UNIFORM`` ignores them, ``WEIGHTED`` needs them (average's ``merge``).
    * ``produces_expert``: the job's output is a new expert (stored with a datasheet the
      registry writes, named ``derived_name`` + " of " + the parents' names); its
      manifest's ``output`` stands for the inputs.
    * ``reproducible``: (with ``produces_expert``) the same payload gives the same expert
      on any worker, up to float rounding, so a second worker's replica checks an
      untrusted worker's output; without it, an evaluation by a second worker checks the
      output's claimed bits per byte (docs/architecture.md, "Workers that lie").
    * ``serves_ensemble``: the composition runs its experts as paths of an ensemble at
      inference; its manifest records the weights and the base path (``with_base``).
    * ``has_base_path`` (from ``params``): the base can be one more path (``with_base``).
    """

    name: str
    summary: str
    paper: str
    min_experts: int
    takes_weights: bool
    params: tuple[Param, ...] = ()
    caution: Caution | None = None
    produces_expert: bool = False
    derived_name: str | None = None
    reproducible: bool = False
    serves_ensemble: bool = False
    retrieval_weights: bool = False
    weighting: str | None = None

    def __post_init__(self) -> None:
        if self.produces_expert != (self.derived_name is not None):
            raise ValueError(f"{self.name}: a method that produces an expert names it")
        if self.reproducible and not self.produces_expert:
            raise ValueError(f"{self.name}: only a method that produces an expert reproduces it")
        if self.weighting is not None:
            choices = self.param(self.weighting).choices
            if not {UNIFORM, WEIGHTED} <= set(choices):
                raise ValueError(f"{self.name}: {self.weighting} must offer uniform and weighted")

    @property
    def job_kind(self) -> str:
        """The kind of the job that computes a composition of this method."""
        return f"{COMPOSE_PREFIX}{self.name}"

    @property
    def has_base_path(self) -> bool:
        return any(p.name == WITH_BASE.name for p in self.params)

    def with_base(self, params: Mapping[str, object]) -> bool:
        """Whether these (checked) params have the base as a path: the parameter's default
        where the method has it, never where it has not."""
        if not self.has_base_path:
            return False
        return bool(params.get(WITH_BASE.name, WITH_BASE.default))

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
        if BASE_WEIGHT.name in out and out.get(WITH_BASE.name) is False:
            raise ParamError(
                "params.base_weight is the base path's weight: it needs params.with_base"
            )
        return out


COMPOSE_PREFIX = "compose."
# The choices of a ``weighting`` parameter that say whether weights are used.
UNIFORM = "uniform"
WEIGHTED = "weighted"

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

MIXTURE = MethodSpec(
    "mixture",
    "the experts inserted into the base's MoE layers; token-level top-k routing",
    "Shen et al. 2023, ModuleFormer, https://arxiv.org/abs/2306.04640",
    min_experts=1,
    takes_weights=False,
)
ENSEMBLE = MethodSpec(
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
    serves_ensemble=True,
    retrieval_weights=True,
)
AVERAGE = MethodSpec(
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
            UNIFORM,
            "how the experts are averaged",
            choices=(UNIFORM, WEIGHTED, "ties"),
        ),
        Param(
            "density",
            float,
            0.2,
            "ties: the fraction of each delta kept",
            low=0,
            high=1,
            low_open=True,
        ),
    ),
    caution=AVERAGE_CAUTION,
    produces_expert=True,
    derived_name="Weight average",
    # An elementwise merge written canonically (modelcore.compose.merge.merge_files).
    reproducible=True,
    retrieval_weights=True,
    weighting="merge",
)
DISTILL = MethodSpec(
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
    produces_expert=True,
    derived_name="Distillation",
)

METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (MIXTURE, ENSEMBLE, AVERAGE, DISTILL)
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)


def _known_method(value: str) -> str:
    if value not in METHOD_SPECS:
        raise ValueError(f"must be one of {', '.join(METHODS)}, not {value!r}")
    return value


# A field that names a method of the table (job payloads, manifests).
MethodName = Annotated[str, AfterValidator(_known_method)]


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


# -- job kinds --------------------------------------------------------------------------------

COMPOSE_KINDS: tuple[str, ...] = tuple(spec.job_kind for spec in METHOD_SPECS.values())
EVALUATE_KIND = "evaluate"
JOB_KINDS: tuple[str, ...] = (*COMPOSE_KINDS, EVALUATE_KIND)


def spec_for_kind(kind: str) -> MethodSpec | None:
    """The method a ``compose.*`` job kind computes; None for any other kind."""
    if not kind.startswith(COMPOSE_PREFIX):
        return None
    return METHOD_SPECS.get(kind[len(COMPOSE_PREFIX) :])


def produces_expert(kind: str) -> bool:
    """Whether a job of ``kind`` completes with a new expert file."""
    spec = spec_for_kind(kind)
    return spec is not None and spec.produces_expert
