"""The composition claims on the real corpus, per seed (tiny scale; margins in docs)."""

from __future__ import annotations

import pytest

from modelcore.compose import experiments as cx
from modelcore.compose.distill import DistillSettings, distill
from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
from modelcore.compose.evaluate import evaluate_composition, posterior_by_position
from modelcore.eval import evaluate

from .conftest import SEEDS

# Tokens of prefix after which the posterior (uniform prior) holds >= 0.8 on the text's
# own expert in the median window of the domain's held-out text. Seeds 0-2 (report
# script): the median window is at >= 0.99 by 16 tokens; the mean over windows is lower
# (0.87-0.97 at 32 tokens): a few licenses windows are code-like.
POSTERIOR_TOKENS = 32
ALL = (*cx.EXPERT_DOMAINS, *cx.BASE_DOMAINS)


def _texts(prep):
    texts = {d: prep.heldout[d] for d in ALL}
    texts["mixed"] = cx.mixed_heldout(prep, cx.EXPERT_DOMAINS)
    return texts


def _eval(setup, prep, run, key, experts, method, only=None, **extra):
    if key not in run.cache:
        kw = {"seq_len": setup.eval_seq_len, "batch_size": 32, **extra}
        texts = _texts(prep) if only is None else {only: _texts(prep)[only]}
        if experts:
            res = evaluate_composition(run.base, prep.tokenizer, texts, experts, method, **kw)
        else:
            res = evaluate(run.base, prep.tokenizer, texts, seq_len=kw["seq_len"], batch_size=32)
        run.cache[key] = cx.bpb(res)
    return run.cache[key]


@pytest.mark.parametrize("seed", SEEDS)
def test_posterior_ensemble_beats_each_expert_and_base_on_mixed_text(setup, prep, runs, seed):
    run = runs(seed)
    base = _eval(setup, prep, run, "base", [], "mixture")["mixed"]
    singles = {
        d: _eval(setup, prep, run, d, [e], "mixture", only="mixed")["mixed"]
        for d, e in run.experts.items()
    }
    ens = _eval(setup, prep, run, "ensemble", list(run.experts.values()), "ensemble")["mixed"]
    assert ens < min(singles.values()) - 0.02, (ens, singles)
    assert ens < base - 0.1, (ens, base)


@pytest.mark.parametrize("seed", SEEDS)
def test_posterior_finds_the_texts_expert_within_a_few_tokens(setup, prep, runs, seed):
    run = runs(seed)
    ens = ExpertEnsemble(run.base, list(run.experts.values()))
    for j, domain in enumerate(run.experts):
        trace = posterior_by_position(
            ens, prep.tokenizer, prep.heldout[domain], seq_len=128, reduce="median"
        )
        # uniform prior over the two experts and the base path, no evidence yet
        assert float(trace[j, 0]) == pytest.approx(1 / ens.n_paths)
        assert float(trace[j, POSTERIOR_TOKENS:].min()) >= 0.8, (domain, trace[j, ::8].tolist())


@pytest.mark.parametrize("seed", SEEDS)
def test_removing_an_expert_forgets_its_domain_only(setup, prep, runs, seed):
    # The composition: the posterior ensemble of the base alone and both experts (so text
    # no expert covers falls back on the base, not on the least bad expert).
    run = runs(seed)
    base = _eval(setup, prep, run, "base", [], "mixture")
    experts = list(run.experts.values())
    full = _eval(setup, prep, run, "ensemble", experts, "ensemble")  # the base: a path
    forgotten = "licenses"
    rest = [e for d, e in run.experts.items() if d != forgotten]
    without = _eval(setup, prep, run, "ensemble-without", rest, "ensemble")
    assert full[forgotten] < base[forgotten] * 0.95  # the expert mattered
    assert abs(without[forgotten] - base[forgotten]) <= 0.05 * base[forgotten]
    for domain in ALL:
        if domain != forgotten:
            assert abs(without[domain] - full[domain]) < 0.01 * full[domain], domain


# Held on every seed before the do-no-harm defaults (86-91%); with them: 79%, 85%, 24%
# (docs/composition.md, "Measured in DEMix's setting"). On the corpus of the 2026-09
# machine image (its /usr/include changed the c_headers domain the base trains on;
# tests/modelcore/compose/test_harm.py) and with the CPU's blockwise stick-breaking kernel
# (2026-12-04: every trajectory moved as with another seed) seeds 0 and 1 hold; on seed 2
# the distillation's KL to the ensemble falls from 0.133 to 0.078, not by half. Kept as
# the claim, and expected to fail where it does, strictly: the day it holds again the mark
# must go.
_DISTILL_MISSES = "seed 2: the student's KL to the ensemble falls 0.133 -> 0.078, not by half"
DISTILL_SEEDS = [
    pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=_DISTILL_MISSES)) if s == 2 else s
    for s in SEEDS
]


@pytest.mark.parametrize("seed", DISTILL_SEEDS)
def test_distilled_expert_recovers_most_of_the_ensembles_gain(setup, prep, runs, seed):
    run = runs(seed)
    domain = "licenses"
    ens = ExpertEnsemble(run.base, list(run.experts.values()))

    def make():
        return cx.batches(setup, prep, prep.corpus.domains[domain].train, seed + 5000)

    prior = estimate_prior(ens, make(), n_sequences=16)
    result = distill(
        run.base,
        ens,
        make,
        prior,
        DistillSettings(steps=setup.distill_steps, lr=setup.distill_lr, seed=seed),
    )
    assert result.kl[-1] < result.kl[0] / 2
    student = result.expert_tensors()
    kw = {"seq_len": setup.eval_seq_len, "batch_size": 32}
    texts = {domain: prep.heldout[domain]}
    got = cx.bpb(evaluate_composition(run.base, prep.tokenizer, texts, [student], **kw))[domain]
    base = _eval(setup, prep, run, "base", [], "mixture")[domain]
    assert got < base  # what holds on every seed: the student is better than the base
    ensemble = _eval(setup, prep, run, "ensemble", list(run.experts.values()), "ensemble")[domain]
    assert base - got >= 0.8 * (base - ensemble), (base, ensemble, got)
