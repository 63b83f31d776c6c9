"""``agora base init|train``, ``agora expert train`` and ``agora eval`` end to end, at
tiny scale on a small real corpus (a few training steps: this checks the plumbing;
the experiments check that training works)."""

from __future__ import annotations

import json
import math
import re

import pytest

from modelcore.artifacts import compute_revision
from modelcore.experts import load_expert

SMALL = ["--max-bytes-per-domain", "16384"]
FAST = ["--batch-size", "2", "--seq-len", "32", "--no-progress"]
REVISION = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def trained_base(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("bases") / "tiny"
    result = cli("base", "train", "--preset", "tiny", "--out", str(out), "--steps", "3",
                 "--dense-steps", "1", *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result.stdout.strip().splitlines()[-1]


def test_base_train_prints_the_revision_of_the_bundle_last(trained_base):
    out, revision = trained_base
    assert REVISION.match(revision)
    assert revision == compute_revision(out)
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer.json", "model.safetensors"}


def test_base_init_is_deterministic_per_seed(cli, tmp_path):
    revs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = cli("base", "init", "--preset", "tiny", "--out", str(tmp_path / name),
                     "--seed", seed, *SMALL)  # fmt: skip
        assert result.exit_code == 0, result.output
        revs.append(result.stdout.strip().splitlines()[-1])
    assert revs[0] == revs[1]
    assert revs[0] != revs[2]


def test_base_refuses_to_overwrite_a_bundle(cli, trained_base):
    out, revision = trained_base
    result = cli("base", "init", "--preset", "tiny", "--out", str(out), *SMALL)
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert compute_revision(out) == revision


def test_unknown_preset_is_a_usage_error(cli, tmp_path):
    result = cli("base", "init", "--preset", "huge", "--out", str(tmp_path / "x"), *SMALL)
    assert result.exit_code == 2
    assert "unknown preset" in result.output
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def expert_file(cli, trained_base, tmp_path_factory):
    base, _ = trained_base
    out = tmp_path_factory.mktemp("experts") / "docs.safetensors"
    result = cli("expert", "train", "--base", str(base), "--domain", "python_docs", "--out",
                 str(out), "--steps", "2", "--routing-reg", "0.01", *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_expert_train_writes_an_expert_pinned_to_the_base(expert_file, trained_base):
    path, summary = expert_file
    _, revision = trained_base
    assert summary["base_revision"] == revision
    assert summary["domain"] == "python_docs"
    assert summary["steps"] == 2
    tensors, metadata = load_expert(path)
    assert metadata["base_revision"] == revision
    assert any(name.endswith("router_row") for name in tensors)


def test_expert_can_start_from_another_expert(cli, trained_base, expert_file, tmp_path):
    base, _ = trained_base
    first, _ = expert_file
    out = tmp_path / "licenses.safetensors"
    result = cli("expert", "train", "--base", str(base), "--domain", "licenses", "--out",
                 str(out), "--steps", "1", "--init-from", str(first), *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["init_from"] == str(first)


def test_expert_train_rejects_an_unknown_domain_and_writes_nothing(cli, trained_base, tmp_path):
    base, _ = trained_base
    out = tmp_path / "e.safetensors"
    result = cli("expert", "train", "--base", str(base), "--domain", "klingon",
                 "--out", str(out), *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 2
    assert "unknown domain" in result.output
    assert "python_docs" in result.output
    assert not out.exists()


def test_eval_json_reports_every_domain(cli, trained_base, expert_file):
    base, revision = trained_base
    path, _ = expert_file
    plain = cli("eval", "--base", str(base), "--json", *SMALL)
    mixed = cli("eval", "--base", str(base), "--experts", str(path), "--json", *SMALL)
    assert plain.exit_code == 0, plain.output
    assert mixed.exit_code == 0, mixed.output
    a, b = json.loads(plain.stdout), json.loads(mixed.stdout)
    assert a["base_revision"] == revision
    assert b["experts"] == [str(path)]
    assert set(a["domains"]) == {"python_stdlib", "python_docs", "licenses", "c_headers",
                                 "python_tests"} & set(a["domains"])  # fmt: skip
    assert "python_docs" in a["domains"]
    for name, r in a["domains"].items():
        assert set(r) >= {"bits_per_byte", "perplexity", "tokens"}
        assert r["tokens"] > 0
        assert 0 < r["bits_per_byte"] < 16
        assert math.isclose(r["tokens"], b["domains"][name]["tokens"])
    table = cli("eval", "--base", str(base), "--domain", "licenses", *SMALL)
    assert table.exit_code == 0, table.output
    assert "licenses" in table.stdout
    assert "python_docs" not in table.stdout


def test_eval_refuses_an_expert_of_another_base(cli, expert_file, tmp_path):
    other = tmp_path / "other"
    made = cli("base", "init", "--preset", "tiny", "--out", str(other), "--seed", "5", *SMALL)
    assert made.exit_code == 0, made.output
    path, _ = expert_file
    result = cli("eval", "--base", str(other), "--experts", str(path), "--json", *SMALL)
    assert result.exit_code == 2
    assert "trained against base" in result.output


def test_expert_train_keeps_the_expert_in_its_lane_by_default(cli, trained_base, tmp_path):
    import inspect

    from agora.commands.train import expert_train as _expert_train
    from modelcore.train import recipes

    # The CLI's defaults are the recipes' (one source for the CLI, the report, the tests).
    defaults = {n: p.default for n, p in inspect.signature(_expert_train).parameters.items()}
    assert defaults["routing_reg"] == recipes.EXPERT_ROUTING_REG
    assert defaults["max_general_share"] == recipes.EXPERT_MAX_GENERAL_SHARE
    assert defaults["general_weight"] == recipes.EXPERT_GENERAL_WEIGHT
    assert defaults["general_batches"] == recipes.EXPERT_GENERAL_BATCHES
    base, _ = trained_base
    out = tmp_path / "lic.safetensors"
    result = cli("expert", "train", "--base", str(base), "--domain", "licenses", "--out",
                 str(out), "--steps", "3", "--max-general-share", "0.1", *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["max_general_share"] == 0.1
    assert summary["routing_reg"] == recipes.EXPERT_ROUTING_REG
    # On the calibration sample of general text the module fires on <= 10% of the tokens.
    assert summary["general_share"]
    assert all(share <= 0.1 for share in summary["general_share"].values())
    tensors, _ = load_expert(out)
    biases = {n: float(t) for n, t in tensors.items() if n.endswith("router_bias")}
    assert len(biases) == 2
    assert {str(k): v for k, v in summary["router_bias"].items()} == {
        n.split(".")[1]: v for n, v in biases.items()
    }
    # Turned off: no calibration, no bias.
    off = tmp_path / "off.safetensors"
    result = cli("expert", "train", "--base", str(base), "--domain", "licenses", "--out",
                 str(off), "--steps", "2", "--general-batches", "0", *FAST, *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["general_share"] == {}
    tensors, _ = load_expert(off)
    assert all(float(t) == 0.0 for n, t in tensors.items() if n.endswith("router_bias"))
    bad_out = str(tmp_path / "bad.safetensors")
    bad = cli("expert", "train", "--base", str(base), "--domain", "licenses", "--out",
              bad_out, "--max-general-share", "1.5", *FAST, *SMALL)  # fmt: skip
    assert bad.exit_code == 2
    assert "--max-general-share" in bad.output
    assert not (tmp_path / "bad.safetensors").exists()


def test_expert_train_refuses_to_overwrite_an_expert_unless_asked(cli, trained_base, tmp_path):
    base, _ = trained_base
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"an expert a user trained for an hour")
    args = ["expert", "train", "--base", str(base), "--domain", "licenses", "--out", str(out),
            "--steps", "1", "--general-batches", "0", *FAST, *SMALL]  # fmt: skip
    refused = cli(*args)
    assert refused.exit_code == 2
    assert "--overwrite" in refused.output
    assert out.read_bytes() == b"an expert a user trained for an hour"
    replaced = cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    load_expert(out)  # now the new expert
