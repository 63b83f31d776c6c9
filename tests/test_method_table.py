"""One table of composition methods: the spec module declares each method, modelcore computes
it, and nothing else spells its name.

A method name written as a string literal anywhere else (a ``"distill"`` in a route, a
``"compose.average"`` in the worker) is a second copy of the table that can drift from it;
the recipe for adding a method (docs/architecture.md) relies on there being none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import registry.protocol.methods as spec_module
from agora.methods import METHODS as CLI_METHODS
from registry.protocol import COMPOSE_KINDS, JOB_KINDS, METHOD_SPECS, METHODS
from registry.services import jobs as queue
from registry.services.compositions import check_method
from worker.handlers import COMPOSE_HANDLERS, HANDLERS

ROOT = Path(__file__).resolve().parents[1]
SPEC_MODULE = Path(spec_module.__file__).resolve()
# Where a method may be named: its spec, and the model code that computes it.
ALLOWED = (SPEC_MODULE, ROOT / "modelcore")
SCANNED = ("registry", "worker", "agora", "modelcore")


def _method_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string literal in ``path`` that is a method name or the job
    kind of one. Docstrings and messages that mention a method in prose are not literals
    of its name."""
    names = set(METHOD_SPECS) | {spec.job_kind for spec in METHOD_SPECS.values()}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    )


def _allowed(path: Path) -> bool:
    return any(path == place or place in path.parents for place in ALLOWED)


def test_method_names_are_written_only_in_the_spec_module_and_modelcore() -> None:
    outside: list[str] = []
    where: dict[str, set[str]] = {name: set() for name in METHOD_SPECS}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, value in _method_literals(path):
                if not _allowed(path.resolve()):
                    outside.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
                elif value in where:
                    where[value].add("spec" if path.resolve() == SPEC_MODULE else "modelcore")
    assert outside == [], "method names outside the spec table:\n" + "\n".join(outside)
    # Each method is declared in the spec module, and computed in modelcore.
    assert all(places == {"spec", "modelcore"} for places in where.values()), where


def test_the_scan_sees_a_method_name_where_one_is_written(tmp_path: Path) -> None:
    """The scanner is not blind: a literal in a call, a comparison and a dict key counts,
    prose does not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Averages experts: the average method."""\n'
        'KIND = "compose.distill"\n'
        'def f(m):\n    return m == "average" or {"ensemble": 1}\n'
        'print(f"method {KIND}")\n',
        encoding="utf-8",
    )
    assert _method_literals(sample) == [(2, "compose.distill"), (4, "average"), (4, "ensemble")]


def test_the_worker_the_cli_and_the_registry_take_their_methods_from_the_table() -> None:
    assert tuple(METHOD_SPECS) == METHODS == CLI_METHODS
    assert set(COMPOSE_HANDLERS) == set(METHODS)
    assert tuple(HANDLERS) == JOB_KINDS == queue.KINDS
    assert tuple(spec.job_kind for spec in METHOD_SPECS.values()) == COMPOSE_KINDS
    for name in METHODS:
        check_method(name)  # accepted by the registry: no exception
