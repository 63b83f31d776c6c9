"""The empirical claims of composition, as functions the tests assert and docs report.

At ``tiny`` scale on the real corpus, per seed: a base pretrained on three domains
(``BASE_DOMAINS``), and one expert per new domain (``EXPERT_DOMAINS``, DEMix's setting:
experts bring domains the base has seen little of) trained by insertion.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from modelcore.train import experiments as ex
from modelcore.train import recipes
from modelcore.train.insertion import train_expert
from modelcore.train.pretrain import pretrain

BASE_DOMAINS = ("python_stdlib", "python_tests", "c_headers")
EXPERT_DOMAINS = ("licenses", "python_docs")


def _inner_setup() -> ex.Setup:
    # Every field pinned here: the shared Setup's defaults serve the training experiments
    # and move with them (its MI weight went from 0.1 to 1.0), and these claims were
    # measured with these values.
    return ex.Setup(
        preset="tiny",
        vocab_size=1024,
        max_bytes_per_domain=96 * 1024,
        heldout_fraction=0.2,
        seq_len=128,
        batch_size=8,
        base_lr=3e-3,
        aux_weight=0.1,
        domain="licenses",
        eval_batch_size=32,
    )


@dataclass(frozen=True)
class ComposeSetup:
    inner: ex.Setup = field(default_factory=_inner_setup)
    base_steps: int = 200
    expert_steps: int = 100
    expert_lr: float = 1e-2
    routing_reg: float = 0.01
    distill_steps: int = 100
    distill_lr: float = 1e-2
    eval_seq_len: int = 128


def batches(
    setup: ComposeSetup, prep: ex.Prepared, texts: Sequence[str], seed: int
) -> Iterator[torch.Tensor]:
    s = setup.inner
    return recipes.batches(
        prep.tokenizer, list(texts), seq_len=s.seq_len, batch_size=s.batch_size, seed=seed
    )


def train_base(setup: ComposeSetup, prep: ex.Prepared, seed: int):
    model = recipes.new_base(setup.inner.config(), prep.tokenizer, seed=seed)
    texts = [t for d in BASE_DOMAINS for t in prep.corpus.domains[d].train]
    pretrain(
        model,
        batches(setup, prep, texts, seed),
        setup.base_steps,
        setup.inner.base_lr,
        aux="mi",
        aux_weight=setup.inner.aux_weight,
        seed=seed,
        progress=False,
    )
    return model


def train_domain_expert(
    setup: ComposeSetup, prep: ex.Prepared, base, domain: str, seed: int
) -> dict[str, torch.Tensor]:
    """The CLI's expert defaults (routing regularization, general replay, the router bias
    calibrated on general text: the base's three domains), at this setup's steps and lr."""
    model = copy.deepcopy(base)
    s = setup.inner
    opts = recipes.expert_options(
        prep.tokenizer,
        prep.corpus,
        domain,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        seed=seed,
        routing_reg=setup.routing_reg,
        general=[t for d in BASE_DOMAINS for t in prep.corpus.domains[d].train],
    )
    trained = train_expert(
        model,
        batches(setup, prep, prep.corpus.domains[domain].train, seed + 1000),
        setup.expert_steps,
        setup.expert_lr,
        seed=seed,
        progress=False,
        **opts,
    )
    return trained.tensors


def mixed_heldout(prep: ex.Prepared, domains: Sequence[str]) -> list[str]:
    """Held-out passages of ``domains`` interleaved one by one (text mixing the domains)."""
    lists = [list(prep.heldout[d]) for d in domains]
    out: list[str] = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def bpb(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {d: float(r["bits_per_byte"]) for d, r in results.items()}
