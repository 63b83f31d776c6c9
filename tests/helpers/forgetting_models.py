"""A tiny base and three experts that really help their own domain, trained in a few
seconds on synthetic text, for the proof-of-forgetting tests (docs/governance.md, "Proof
of forgetting").

Random experts (helpers/tiny_models.py) cannot show forgetting: they help no domain. Here
the base is pretrained on general text that holds every domain's characters in no order
(words, numbers, codons, code tokens), and each expert is trained (insertion, the base
frozen) on one domain whose structure the base never saw: sums that add up, sequences of
five codons, Python loops. About 6 s on one CPU thread (60 base steps, 40 per expert).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOMAINS = ("sums", "dna", "code")
WORDS = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "have",
    "or",
    "an",
    "not",
    "but",
    "his",
    "her",
    "they",
    "we",
    "one",
    "all",
)


def _general(rng: random.Random) -> str:
    pool = [
        *WORDS,
        *(str(rng.randint(0, 99)) for _ in range(4)),
        "".join(rng.choice("ACGT") for _ in range(3)),
        rng.choice(["+", "=", ":", "(", ")", "print", "range", "for", "in"]),
    ]
    return " ".join(rng.choice(pool) for _ in range(12)) + ".\n"


def _sums(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b} = {a + b}\n"


def _dna(rng: random.Random) -> str:
    return "".join(rng.choice(["ATG", "GCA", "TTC", "CGG", "AAT"]) for _ in range(12)) + "\n"


def _code(rng: random.Random) -> str:
    v = rng.choice("xyzijk")
    return f"for {v} in range({rng.randint(1, 9)}):\n    print({v})\n"


LINES: dict[str, Callable[[random.Random], str]] = {
    "general": _general,
    "sums": _sums,
    "dna": _dna,
    "code": _code,
}


def passages(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(LINES[domain](rng) for _ in range(6)) for _ in range(n)]


def train_world(root: Path, *, base_steps: int = 60, expert_steps: int = 40) -> dict[str, Any]:
    """Save the base bundle (``root/base``) and one expert file per domain; returns
    ``base`` (directory), ``revision``, ``experts`` (domain -> file) and ``heldout``
    (domain -> 8 passages none of the training saw; ``general`` too)."""
    import torch

    from modelcore.artifacts import save_base
    from modelcore.config import ModelConfig
    from modelcore.data.batches import token_batches
    from modelcore.data.tokenizer import train_tokenizer
    from modelcore.experts import save_expert
    from modelcore.model import ModularLM
    from modelcore.train.insertion import train_expert
    from modelcore.train.pretrain import pretrain

    train = {d: passages(d, 200, i + 1) for i, d in enumerate(LINES)}
    heldout = {d: passages(d, 8, i + 10) for i, d in enumerate(LINES)}
    tok = train_tokenizer([t for texts in train.values() for t in texts], vocab_size=300)
    config = ModelConfig.from_name("tiny").replace(
        max_seq_len=64, vocab_size=tok.get_vocab_size(with_added_tokens=True)
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = ModularLM(config)

        def batches(domain: str, seed: int) -> Any:
            return token_batches(tok, train[domain], seq_len=64, batch_size=8, seed=seed)

        pretrain(model, batches("general", 0), base_steps, 3e-3, progress=False)
        revision = save_base(root / "base", model, tok)
        experts: dict[str, Path] = {}
        for i, domain in enumerate(DOMAINS):
            trained = train_expert(
                copy.deepcopy(model),
                batches(domain, i + 1),
                expert_steps,
                1e-2,
                seed=i,
                progress=False,
            )
            path = root / f"{domain}.safetensors"
            save_expert(path, trained.tensors, base_revision=revision)
            experts[domain] = path
    finally:
        torch.set_num_threads(previous)
    return {"base": root / "base", "revision": revision, "experts": experts, "heldout": heldout}
