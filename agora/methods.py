"""The composition methods as the command line offers them: every list and default here is
a view of the one spec table, ``registry.protocol.METHOD_SPECS`` (the recipe for a new
method is in docs/architecture.md), so no method name is written in agora/.

The local commands intersect these with what modelcore computes (checked when they run,
where torch is imported).
"""

from __future__ import annotations

from registry.protocol import (
    AVERAGE,
    DISTILL,
    ENSEMBLE,
    METHOD_SPECS,
    METHODS,
    MIXTURE,
    WEIGHTED,
    MethodSpec,
    Param,
    params_summary,
    relative_change,
)

__all__ = [
    "BASE_PATH_METHODS",
    "DEFAULT_COMPOSE_METHOD",
    "DEFAULT_LOCAL_METHOD",
    "DISTILL_METHOD",
    "LOCAL_EVAL_METHODS",
    "MERGE_METHOD",
    "MERGE_PARAM",
    "METHODS",
    "METHOD_SPECS",
    "WEIGHTED",
    "MethodSpec",
    "params_summary",
    "relative_change",
]

# --with-base/--without-base applies to these alone: an ensemble, and a distillation
# (whose teacher is one).
BASE_PATH_METHODS: tuple[str, ...] = tuple(
    name for name, spec in METHOD_SPECS.items() if spec.has_base_path
)
# A local evaluation computes a composition in place; a distillation trains a student
# first (`agora local distill`, or a worker through `agora compose`).
LOCAL_EVAL_METHODS: tuple[str, ...] = tuple(name for name in METHODS if name != DISTILL.name)
# `agora compose` asks for an ensemble unless told otherwise: it does no harm outside its
# experts' domains (docs/composition.md, "Do no harm").
DEFAULT_COMPOSE_METHOD = ENSEMBLE.name
# `agora local eval` with experts and no --method inserts them into the base.
DEFAULT_LOCAL_METHOD = MIXTURE.name
# `agora local distill` is named for the method it computes on local files.
DISTILL_METHOD = DISTILL.name
# `agora local merge` computes what a parameter average does, file to file: its
# --method offers the choices of the registry's `--param merge=...`.
MERGE_METHOD = AVERAGE.name
MERGE_PARAM: Param = AVERAGE.param("merge")
