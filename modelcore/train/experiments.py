"""The empirical claims of modelcore, as functions: tests assert them, the report prints
them (``python -m modelcore.train.report``), both from the same code and settings.

At ``tiny`` scale on the real corpus (``modelcore.data.build_corpus``), per seed:

1. insertion: an expert inserted into the frozen base and trained on domain D lowers D's
   held-out bits per byte below the base's;
2. forgetting: with routing regularization, the other domains' bits per byte rise less
   than when the whole base is finetuned on D for the same steps (ModuleFormer 5.2).
   Measured here: the regularised expert barely moves the other domains, but it also
   gains less on D than the unregularised one (Adam rescales the small regularization
   gradient of a router row that the LM loss hardly pulls on into a full-size step);
   both experts are reported, and claim 1 is asserted on the unregularised one;
3. load balancing: pretraining with the MI loss gives a higher marginal entropy of
   module usage than pretraining without an aux loss;
4. pruning: after load-concentration finetuning on D, keeping at most 60% of the FFN
   modules (by activation frequency) costs little bits per byte on D.

One base is pretrained per seed and shared by 1, 2 and 4; every experiment starts from a
copy of it, so they do not influence each other.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from modelcore.config import ModelConfig
from modelcore.data.corpus import Corpus
from modelcore.eval import evaluate, module_usage, usage_entropy
from modelcore.model import ModularLM
from modelcore.train import recipes
from modelcore.train.finetune import finetune_concentration, finetune_full
from modelcore.train.insertion import train_expert
from modelcore.train.pretrain import pretrain


@dataclass(frozen=True)
class Setup:
    """Everything an experiment run depends on besides its seed."""

    preset: str = "tiny"
    vocab_size: int = 1024
    max_bytes_per_domain: int = 96 * 1024
    heldout_fraction: float = 0.2
    seq_len: int = 128
    batch_size: int = 8
    base_steps: int = 250
    base_lr: float = 3e-3
    aux_weight: float = 1.0
    domain: str = "python_docs"
    expert_steps: int = 100
    expert_lr: float = 1e-2
    routing_reg: float = 0.01
    finetune_lr: float = 1e-3
    # 120 steps at weight 1.0 (was 60 at 0.5): at 60 / 0.5 the pruning claim held on the
    # corpus it was tuned on and failed on two seeds when one license file changed in the
    # installed packages (docs/training.md, "Robustness")
    concentration_steps: int = 120
    concentration_lr: float = 1e-3
    concentration_weight: float = 1.0
    prune_keep: float = 0.6
    eval_batch_size: int = 32

    def config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset).replace(vocab_size=self.vocab_size)


@dataclass
class Prepared:
    corpus: Corpus
    tokenizer: object
    heldout: dict[str, list[str]] = field(default_factory=dict)


def prepare(setup: Setup, *, cache_dir: Path | None = None) -> Prepared:
    """The corpus, its tokenizer (seed 0 for every run: it is not what is studied) and the
    held-out texts by domain."""
    corpus = recipes.load_corpus(
        setup.max_bytes_per_domain,
        heldout_fraction=setup.heldout_fraction,
        seed=0,
        cache_dir=cache_dir,
    )
    if setup.domain not in corpus.domains:
        raise ValueError(f"domain {setup.domain!r} is not in the corpus {sorted(corpus.domains)}")
    tokenizer = recipes.corpus_tokenizer(corpus, setup.vocab_size, seed=0)
    return Prepared(corpus, tokenizer, recipes.heldout_by_domain(corpus))


def _batches(setup: Setup, prep: Prepared, texts: list[str], seed: int):
    return recipes.batches(
        prep.tokenizer, texts, seq_len=setup.seq_len, batch_size=setup.batch_size, seed=seed
    )


def train_base(setup: Setup, prep: Prepared, seed: int, *, aux: str = "mi") -> ModularLM:
    """Pretrain a base on every domain's training text."""
    model = recipes.new_base(setup.config(), prep.tokenizer, seed=seed)
    texts, _ = prep.corpus.texts("train")
    pretrain(
        model,
        _batches(setup, prep, texts, seed),
        setup.base_steps,
        setup.base_lr,
        aux=aux,
        aux_weight=setup.aux_weight if aux != "none" else 0.0,
        seed=seed,
        progress=False,
    )
    return model


def bpb(setup: Setup, prep: Prepared, model: nn.Module) -> dict[str, float]:
    results = evaluate(model, prep.tokenizer, prep.heldout, batch_size=setup.eval_batch_size)
    return {name: r["bits_per_byte"] for name, r in results.items()}


def _mean_other(values: dict[str, float], reference: dict[str, float], domain: str) -> float:
    others = [name for name in values if name != domain]
    return sum(values[n] - reference[n] for n in others) / len(others)


@dataclass
class InsertionResult:
    domain: str
    base: dict[str, float]  # held-out bits per byte per domain
    expert: dict[str, float]  # base + the expert trained on `domain`, no routing reg
    expert_reg: dict[str, float]  # ... trained with routing regularization
    full: dict[str, float]  # the whole base finetuned on `domain`, same steps

    @property
    def domain_gain(self) -> float:
        """How much the (unregularised) expert lowers its own domain's bits per byte."""
        return self.base[self.domain] - self.expert[self.domain]

    @property
    def domain_gain_reg(self) -> float:
        return self.base[self.domain] - self.expert_reg[self.domain]

    @property
    def domain_gain_full(self) -> float:
        return self.base[self.domain] - self.full[self.domain]

    @property
    def other_rise_expert(self) -> float:
        return _mean_other(self.expert, self.base, self.domain)

    @property
    def other_rise_reg(self) -> float:
        return _mean_other(self.expert_reg, self.base, self.domain)

    @property
    def other_rise_full(self) -> float:
        return _mean_other(self.full, self.base, self.domain)


def insertion_vs_full(
    setup: Setup,
    prep: Prepared,
    base: ModularLM,
    seed: int,
    *,
    base_bpb: dict[str, float] | None = None,
) -> InsertionResult:
    """Experiments 1 and 2: inserted experts (without and with routing regularization)
    vs finetuning the whole base on D for the same steps on the same batches."""
    domain_texts = prep.corpus.domains[setup.domain].train
    base_bpb = base_bpb or bpb(setup, prep, base)

    def expert_run(reg: float) -> dict[str, float]:
        model = copy.deepcopy(base)
        train_expert(
            model,
            _batches(setup, prep, domain_texts, seed + 1000),
            setup.expert_steps,
            setup.expert_lr,
            routing_reg=reg,
            seed=seed,
            progress=False,
        )
        return bpb(setup, prep, model)

    expert = expert_run(0.0)
    expert_reg = expert_run(setup.routing_reg)
    full_model = copy.deepcopy(base)
    finetune_full(
        full_model,
        _batches(setup, prep, domain_texts, seed + 1000),
        setup.expert_steps,
        setup.finetune_lr,
        aux_weight=setup.aux_weight,
        seed=seed,
        progress=False,
    )
    full = bpb(setup, prep, full_model)
    return InsertionResult(setup.domain, base_bpb, expert, expert_reg, full)


def usage_entropy_of(setup: Setup, prep: Prepared, model: ModularLM) -> float:
    """Normalised entropy of top-k module usage over all held-out text (1 = uniform)."""
    texts = [t for texts in prep.heldout.values() for t in texts]
    return usage_entropy(module_usage(model, prep.tokenizer, texts, batch_size=32))


@dataclass
class PruneResult:
    domain: str
    kept_fraction: float  # FFN modules left active after pruning, over all layers
    concentrated: float  # D's bits per byte after concentration finetuning, unpruned
    pruned: float  # ... and after pruning
    base: float  # the base's, unpruned
    base_pruned: float  # the base pruned to the same fraction without concentration

    @property
    def rise(self) -> float:
        return self.pruned - self.concentrated

    @property
    def base_rise(self) -> float:
        return self.base_pruned - self.base


def kept_fraction(model: ModularLM) -> float:
    masks = model.active_modules
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def prune_to(model: ModularLM, batches, keep: float, n_batches: int) -> float:
    from modelcore import prune as prune_ops

    freq = prune_ops.activation_frequency(model, batches, max_batches=n_batches)
    report = prune_ops.prune(model, freq, prune_ops.threshold_for_fraction(freq, keep))
    return report.kept_fraction


def concentrate_and_prune(
    setup: Setup,
    prep: Prepared,
    base: ModularLM,
    seed: int,
    *,
    base_bpb: dict[str, float] | None = None,
    n_freq_batches: int = 8,
) -> PruneResult:
    """Experiment 4: load-concentration finetuning on D, then prune to ``prune_keep``."""
    domain_texts = prep.corpus.domains[setup.domain].train
    d_heldout = {setup.domain: prep.heldout[setup.domain]}
    base_bpb = base_bpb or bpb(setup, prep, base)

    model = copy.deepcopy(base)
    finetune_concentration(
        model,
        _batches(setup, prep, domain_texts, seed + 2000),
        setup.concentration_steps,
        setup.concentration_lr,
        weight=setup.concentration_weight,
        seed=seed,
        progress=False,
    )
    concentrated = _bpb_on(setup, prep, model, d_heldout)
    kept = prune_to(
        model, _batches(setup, prep, domain_texts, seed + 3000), setup.prune_keep, n_freq_batches
    )
    pruned = _bpb_on(setup, prep, model, d_heldout)

    plain = copy.deepcopy(base)
    prune_to(
        plain, _batches(setup, prep, domain_texts, seed + 3000), setup.prune_keep, n_freq_batches
    )
    base_pruned = _bpb_on(setup, prep, plain, d_heldout)
    return PruneResult(
        setup.domain, kept, concentrated, pruned, base_bpb[setup.domain], base_pruned
    )


def _bpb_on(setup: Setup, prep: Prepared, model: nn.Module, texts: dict[str, list[str]]) -> float:
    results = evaluate(model, prep.tokenizer, texts, batch_size=setup.eval_batch_size)
    (only,) = results.values()
    return float(only["bits_per_byte"])


@dataclass
class SeedReport:
    seed: int
    insertion: InsertionResult
    entropy_mi: float
    entropy_none: float
    prune: PruneResult

    def to_dict(self) -> dict:
        return asdict(self)


def run_seed(setup: Setup, prep: Prepared, seed: int) -> SeedReport:
    base = train_base(setup, prep, seed, aux="mi")
    base_bpb = bpb(setup, prep, base)
    insertion = insertion_vs_full(setup, prep, base, seed, base_bpb=base_bpb)
    entropy_mi = usage_entropy_of(setup, prep, base)
    entropy_none = usage_entropy_of(setup, prep, train_base(setup, prep, seed, aux="none"))
    prune = concentrate_and_prune(setup, prep, base, seed, base_bpb=base_bpb)
    return SeedReport(seed, insertion, entropy_mi, entropy_none, prune)


# The margins the tests assert for every seed (and the report prints next to the numbers).
MIN_EXPERT_GAIN = 0.015  # bits/byte the expert takes off its own domain
MIN_FORGETTING_GAP = 0.05  # other domains' mean rise: full finetuning minus the reg. expert's
MIN_ENTROPY_GAP = 0.05  # normalised usage entropy: MI loss minus no aux loss
MAX_KEPT_FRACTION = 0.6  # FFN modules left after pruning
MAX_PRUNE_RISE = 0.04  # bits/byte on D: pruned minus unpruned (both concentrated)
# pruning's cost on the base minus after concentration: never negative on any seed, and at
# least this much in the mean over seeds (on a base that already prunes cheaply there is
# little for concentration to save, so no per-seed floor above 0 held across corpora)
MIN_CONCENTRATION_BENEFIT = 0.01
