"""The empirical claims, at tiny scale on the real corpus, for each of three seeds.

Same code and settings as ``python -m modelcore.train.report`` (docs/training.md shows
its numbers). Each test asserts a direction with a margin (``experiments.MIN_*`` /
``MAX_*``) measured to hold with room on every seed; none asserts a time.
"""

from __future__ import annotations

import pytest

from modelcore.train import experiments as ex

from .conftest import SEEDS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", SEEDS)
def test_inserted_expert_lowers_its_domains_bits_per_byte(seed, insertion_results):
    result = insertion_results(seed)
    assert result.domain_gain >= ex.MIN_EXPERT_GAIN, (result.base, result.expert)


@pytest.mark.parametrize("seed", SEEDS)
def test_regularized_expert_forgets_less_than_finetuning_the_whole_base(seed, insertion_results):
    result = insertion_results(seed)
    # Full finetuning on D does help D (it is a real baseline, not a broken one) ...
    assert result.full[result.domain] < result.base[result.domain]
    # ... but the other domains pay for it far more than with an inserted expert.
    gap = result.other_rise_full - result.other_rise_reg
    assert gap >= ex.MIN_FORGETTING_GAP, (result.other_rise_full, result.other_rise_reg)


@pytest.mark.parametrize("seed", SEEDS)
def test_mi_loss_spreads_module_usage_more_than_no_aux_loss(seed, setup, prep, bases):
    with_mi = ex.usage_entropy_of(setup, prep, bases.load(seed, "mi"))
    without = ex.usage_entropy_of(setup, prep, bases.load(seed, "none"))
    assert with_mi - without >= ex.MIN_ENTROPY_GAP, (with_mi, without)


@pytest.mark.parametrize("seed", SEEDS)
def test_pruning_after_concentration_keeps_bits_per_byte(seed, prune_results):
    result = prune_results(seed)
    assert result.kept_fraction <= ex.MAX_KEPT_FRACTION
    assert result.rise <= ex.MAX_PRUNE_RISE, (result.concentrated, result.pruned)
    # Concentration never makes pruning costlier than on the base ...
    assert result.base_rise - result.rise >= 0.0, (result.base_rise, result.rise)


def test_concentration_is_what_makes_pruning_cheap_on_average(prune_results):
    # ... and over the seeds it is what makes it cheap (a base that already prunes cheaply
    # leaves it little to save, so the floor is on the mean).
    benefits = [prune_results(s).base_rise - prune_results(s).rise for s in SEEDS]
    assert sum(benefits) / len(benefits) >= ex.MIN_CONCENTRATION_BENEFIT, benefits
