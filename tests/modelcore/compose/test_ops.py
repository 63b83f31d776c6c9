"""Exactness of the composition operations (no training needed: random tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modelcore.compose import merge
from modelcore.compose.ensemble import (
    ExpertEnsemble,
    cbtm_log_weights,
    log_mix,
    mix_scores,
    posterior_log_weights,
)
from modelcore.compose.mixture import insert_experts, mixture, remove_expert
from modelcore.config import ModelConfig
from modelcore.experts import add_modules, extract_expert, remove_modules
from modelcore.model import ModularLM


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=97, max_seq_len=32)
    return ModularLM(cfg)


def _expert(model, seed):
    g = torch.Generator().manual_seed(seed)
    idx = add_modules(model, generator=g)
    # Make the module matter: a larger row wins routing, larger weights change outputs.
    for i, j in enumerate(idx):
        ffn = model.ffn_layers[i]
        b = ffn.block_of(j)
        with torch.no_grad():
            ffn.router.rows[b].mul_(0).add_(torch.randn(ffn.router.rows[b].shape, generator=g))
            ffn.w_out[b].mul_(30)
            # a calibrated router bias (modelcore.lanes), different per expert and layer
            ffn.router.bias_of_block(b).fill_(float(torch.randn((), generator=g)))
    tensors = extract_expert(model, idx)
    remove_modules(model, idx)
    return tensors


def test_each_ensemble_path_is_the_base_with_that_expert_inserted():
    model = _model()
    experts = [_expert(model, s) for s in (1, 2, 3)]
    ids = torch.randint(0, 97, (2, 17))
    ens = ExpertEnsemble(model, experts)
    lane = ExpertEnsemble(model, experts, expert_bias=True)
    with torch.no_grad():
        h = ens.hidden(ids)
        h_lane = lane.hidden(ids)
        for j, e in enumerate(experts):
            # By default a path inserts the module without its (mixture) lane bias ...
            unbiased = {n: t.zero_() if n.endswith("router_bias") else t for n, t in
                        ((n, t.clone()) for n, t in e.items())}  # fmt: skip
            with mixture(model, [unbiased]):
                want = model(ids, aux="none").logits
            torch.testing.assert_close(model.lm_head(h[j]), want, rtol=1e-5, atol=1e-5)
            # ... and with expert_bias=True exactly as a mixture of that expert inserts it.
            with mixture(model, [e]):
                want = model(ids, aux="none").logits
            torch.testing.assert_close(model.lm_head(h_lane[j]), want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(model.lm_head(h[j]), want, atol=1e-4)
        # the paths really differ (the test would pass vacuously otherwise)
        assert (model.lm_head(h[0]) - model.lm_head(h[1])).abs().max() > 1e-3
        assert ens.n_paths == 4  # the base is a path by default, last
        torch.testing.assert_close(
            model.lm_head(h[3]), model(ids, aux="none").logits, rtol=1e-5, atol=1e-5
        )
        without = ExpertEnsemble(model, experts[:2], include_base=False)
        assert without.n_paths == 2
        with_base = ExpertEnsemble(model, experts[:2], include_base=True)
        h = with_base.hidden(ids)
        assert h.shape[0] == 3
        want = model(ids, aux="none").logits
        torch.testing.assert_close(model.lm_head(h[2]), want, rtol=1e-5, atol=1e-5)


def test_mixture_removal_restores_the_base_bit_for_bit():
    model = _model()
    experts = [_expert(model, s) for s in (1, 2)]
    ids = torch.randint(0, 97, (2, 11))
    before = model(ids, aux="none").logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    added = insert_experts(model, experts)
    assert model.n_modules == [10, 10]
    mixed = model(ids, aux="none").logits
    assert not torch.equal(mixed, before)
    remove_expert(model, added, 0)  # the first one out; the second's indices shift
    with mixture(model, []):
        pass
    only_second = model(ids, aux="none").logits
    remove_expert(model, added, 0)
    after = model(ids, aux="none").logits
    assert torch.equal(after, before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with mixture(model, [experts[1]]):
        assert torch.equal(model(ids, aux="none").logits, only_second)


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture(params=["native", "torch"])
def mix_backend(request, monkeypatch, native_cache):
    """log_mix on the CPU through the fused C kernel (modelcore.native) or torch ops."""
    from modelcore import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("AGORA_NATIVE_CACHE", str(native_cache))
    monkeypatch.setenv("AGORA_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and native.logmix() is None:
        pytest.skip("no C compiler here: the native kernel cannot be built")
    return request.param


def test_log_mix_equals_the_stacked_logsumexp(mix_backend):
    torch.manual_seed(0)
    logits = [torch.randn(37, 501) * 5 for _ in range(4)]
    log_w = torch.log_softmax(torch.randn(4, 37), dim=0)
    want = torch.logsumexp(
        torch.stack([torch.log_softmax(x, -1) for x in logits]) + log_w[:, :, None], dim=0
    )
    torch.testing.assert_close(log_mix(iter(logits), log_w), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        log_mix(iter(logits[:3]), log_w)


def _stacked_log_mix(logits, log_w):
    """The reference: float64, stacked, max-shifted; clamped like ``log_mix``."""
    lp = torch.stack([torch.log_softmax(x.double(), -1) for x in logits])
    mixed = torch.logsumexp(lp + log_w.double()[:, :, None], dim=0)
    return mixed.clamp_min(math.log(torch.finfo(torch.float32).tiny)).float()


@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 20])
def test_log_mix_blocks_threads_and_both_input_kinds_match_the_reference(
    monkeypatch, block_bytes, mix_backend
):
    from modelcore.compose import ensemble

    # tiny blocks: one row per block, many blocks over 2 threads; 3000 bytes: blocks of
    # 1 (4 paths) or 3 (1 path) rows of 251, the last one partial; 1 MiB: one block
    monkeypatch.setattr(ensemble, "_MIX_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(ensemble, "default_workers", lambda: 2)
    g = torch.Generator().manual_seed(0)
    N, V = 23, 251
    logits = [torch.randn(N, V, generator=g) * s for s in (1.0, 5.0, 9.0, 3.0)]
    logits[1][4] -= 1000.0  # a row far below 0: unshifted exps underflow, s < 1
    logits[2][7] += 500.0  # a row far above: unshifted exps overflow
    logits[3][11, :5] = float("-inf")  # masked entries
    log_w = torch.log_softmax(torch.randn(4, N, generator=g), dim=0)
    log_w[0, :3] = float("-inf")  # weight 0 for path 0 on the first rows
    want = _stacked_log_mix(logits, log_w)
    for got in (log_mix(logits, log_w), log_mix(iter(logits), log_w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # all at hand or one at a time: the same function of the inputs
    torch.testing.assert_close(log_mix(tuple(logits), log_w), log_mix(iter(logits), log_w))


def test_log_mix_writes_into_a_given_output_and_checks_it(mix_backend):
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(5, 17, generator=g) for _ in range(3)]
    log_w = torch.log_softmax(torch.randn(3, 5, generator=g), dim=0)
    out = torch.full((5, 17), float("nan"))
    assert log_mix(logits, log_w, out=out) is out
    torch.testing.assert_close(out, _stacked_log_mix(logits, log_w), rtol=1e-5, atol=1e-5)
    again = torch.full((5, 17), float("nan"))
    assert log_mix(iter(logits), log_w, out=again) is again
    torch.testing.assert_close(again, out)
    with pytest.raises(ValueError, match="out must be"):
        log_mix(logits, log_w, out=torch.empty(5, 16))
    with pytest.raises(ValueError, match="out must be"):
        log_mix(logits, log_w, out=torch.empty(17, 5).t())
    with pytest.raises(ValueError, match="expected 3"):
        log_mix(logits[:2], log_w)
    with pytest.raises(ValueError, match="more logit matrices"):
        log_mix(iter(logits + logits[:1]), log_w)
    with pytest.raises(ValueError, match="agree"):
        log_mix([logits[0], logits[1][:, :9], logits[2]], log_w)


def test_log_mix_of_one_path_is_its_log_softmax_and_identical_paths_change_nothing(mix_backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 33, generator=g) * 4
    want = torch.log_softmax(x, -1)
    torch.testing.assert_close(log_mix([x], torch.zeros(1, 9)), want, rtol=1e-6, atol=1e-6)
    log_w = torch.log_softmax(torch.randn(3, 9, generator=g), dim=0)
    torch.testing.assert_close(log_mix([x, x, x], log_w), want, rtol=1e-6, atol=1e-6)
    # the paths' order (with their weights) does not matter beyond rounding
    perm = [2, 0, 1]
    y = [x, x * 2, -x]
    torch.testing.assert_close(
        log_mix([y[i] for i in perm], log_w[perm]), log_mix(y, log_w), rtol=1e-6, atol=1e-6
    )


def test_run_blocks_runs_every_block_once_and_reraises():
    from modelcore.threads import run_blocks

    seen = []
    states = []

    def make():
        states.append(object())
        return states[-1]

    run_blocks(37, lambda i, st: seen.append((i, st)), make, 3)
    assert sorted(i for i, _ in seen) == list(range(37))
    assert 1 <= len(states) <= 3
    assert {st for _, st in seen} <= set(states)
    run_blocks(0, lambda i, st: seen.append(i), make, 2)  # nothing to do is fine

    def boom(i, _st):
        if i == 5:
            raise RuntimeError("block 5")

    with pytest.raises(RuntimeError, match="block 5"):
        run_blocks(20, boom, lambda: None, 2)


def test_posterior_follows_the_likelihood_and_starts_at_the_prior():
    ll = torch.tensor([[[-1.0, -1.0, -1.0]], [[-3.0, -3.0, -3.0]]])  # (P=2, B=1, T=3)
    prior = torch.log(torch.tensor([0.25, 0.75]))
    w = posterior_log_weights(ll, prior).exp()
    torch.testing.assert_close(w[:, 0, 0], torch.tensor([0.25, 0.75]))
    # after t targets the odds move by e^(2t)
    for t in range(3):
        odds = 0.25 / 0.75 * math.exp(2 * t)
        assert float(w[0, 0, t]) == pytest.approx(odds / (1 + odds), rel=1e-5)
    score = mix_scores(ll, posterior_log_weights(ll, prior))
    assert float(score[0, 0]) == pytest.approx(math.log(0.25 * math.e**-1 + 0.75 * math.e**-3))


def test_cbtm_weights_are_a_softmax_over_the_nearest_k():
    d = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    w = cbtm_log_weights(d, temperature=2.0, top_k=2).exp()
    e = torch.exp(-torch.tensor([1.0, 0.25]) / 2.0)
    torch.testing.assert_close(w[0], torch.tensor([e[0], 0, 0, e[1]]) / e.sum())
    with pytest.raises(ValueError):
        cbtm_log_weights(d, temperature=0.0)


def _random_expert(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) * 0.02 for n, s in shapes.items()}


SHAPES = {"layers.0.modules.0.w_in": (64, 48), "layers.0.modules.0.router_row": (32,)}


@pytest.mark.parametrize("method", ["uniform", "weighted", "ties"])
def test_averaging_identical_experts_returns_that_expert(method):
    e = _random_expert(0, SHAPES)
    params = {"density": 1.0} if method == "ties" else {}
    weights = [0.2, 0.5, 0.3] if method != "uniform" else None
    out = merge.merge_tensors([e, e, e], method, weights=weights, **params)
    assert all(torch.equal(out[n], e[n]) for n in e)


@pytest.mark.parametrize("method", ["uniform", "weighted", "ties"])
def test_averaging_is_permutation_invariant(method):
    es = [_random_expert(s, SHAPES) for s in range(5)]
    w = [0.1, 0.4, 0.2, 0.2, 0.1]
    perm = [3, 0, 4, 1, 2]
    if method == "uniform":
        a = merge.merge_tensors(es, method)
        b = merge.merge_tensors([es[i] for i in perm], method)
    else:
        a = merge.merge_tensors(es, method, weights=w)
        b = merge.merge_tensors([es[i] for i in perm], method, weights=[w[i] for i in perm])
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_ties_trims_elects_sign_and_takes_a_disjoint_mean():
    a = torch.tensor([4.0, 1.0, -2.0, 0.1])
    b = torch.tensor([2.0, -3.0, -2.5, 0.2])
    c = torch.tensor([-1.0, -0.5, 6.0, 0.3])
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    out = merge.METHODS["ties"]([a, b, c], w, None, density=0.5)
    # trimmed to the top 2 by magnitude: a=[4,0,-2,0], b=[0,-3,-2.5,0], c=[-1,0,6,0];
    # elected signs (of the sums 3, -3, 1.5, 0): +, -, +, none; disjoint means of the
    # agreeing values: 4 (c's -1 disagrees), -3, 6 (a's and b's negatives disagree), 0.
    torch.testing.assert_close(out, torch.tensor([4.0, -3.0, 6.0, 0.0], dtype=torch.float64))
    ref = torch.tensor([1.0, 1.0, 1.0, 1.0])
    shifted = merge.METHODS["ties"]([a + ref, b + ref, c + ref], w, ref, density=0.5)
    torch.testing.assert_close(shifted, out + 1)
    assert merge.TIES.paper.startswith("Yadav")
    assert set(merge.METHODS) >= {"uniform", "weighted", "ties"}


def test_merged_file_streams_validates_and_matches_the_in_memory_merge(tmp_path):
    from modelcore.artifacts import config_document
    from modelcore.experts import load_expert, save_expert
    from registry.validation import validate_expert

    model = _model()
    experts = [_expert(model, s) for s in (1, 2, 3)]
    rev = "ab" * 32
    paths = []
    for i, e in enumerate(experts):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_expert(paths[-1], e, base_revision=rev)
    schema = config_document(model.config)["expert_schema"]
    for method, weights in (("uniform", None), ("weighted", [1, 2, 3]), ("ties", None)):
        out = tmp_path / f"{method}.safetensors"
        meta = merge.merge_files(paths, out, method, weights=weights)
        info = validate_expert(out, expert_schema=schema, base_revision=rev)
        assert info.dtype == "float32"
        assert json.loads(meta["merge"])["method"] == method
        got, _ = load_expert(out, config=model.config)
        want = merge.merge_tensors(experts, method, weights=weights)
        assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(ValueError, match="weights"):
        merge.merge_files(paths, tmp_path / "bad.safetensors", "weighted", weights=[1, -1, 1])
    assert not (tmp_path / "bad.safetensors").exists()
    save_expert(tmp_path / "other.safetensors", experts[0], base_revision="cd" * 32)
    with pytest.raises(ValueError, match="another base"):
        merge.merge_files([paths[0], tmp_path / "other.safetensors"], tmp_path / "x.safetensors")


ODD_SHAPES = {
    "layers.0.modules.0.w_in": (37, 13),
    "layers.0.modules.0.w_out": (13, 37),
    "layers.0.modules.0.router_row": (5,),
    "layers.1.modules.0.w_in": (1, 7),
}


@pytest.mark.parametrize(
    ("dtype", "mapped"), [("float32", True), ("bfloat16", True), ("float32", False)]
)
def test_streamed_merge_in_small_blocks_on_threads_equals_the_in_memory_merge(
    tmp_path, monkeypatch, dtype, mapped
):
    from modelcore.experts import load_expert, save_expert

    def load_expert_tensors(path):
        return load_expert(path)[0]

    # 52-byte blocks: rows of 13 float32 split 1 per block for (37, 13), 7 elements per
    # block for the (5,) vector (a partial last block), one row for (1, 7); 2 threads
    monkeypatch.setattr(merge, "_BLOCK_BYTES", 52)
    monkeypatch.setattr(merge, "default_workers", lambda: 2)
    monkeypatch.setattr(merge, "_MAPPED", mapped)  # file mappings, or pread into buffers
    rev = "ab" * 32
    experts = [_random_expert(s, ODD_SHAPES) for s in range(4)]
    paths = []
    for i, e in enumerate(experts):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_expert(paths[-1], e, base_revision=rev, dtype=dtype)
    stored = [load_expert_tensors(p) for p in paths]
    cases = [
        ("uniform", None),
        ("weighted", [0.0, 2.0, 0.0, 1.0]),  # zeros are skipped, exactly
        ("weighted", [0.0, 0.0, 5.0, 0.0]),  # one nonzero weight: that expert, bit for bit
        ("ties", None),
    ]
    for method, weights in cases:
        out = tmp_path / "merged.safetensors"
        merge.merge_files(paths, out, method, weights=weights)
        got = load_expert_tensors(out)
        want = merge.merge_tensors(stored, method, weights=weights)
        assert sorted(got) == sorted(want)
        assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)
        if weights == [0.0, 0.0, 5.0, 0.0]:
            assert all(torch.equal(got[n], stored[2][n]) for n in got)
    # identical inputs give that expert back, exactly, streamed too
    for method in ("uniform", "weighted"):
        weights = None if method == "uniform" else [3.0, 1.0, 2.0]
        out = tmp_path / "same.safetensors"
        merge.merge_files([paths[1]] * 3, out, method, weights=weights)
        got = load_expert_tensors(out)
        assert all(torch.equal(got[n], stored[1][n]) for n in got)
    # permuting the files (with their weights) gives the same bytes
    w = [0.1, 0.4, 0.2, 0.3]
    perm = [2, 0, 3, 1]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge.merge_files(paths, a, "weighted", weights=w)
    merge.merge_files([paths[i] for i in perm], b, "weighted", weights=[w[i] for i in perm])
    ta, tb = load_expert_tensors(a), load_expert_tensors(b)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_streamed_merge_refuses_a_truncated_input_and_leaves_nothing(tmp_path):
    from modelcore.experts import save_expert

    rev = "ab" * 32
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_expert(paths[-1], _random_expert(i, ODD_SHAPES), base_revision=rev)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated"):
        merge.merge_files(paths, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m")] == []


def test_distillation_resumed_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    from modelcore.compose.distill import DistillSettings, distill

    model = _model()
    # Without the base path: a teacher half made of the base starts the fresh student
    # almost at its distribution (KL 0.003), and this test is about resuming.
    teacher = ExpertEnsemble(model, [_expert(model, s) for s in (1, 2)], include_base=False)
    prior = torch.log(torch.tensor([0.5, 0.5]))

    def make():
        g = torch.Generator().manual_seed(7)
        while True:
            yield torch.randint(0, 97, (2, 17), generator=g)

    for student in ("expert", "dense"):
        settings = DistillSettings(student=student, steps=5, lr=1e-2, checkpoint_every=2)
        straight = distill(model, teacher, make, prior, settings)

        class Crash(Exception):
            pass

        def crash_at_3(step, _kl):
            if step == 3:
                raise Crash

        ckpt = tmp_path / student
        with pytest.raises(Crash):
            distill(model, teacher, make, prior, settings, checkpoint_dir=ckpt, on_step=crash_at_3)
        assert json.loads((ckpt / "state.json").read_text())["step"] == 2
        resumed = distill(model, teacher, make, prior, settings, resume=ckpt)
        assert resumed.resumed_from == 2
        assert resumed.kl == straight.kl
        assert len(resumed.kl) == 5
        assert resumed.kl[-1] < resumed.kl[0]
        a = dict(straight.student.named_parameters())
        b = dict(resumed.student.named_parameters())
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert model.n_modules == [8, 8]  # the base itself is untouched
