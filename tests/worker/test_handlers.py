"""Job handlers at tiny shapes, without a registry: payload + files in, result out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modelcore.artifacts import load_base
from modelcore.compose.composed import MANIFEST_FORMAT, ComposedModel
from modelcore.eval import evaluate
from modelcore.experts import load_expert
from worker.handlers import (
    BaseCache,
    JobCancelled,
    JobContext,
    JobInputs,
    PermanentJobError,
    required_inputs,
    run_job,
)


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    return JobContext(work_dir=tmp_path, bases=BaseCache())


def _inputs(tiny: dict[str, Any], make_ref) -> JobInputs:
    files = {make_ref(p, n)["digest"]: p for n, p in tiny["experts"].items()}
    return JobInputs(base_dir=tiny["base"], expert_files=files)


def _payload(tiny, make_ref, method: str, names: list[str], texts, **extra: Any) -> dict:
    return {
        "composition_id": "cmp_" + "A" * 26,
        "method": method,
        "base_revision": tiny["revision"],
        "experts": [make_ref(tiny["experts"][n], n) for n in names],
        "weights": None,
        "texts": texts,
        "params": {},
        **extra,
    }


def _composed_bits(
    tiny, method: str, names: list[str], texts, weights=None, *, with_base=True, base_weight=None
) -> float:
    bundle = load_base(tiny["base"])
    experts = [load_expert(tiny["experts"][n])[0] for n in names]
    base = {"with_base": with_base, "base_weight": base_weight} if method == "ensemble" else {}
    with ComposedModel(bundle, method, experts, weights=weights, **base) as composed:
        return float(composed.bits_per_byte(texts)["bits_per_byte"])


def test_mixture_reports_base_and_composition_bits(tiny, make_ref, ctx, texts) -> None:
    payload = _payload(tiny, make_ref, "mixture", ["a", "b"], texts)
    out = run_job("compose.mixture", payload, _inputs(tiny, make_ref), ctx)
    assert out.weights is None
    metrics = out.result["metrics"]
    assert metrics["bytes"] == sum(len(t.encode()) for t in texts)
    assert metrics["bits_per_byte"] == pytest.approx(
        _composed_bits(tiny, "mixture", ["a", "b"], texts)
    )
    assert metrics["base_bits_per_byte"] != pytest.approx(metrics["bits_per_byte"])
    # The cached base is left as it was found: the next job sees the bare base.
    assert ctx.bases.get(tiny["base"], tiny["revision"]).model.n_modules == [8, 8]


def test_base_stays_in_memory_between_jobs(tiny, make_ref, ctx, texts) -> None:
    first = ctx.bases.get(tiny["base"], tiny["revision"])
    run_job(
        "compose.mixture",
        _payload(tiny, make_ref, "mixture", ["a"], texts),
        _inputs(tiny, make_ref),
        ctx,
    )
    assert ctx.bases.get(tiny["base"], tiny["revision"]) is first


def test_ensemble_estimates_its_prior_on_the_texts(tiny, make_ref, ctx, texts) -> None:
    payload = _payload(
        tiny, make_ref, "ensemble", ["a", "b", "c"], texts, params={"prior_windows": 4}
    )
    out = run_job("compose.ensemble", payload, _inputs(tiny, make_ref), ctx)
    weights, base_weight = out.result["weights"], out.result["base_weight"]
    assert len(weights) == 3
    # The prior is over the experts and the base (the null expert, last): together, 1.
    assert out.result["with_base"] is True
    assert sum(weights) + base_weight == pytest.approx(1.0)
    assert out.result["details"]["prior"] == "estimated"
    shares = [*weights, base_weight]
    assert max(shares) - min(shares) > 1e-3  # not the uniform starting point
    # metrics are the ensemble's with exactly that prior
    want = _composed_bits(
        tiny, "ensemble", ["a", "b", "c"], texts, weights, base_weight=base_weight
    )
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_ensemble_uses_given_weights_as_the_prior(tiny, make_ref, ctx, texts) -> None:
    payload = _payload(tiny, make_ref, "ensemble", ["a", "b"], texts, weights=[3.0, 1.0])
    out = run_job("compose.ensemble", payload, _inputs(tiny, make_ref), ctx)
    # Without base_weight the base gets the mean of the experts' weights: 3 : 1 : 2.
    assert out.result["weights"] == pytest.approx([0.5, 1 / 6])
    assert out.result["base_weight"] == pytest.approx(1 / 3)
    assert out.result["details"]["prior"] == "given"
    given = {**payload, "params": {"with_base": True, "base_weight": 4.0}}
    out = run_job("compose.ensemble", given, _inputs(tiny, make_ref), ctx)
    assert out.result["weights"] == pytest.approx([3 / 8, 1 / 8])
    assert out.result["base_weight"] == pytest.approx(0.5)
    want = _composed_bits(tiny, "ensemble", ["a", "b"], texts, [3 / 8, 1 / 8], base_weight=0.5)
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_ensemble_without_base_is_the_experts_alone(tiny, make_ref, ctx, texts) -> None:
    payload = _payload(
        tiny, make_ref, "ensemble", ["a", "b"], texts, weights=[3.0, 1.0],
        params={"with_base": False},
    )  # fmt: skip
    out = run_job("compose.ensemble", payload, _inputs(tiny, make_ref), ctx)
    assert out.result["with_base"] is False
    assert "base_weight" not in out.result
    assert out.result["weights"] == pytest.approx([0.75, 0.25])
    assert out.result["details"]["with_base"] is False
    want = _composed_bits(tiny, "ensemble", ["a", "b"], texts, [0.75, 0.25], with_base=False)
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_ensemble_with_the_base_does_no_harm_where_the_expert_does(
    tiny, make_ref, ctx, texts
) -> None:
    """Expert a (random) fits none of the texts: alone it is worse than the base on
    them; with the base as a path the posterior moves to the base and the ensemble is no
    worse than the base."""
    with_base = _payload(tiny, make_ref, "ensemble", ["a"], texts)
    without = {**with_base, "params": {"with_base": False}}
    inputs = _inputs(tiny, make_ref)
    on = run_job("compose.ensemble", with_base, inputs, ctx).result
    off = run_job("compose.ensemble", without, inputs, ctx).result
    base_bits = on["metrics"]["base_bits_per_byte"]
    assert off["metrics"]["bits_per_byte"] > base_bits + 0.1  # the expert alone harms
    assert on["base_weight"] > on["weights"][0]
    assert on["metrics"]["bits_per_byte"] <= base_bits + 1e-6


def test_average_uniform_of_identical_experts_is_that_expert(tiny, make_ref, ctx, texts) -> None:
    payload = _payload(tiny, make_ref, "average", ["a", "a"], texts, params={"merge": "uniform"})
    out = run_job("compose.average", payload, _inputs(tiny, make_ref), ctx)
    assert out.weights is not None
    assert out.weights.is_file()
    merged, meta = load_expert(out.weights)
    original, _ = load_expert(tiny["experts"]["a"])
    assert meta["base_revision"] == tiny["revision"]
    assert all(torch.equal(merged[k], original[k]) for k in original)
    assert out.result["metrics"]["bits_per_byte"] == pytest.approx(
        _composed_bits(tiny, "mixture", ["a"], texts)
    )


def test_average_weighted_and_ties(tiny, make_ref, ctx, texts) -> None:
    weighted = _payload(
        tiny,
        make_ref,
        "average",
        ["a", "b"],
        texts,
        weights=[1.0, 3.0],
        params={"merge": "weighted"},
    )
    out = run_job("compose.average", weighted, _inputs(tiny, make_ref), ctx)
    assert out.result["weights"] == pytest.approx([0.25, 0.75])
    a, b = (load_expert(tiny["experts"][n])[0] for n in "ab")
    merged, _ = load_expert(out.weights)
    name = next(iter(a))
    torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name])
    # weighted without weights: estimated from the texts (a posterior prior)
    estimated = _payload(tiny, make_ref, "average", ["a", "b"], texts, params={"merge": "weighted"})
    out = run_job("compose.average", estimated, _inputs(tiny, make_ref), ctx)
    assert out.result["details"]["weights_source"] == "estimated"
    # The posterior over the two experts only: the base takes no share of an average.
    assert len(out.result["weights"]) == 2
    assert sum(out.result["weights"]) == pytest.approx(1.0)
    assert "base_weight" not in out.result
    ties = _payload(
        tiny, make_ref, "average", ["a", "b", "c"], texts, params={"merge": "ties", "density": 0.5}
    )
    out = run_job("compose.average", ties, _inputs(tiny, make_ref), ctx)
    assert out.result["details"]["params"] == {"density": 0.5}
    assert load_expert(out.weights)[1]["base_revision"] == tiny["revision"]


def test_distill_trains_an_expert_and_reports_progress(tiny, make_ref, ctx, texts) -> None:
    seen: list[tuple[int, int, str]] = []
    ctx.progress = lambda done, total, message: seen.append((done, total, message))
    params = {"steps": 3, "lr": 0.01, "seq_len": 16, "batch_size": 2, "seed": 0}
    payload = _payload(tiny, make_ref, "distill", ["a", "b"], texts, params=params)
    out = run_job("compose.distill", payload, _inputs(tiny, make_ref), ctx)
    _, meta = load_expert(out.weights, config=load_base(tiny["base"]).config)
    assert meta["base_revision"] == tiny["revision"]
    details = out.result["details"]
    assert details["steps"] == 3
    assert len(details["kl_curve"]) == 3
    assert [s for s in seen if s[2] == "distill"][-1] == (3, 3, "distill")
    assert out.result["metrics"]["bits_per_byte"] > 0
    # The teacher had the base as a path (the default): its prior covers the two experts
    # and the base, last, and the result splits it into weights + base_weight.
    assert details["with_base"] is True
    assert len(details["teacher_prior"]) == 3
    assert out.result["weights"] == pytest.approx(details["teacher_prior"][:2])
    assert out.result["base_weight"] == pytest.approx(details["teacher_prior"][2])
    assert sum(out.result["weights"]) + out.result["base_weight"] == pytest.approx(1.0)
    teacher = _composed_bits(
        tiny, "ensemble", ["a", "b"], texts, out.result["weights"],
        base_weight=out.result["base_weight"],
    )  # fmt: skip
    assert details["teacher_bits_per_byte"] == pytest.approx(teacher, rel=1e-5)
    # Same payload, same bytes: a retried job uploads an identical expert.
    again = run_job(
        "compose.distill", payload, _inputs(tiny, make_ref), JobContext(work_dir=ctx.work_dir / "2")
    )
    assert again.weights.read_bytes() == out.weights.read_bytes()


def test_distill_without_base_and_with_given_weights(tiny, make_ref, ctx, texts) -> None:
    params = {"steps": 2, "seq_len": 16, "batch_size": 2}
    without = _payload(
        tiny, make_ref, "distill", ["a", "b"], texts, params={**params, "with_base": False}
    )
    out = run_job("compose.distill", without, _inputs(tiny, make_ref), ctx)
    assert out.result["with_base"] is False
    assert out.result["details"]["with_base"] is False
    assert len(out.result["details"]["teacher_prior"]) == 2
    assert sum(out.result["weights"]) == pytest.approx(1.0)
    assert "base_weight" not in out.result
    # Given weights and a base weight: the teacher's prior is exactly those, normalised.
    given = _payload(
        tiny, make_ref, "distill", ["a", "b"], texts, weights=[1.0, 3.0],
        params={**params, "base_weight": 4.0},
    )  # fmt: skip
    out = run_job("compose.distill", given, _inputs(tiny, make_ref), JobContext(ctx.work_dir / "g"))
    assert out.result["details"]["teacher_prior"] == pytest.approx([0.125, 0.375, 0.5])
    assert out.result["base_weight"] == pytest.approx(0.5)


def test_cancellation_stops_a_distillation(tiny, make_ref, ctx, texts) -> None:
    steps: list[int] = []
    ctx.progress = lambda done, total, message: steps.append(done)
    ctx.cancelled = lambda: len(steps) >= 3
    params = {"steps": 50, "seq_len": 16, "batch_size": 2}
    payload = _payload(tiny, make_ref, "distill", ["a", "b"], texts, params=params)
    with pytest.raises(JobCancelled):
        run_job("compose.distill", payload, _inputs(tiny, make_ref), ctx)
    assert max(steps) < 5


def test_evaluate_expert_and_composition(tiny, make_ref, ctx, texts) -> None:
    sets = {"code": texts[:1], "prose": texts[1:]}
    payload = {
        "subject": {"kind": "expert", "expert": make_ref(tiny["experts"]["b"], "b")},
        "base_revision": tiny["revision"],
        "text_sets": sets,
    }
    out = run_job("evaluate", payload, _inputs(tiny, make_ref), ctx)
    results = out.result["results"]
    assert set(results) == {"code", "prose"}
    assert results["prose"]["bits_per_byte"] == pytest.approx(
        _composed_bits(tiny, "mixture", ["b"], texts[1:])
    )
    assert results["code"]["bytes"] == len(texts[0].encode())
    # Every text set: the base on the same texts, and the relative change against it.
    bundle = load_base(tiny["base"])
    for name, r in results.items():
        base = evaluate(bundle.model, bundle.tokenizer, {name: sets[name]})[name]
        assert r["base_bits_per_byte"] == pytest.approx(base["bits_per_byte"])
        assert r["delta_vs_base"] == pytest.approx(
            (r["bits_per_byte"] - r["base_bits_per_byte"]) / r["base_bits_per_byte"]
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": "cmp_" + "B" * 26,
        "method": "ensemble",
        "base_revision": tiny["revision"],
        "experts": [
            {**make_ref(tiny["experts"]["a"], "a"), "weight": 0.5},
            {**make_ref(tiny["experts"]["c"], "c"), "weight": 0.5},
        ],
        "params": {},
        "output": None,
        "metrics": None,
    }
    payload["subject"] = {
        "kind": "composition",
        "composition_id": manifest["id"],
        "manifest": manifest,
    }
    _, refs = required_inputs("evaluate", payload)
    assert [r.digest for r in refs] == [e["digest"] for e in manifest["experts"]]
    out = run_job("evaluate", payload, _inputs(tiny, make_ref), ctx)
    # A manifest that does not say with_base predates the base as a path: built without.
    want = _composed_bits(tiny, "ensemble", ["a", "c"], texts[:1], [0.5, 0.5], with_base=False)
    assert out.result["results"]["code"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    # One that says so is evaluated with the base as a path, at its weight.
    manifest = {**manifest, "with_base": True, "base_weight": 0.5}
    manifest["experts"] = [{**e, "weight": 0.25} for e in manifest["experts"]]
    payload["subject"] = {**payload["subject"], "manifest": manifest}
    out = run_job("evaluate", payload, _inputs(tiny, make_ref), ctx)
    want = _composed_bits(tiny, "ensemble", ["a", "c"], texts[:1], [0.25, 0.25], base_weight=0.5)
    assert out.result["results"]["code"]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(
        _composed_bits(tiny, "ensemble", ["a", "c"], texts[:1], [0.5, 0.5], with_base=False)
    )


def _check_then_run(kind: str, payload: dict, inputs: JobInputs, ctx: JobContext) -> None:
    """What the runner does: the inputs are worked out (and downloaded), then the job runs."""
    required_inputs(kind, payload)
    run_job(kind, payload, inputs, ctx)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("compose.soup", {}, "unknown job kind"),
        ("compose.mixture", {"experts": []}, "non-empty"),
        (
            "compose.mixture",
            {"experts": [{"id": "exp_x", "version": 1, "digest": "md5:1"}]},
            "digest",
        ),
        ("compose.mixture", {"method": "ensemble"}, "does not match"),
        ("compose.ensemble", {"weights": [1.0]}, "weights"),
        ("compose.ensemble", {"weights": [-1.0, 2.0]}, "weights"),
        ("compose.ensemble", {"params": {"with_base": "yes"}}, "with_base"),
        ("compose.ensemble", {"params": {"base_weight": 1.0}}, "needs payload.weights"),
        (
            "compose.ensemble",
            {"weights": [1.0, 1.0], "params": {"with_base": False, "base_weight": 1.0}},
            "needs params.with_base",
        ),
        ("compose.distill", {"params": {"with_base": 1}}, "with_base"),
        ("compose.average", {"params": {"merge": "median"}}, "merge"),
        ("compose.average", {"params": {"merge": "weighted"}, "texts": []}, "needs weights"),
        ("compose.distill", {"texts": []}, "needs texts"),
        ("compose.distill", {"params": {"steps": "many"}}, "steps"),
        ("evaluate", {"subject": {"kind": "robot"}}, "subject.kind"),
    ],
)
def test_bad_payloads_are_permanent_errors(
    tiny, make_ref, ctx, texts, kind, change, message
) -> None:
    method = kind.split(".")[-1] if kind.startswith("compose.") else "mixture"
    payload = {**_payload(tiny, make_ref, method, ["a", "b"], texts), **change}
    with pytest.raises(PermanentJobError, match=message):
        _check_then_run(kind, payload, _inputs(tiny, make_ref), ctx)


def test_an_expert_of_another_base_is_a_permanent_error(
    tiny, make_ref, ctx, texts, tmp_path
) -> None:
    from modelcore.experts import save_expert

    foreign = tmp_path / "foreign.safetensors"
    save_expert(foreign, load_expert(tiny["experts"]["a"])[0], base_revision="0" * 64)
    ref = make_ref(foreign, "z")
    payload = {**_payload(tiny, make_ref, "mixture", ["b"], texts), "experts": [ref]}
    inputs = JobInputs(base_dir=tiny["base"], expert_files={ref["digest"]: foreign})
    with pytest.raises(PermanentJobError, match="made for base"):
        run_job("compose.mixture", payload, inputs, ctx)
