"""`agora eval --method average` and `agora expert merge`: the local twins of the worker's
compose.average print the registry's caution about averages on stderr, and keep stdout as
it was (JSON), on the worker tests' tiny artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from registry.protocol import AVERAGE_CAUTION

CAUTION = f"warning: [average_may_harm] {AVERAGE_CAUTION.detail}"


@pytest.fixture
def cli(tmp_path: Path):
    from agora.cli import build_app

    app = build_app()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "COLUMNS": "400"}

    def run(*args: object) -> Any:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)

    return run


def test_eval_of_an_average_warns_and_an_ensemble_does_not(cli, tiny) -> None:
    experts = [x for name in "ab" for x in ("--experts", tiny["experts"][name])]
    common = ["--domain", "licenses", "--max-bytes-per-domain", "16384", "--device", "cpu"]
    averaged = cli(
        "eval", "--base", tiny["base"], *experts, "--method", "average", "--json", *common
    )
    assert averaged.exit_code == 0, averaged.output
    assert CAUTION in averaged.stderr
    assert json.loads(averaged.stdout)["method"] == "average"
    ensembled = cli(
        "eval", "--base", tiny["base"], *experts, "--method", "ensemble", "--json", *common
    )
    assert ensembled.exit_code == 0, ensembled.output
    assert "warning:" not in ensembled.stderr


def test_expert_merge_warns_and_still_prints_its_json(cli, tiny, tmp_path: Path) -> None:
    experts = [x for name in "ab" for x in ("--experts", tiny["experts"][name])]
    for method in ("uniform", "ties"):
        out = tmp_path / f"{method}.safetensors"
        merged = cli(
            "expert", "merge", "--base", tiny["base"], *experts, "--method", method, "--out", out
        )
        assert merged.exit_code == 0, merged.output
        assert CAUTION in merged.stderr
        assert json.loads(merged.stdout)["merge"]["method"] == method
        assert out.is_file()
    # A refused merge (one expert) is refused, not cautioned.
    one = cli(
        "expert",
        "merge",
        "--base",
        tiny["base"],
        "--experts",
        tiny["experts"]["a"],
        "--out",
        tmp_path / "one.safetensors",
    )
    assert one.exit_code == 2
    assert "warning:" not in one.stderr
