"""End-to-end recipes shared by the CLI, the report script and the tests: build the
corpus, train its tokenizer, make batches, create / pretrain a base, train an expert.

Everything here is deterministic given its seed, so a base built twice with the same
arguments has the same revision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcore.config import ModelConfig
from modelcore.data.corpus import Corpus, build_corpus
from modelcore.data.tokenizer import train_tokenizer
from modelcore.model import ModularLM

# Bytes per domain the CLI's corpus takes by default: 256 KiB x 5 domains is enough text
# for `small` to improve for a few thousand steps and builds in seconds.
DEFAULT_MAX_BYTES_PER_DOMAIN = 256 * 1024
# Tokenizer training text is capped: BPE counts on 1 MiB are as good as on 10 MiB for a
# 4096-token vocabulary, and training takes a second instead of ten.
TOKENIZER_MAX_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """Where the built corpus is cached (``$XDG_CACHE_HOME/agora`` or ``~/.cache/agora``).

    Read here, in the recipes the CLI calls, never inside the model code."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agora"


def load_corpus(
    max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES_PER_DOMAIN,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    domains: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> Corpus:
    return build_corpus(
        max_bytes_per_domain=max_bytes_per_domain,
        heldout_fraction=heldout_fraction,
        seed=seed,
        domains=domains,
        cache_dir=cache_dir,
    )


def corpus_tokenizer(corpus: Corpus, vocab_size: int, *, seed: int = 0):
    """A byte-level BPE tokenizer trained on every domain's training text."""
    texts, _ = corpus.texts("train")
    return train_tokenizer(texts, vocab_size=vocab_size, seed=seed, max_bytes=TOKENIZER_MAX_BYTES)


def batches(
    tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Endless (B, T+1) batches of token ids sampled from ``texts``."""
    from modelcore.data.batches import token_batches

    if not texts:
        raise ValueError("no training text")
    return token_batches(tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, seed=seed)


def new_base(config: ModelConfig, tokenizer, *, seed: int, device=None) -> ModularLM:
    """An untrained model whose vocabulary is exactly the tokenizer's."""
    config = config.replace(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    torch.manual_seed(seed)
    return ModularLM(config, device=device)


@dataclass(frozen=True)
class TrainSettings:
    """Step counts and rates of one preset (the CLI's defaults)."""

    steps: int
    lr: float
    batch_size: int
    seq_len: int
    expert_steps: int
    expert_lr: float


PRESET_SETTINGS = {
    "tiny": TrainSettings(
        steps=250, lr=3e-3, batch_size=8, seq_len=128, expert_steps=100, expert_lr=1e-2
    ),
    # One small step (B=8, T=256) costs ~1.5 CPU seconds here (1 thread), so the
    # defaults keep `agora base train --preset small` to minutes, not hours.
    "small": TrainSettings(
        steps=300, lr=2e-3, batch_size=8, seq_len=256, expert_steps=100, expert_lr=1e-2
    ),
    "molm_4b_k2": TrainSettings(
        steps=10000, lr=3e-4, batch_size=32, seq_len=1024, expert_steps=2000, expert_lr=3e-4
    ),
}


def settings_for(config: ModelConfig) -> TrainSettings:
    found = PRESET_SETTINGS.get(config.name)
    if found is not None:
        return found
    return PRESET_SETTINGS["small"]


def heldout_by_domain(corpus: Corpus, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    chosen = list(corpus.domains) if names is None else list(names)
    unknown = [n for n in chosen if n not in corpus.domains]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {sorted(corpus.domains)}")
    return {n: corpus.domains[n].heldout for n in chosen if corpus.domains[n].heldout}


# -- expert training defaults (the CLI's; docs/composition.md, "Do no harm") --------------
# Weight of ||new router rows|| (ModuleFormer 4.3): on by default.
EXPERT_ROUTING_REG = 0.01
# Share of general text's tokens a new module may enter the top-k of, per layer, after the
# router-bias calibration (modelcore.lanes).
EXPERT_MAX_GENERAL_SHARE = 0.25
# (B, T+1) batches of general text the rows and the bias are calibrated on.
EXPERT_GENERAL_BATCHES = 8
# Weight of the LM loss on a general batch next to each domain batch (general replay).
EXPERT_GENERAL_WEIGHT = 1.0


def general_texts(corpus: Corpus, domain: str | None) -> list[str]:
    """General text for an expert of ``domain``: the training text of every corpus domain
    but that one (the base's pretraining mix without the expert's own domain)."""
    texts = [t for name, d in corpus.domains.items() if name != domain for t in d.train]
    if not texts:
        raise ValueError("the corpus has no general text besides the expert's domain")
    return texts


def expert_options(
    tokenizer,
    corpus: Corpus,
    domain: str | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    routing_reg: float | None = None,
    max_general_share: float | None = None,
    general_batches: int | None = None,
    general: Sequence[str] | None = None,
    general_weight: float | None = None,
) -> dict:
    """Keyword arguments of ``train_expert`` for the CLI's defaults: routing
    regularization, and calibration on a fixed sample of general text (``None`` = the
    default; ``general_batches=0`` turns the calibration off). ``general``: the general
    texts (default: ``general_texts(corpus, domain)``)."""
    n = EXPERT_GENERAL_BATCHES if general_batches is None else general_batches
    opts: dict = {"routing_reg": EXPERT_ROUTING_REG if routing_reg is None else routing_reg}
    if n > 0:
        stream = batches(
            tokenizer,
            list(general) if general is not None else general_texts(corpus, domain),
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed + 7919,  # not the expert's own stream
        )
        opts["general"] = stream
        opts["calibration_batches"] = n
        opts["general_weight"] = EXPERT_GENERAL_WEIGHT if general_weight is None else general_weight
        opts["max_general_share"] = (
            EXPERT_MAX_GENERAL_SHARE if max_general_share is None else max_general_share
        )
    return opts
