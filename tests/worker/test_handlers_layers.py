"""Every job kind with experts of different layer sets (docs/composition.md, "Experts in
some layers only"): expert ``a1`` is the tiny base's expert ``a`` restricted to MoE layer
1, ``b`` covers both layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import subset_expert

from modelcore.artifacts import load_base
from modelcore.compose.composed import MANIFEST_FORMAT, ComposedModel
from modelcore.experts import load_expert
from worker.handlers import BaseCache, JobContext, JobInputs, run_job


@pytest.fixture(scope="module")
def files(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("subset")
    return {
        **tiny["experts"],
        "a1": subset_expert(tiny["experts"]["a"], root / "a1.safetensors", [1]),
    }


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    return JobContext(work_dir=tmp_path, bases=BaseCache())


def _inputs(tiny, files, make_ref) -> JobInputs:
    return JobInputs(
        base_dir=tiny["base"],
        expert_files={make_ref(p, n)["digest"]: p for n, p in files.items()},
    )


def _payload(tiny, files, make_ref, method: str, names, texts, **extra: Any) -> dict:
    return {
        "composition_id": "cmp_" + "L" * 26,
        "method": method,
        "base_revision": tiny["revision"],
        "experts": [make_ref(files[n], n) for n in names],
        "weights": None,
        "texts": texts,
        "params": {},
        **extra,
    }


def _bits(tiny, files, method: str, names, texts, **kw: Any) -> float:
    bundle = load_base(tiny["base"])
    experts = [load_expert(files[n])[0] for n in names]
    with ComposedModel(bundle, method, experts, **kw) as composed:
        return float(composed.bits_per_byte(texts)["bits_per_byte"])


def test_the_subset_expert_covers_one_layer(files) -> None:
    tensors, meta = load_expert(files["a1"])
    assert json.loads(meta["layers"]) == [1]
    assert {k.split(".")[1] for k in tensors} == {"1"}
    assert files["a1"].stat().st_size < 0.6 * files["a"].stat().st_size


def test_mixture_and_ensemble_of_a_subset_and_a_full_expert(
    tiny, files, make_ref, ctx, texts
) -> None:
    inputs = _inputs(tiny, files, make_ref)
    out = run_job(
        "compose.mixture",
        _payload(tiny, files, make_ref, "mixture", ["a1", "b"], texts),
        inputs,
        ctx,
    )
    got = out.result["metrics"]["bits_per_byte"]
    assert got == pytest.approx(_bits(tiny, files, "mixture", ["a1", "b"], texts))
    # Not the same as b alone, nor as the full a with b: a1's layer counts, a's other not.
    assert got != pytest.approx(_bits(tiny, files, "mixture", ["b"], texts))
    assert got != pytest.approx(_bits(tiny, files, "mixture", ["a", "b"], texts))
    assert ctx.bases.get(tiny["base"], tiny["revision"]).model.n_modules == [8, 8]
    payload = _payload(tiny, files, make_ref, "ensemble", ["a1", "b"], texts, weights=[1.0, 1.0])
    out = run_job("compose.ensemble", payload, inputs, ctx)
    want = _bits(
        tiny, files, "ensemble", ["a1", "b"], texts, weights=out.result["weights"],
        base_weight=out.result["base_weight"],
    )  # fmt: skip
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert ctx.bases.get(tiny["base"], tiny["revision"]).model.n_modules == [8, 8]


def test_average_of_a_subset_and_a_full_expert(tiny, files, make_ref, ctx, texts) -> None:
    inputs = _inputs(tiny, files, make_ref)
    payload = _payload(
        tiny, files, make_ref, "average", ["a1", "b"], texts, weights=[1.0, 3.0],
        params={"merge": "weighted"},
    )  # fmt: skip
    out = run_job("compose.average", payload, inputs, ctx)
    merged, meta = load_expert(out.weights, config=load_base(tiny["base"]).config)
    a, b = (load_expert(files[n])[0] for n in ("a", "b"))
    assert json.loads(meta["layers"]) == [0, 1]  # the union
    for name in merged:
        if name.startswith("layers.0."):
            # Only b covers layer 0: its weights renormalised over b alone are 1.
            assert torch.equal(merged[name], b[name]), name
        else:
            torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name])
    record = json.loads(meta["merge"])
    assert record["weights"] == pytest.approx([0.25, 0.75])
    assert record["layer_weights"] == {"0": [0.0, 1.0], "1": pytest.approx([0.25, 0.75])}
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(
        _merged_bits(tiny, out.weights, texts)
    )
    for merge in ("uniform", "ties"):
        payload = _payload(
            tiny, files, make_ref, "average", ["a1", "b", "c"], texts, params={"merge": merge}
        )
        out = run_job("compose.average", payload, inputs, JobContext(ctx.work_dir / merge))
        _, meta = load_expert(out.weights, config=load_base(tiny["base"]).config)
        assert json.loads(meta["layers"]) == [0, 1]


def _merged_bits(tiny, path: Path, texts) -> float:
    bundle = load_base(tiny["base"])
    with ComposedModel(bundle, "average", [load_expert(path)[0]]) as composed:
        return float(composed.bits_per_byte(texts)["bits_per_byte"])


def test_distill_covers_the_layers_of_its_teachers(tiny, files, make_ref, ctx, texts) -> None:
    inputs = _inputs(tiny, files, make_ref)
    params = {"steps": 2, "seq_len": 16, "batch_size": 2}
    config = load_base(tiny["base"]).config
    for names, layers in ((["a1"], [1]), (["a1", "b"], [0, 1])):
        payload = _payload(tiny, files, make_ref, "distill", names, texts, params=params)
        out = run_job("compose.distill", payload, inputs, JobContext(ctx.work_dir / names[-1]))
        _, meta = load_expert(out.weights, config=config)
        assert json.loads(meta["layers"]) == layers
        assert out.result["details"]["layers"] == layers
        assert len(out.result["details"]["kl_curve"]) == 2
        assert ctx.bases.get(tiny["base"], tiny["revision"]).model.n_modules == [8, 8]


def test_evaluate_a_subset_expert_and_a_mixed_composition(
    tiny, files, make_ref, ctx, texts
) -> None:
    inputs = _inputs(tiny, files, make_ref)
    payload = {
        "subject": {"kind": "expert", "expert": make_ref(files["a1"], "a1")},
        "base_revision": tiny["revision"],
        "text_sets": {"all": texts},
    }
    out = run_job("evaluate", payload, inputs, ctx)
    assert out.result["results"]["all"]["bits_per_byte"] == pytest.approx(
        _bits(tiny, files, "mixture", ["a1"], texts)
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": "cmp_" + "M" * 26,
        "method": "ensemble",
        "base_revision": tiny["revision"],
        "experts": [
            {**make_ref(files["a1"], "a1"), "weight": 0.25},
            {**make_ref(files["b"], "b"), "weight": 0.25},
        ],
        "params": {},
        "output": None,
        "metrics": None,
        "with_base": True,
        "base_weight": 0.5,
    }
    payload["subject"] = {
        "kind": "composition",
        "composition_id": manifest["id"],
        "manifest": manifest,
    }
    out = run_job("evaluate", payload, inputs, ctx)
    want = _bits(tiny, files, "ensemble", ["a1", "b"], texts, weights=[0.25, 0.25], base_weight=0.5)
    assert out.result["results"]["all"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
