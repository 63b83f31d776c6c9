"""The harm experiment: every composition method against the base, on every domain.

What a consumer is promised: adding experts helps their domains and harms nothing else;
removing one returns its domain to the base. This module measures it as a user of the
CLI would meet it, with the CLI's defaults (``agora base train --steps 300``, ``agora
expert train --steps 200``, ``agora eval``'s windows), on the real corpus:

* a tiny base pretrained on the five corpus domains (``sources.DOMAIN_NAMES``);
* a *seen* composition: experts for two domains the base was trained on (``c_headers``,
  ``licenses``), and an *unseen* one: experts for two domains built from text the corpus
  builder does not use (``sources.UNSEEN_DOMAIN_NAMES``: Perl modules, package READMEs);
* each composition by ``mixture``, ``ensemble`` (base as a path) and ``average``
  (uniform and TIES), plus the ensemble with one expert removed;
* held-out bits per byte on all seven domains, and each one's relative change against the
  base (``+0.004`` = 0.4% worse).

``python -m modelcore.compose.report --harm`` prints the table for three seeds; the tests
in tests/modelcore/compose/test_harm.py assert the bounds of docs/composition.md on it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelcore import lanes
from modelcore.compose.evaluate import evaluate_composition
from modelcore.compose.mixture import mixture
from modelcore.data.batches import eval_batches
from modelcore.data.corpus import Corpus
from modelcore.data.sources import DOMAIN_NAMES, UNSEEN_DOMAIN_NAMES
from modelcore.eval import evaluate
from modelcore.train import recipes
from modelcore.train.insertion import train_expert
from modelcore.train.pretrain import pretrain

SEEN_EXPERTS = ("c_headers", "licenses")
UNSEEN_EXPERTS = UNSEEN_DOMAIN_NAMES
# The rows of the table besides "base": (name, method, composition, extra options).
COMPOSITIONS = {"seen": SEEN_EXPERTS, "unseen": UNSEEN_EXPERTS}


@dataclass(frozen=True)
class HarmSetup:
    """The CLI's defaults for the tiny preset, with the issue's step counts."""

    preset: str = "tiny"
    max_bytes_per_domain: int = recipes.DEFAULT_MAX_BYTES_PER_DOMAIN
    base_steps: int = 300
    expert_steps: int = 200
    # None: the CLI's default (recipes.EXPERT_DEFAULTS)
    routing_reg: float | None = None
    max_general_share: float | None = None
    general_batches: int | None = None
    eval_batch_size: int = 16
    methods: tuple[str, ...] = ("mixture", "ensemble", "average", "ties")
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class HarmData:
    corpus: Corpus  # the five default domains (the base's pretraining text)
    unseen: Corpus  # the two domains no base has seen
    tokenizer: Any

    def train_texts(self, domain: str) -> list[str]:
        source = self.corpus if domain in self.corpus.domains else self.unseen
        return list(source.domains[domain].train)

    def heldout(self) -> dict[str, list[str]]:
        out = recipes.heldout_by_domain(self.corpus)
        out.update(recipes.heldout_by_domain(self.unseen))
        return out


def prepare(setup: HarmSetup, cache_dir: Any = None) -> HarmData:
    corpus = recipes.load_corpus(setup.max_bytes_per_domain, cache_dir=cache_dir)
    unseen = recipes.load_corpus(
        setup.max_bytes_per_domain, domains=UNSEEN_DOMAIN_NAMES, cache_dir=cache_dir
    )
    from modelcore.config import ModelConfig

    vocab = ModelConfig.from_name(setup.preset).vocab_size
    return HarmData(corpus, unseen, recipes.corpus_tokenizer(corpus, vocab))


def train_base(setup: HarmSetup, data: HarmData, seed: int) -> torch.nn.Module:
    """``agora base train --preset tiny --steps 300 --seed SEED``, in memory."""
    from modelcore.config import ModelConfig

    config = ModelConfig.from_name(setup.preset)
    defaults = recipes.settings_for(config)
    model = recipes.new_base(config, data.tokenizer, seed=seed)
    texts, _ = data.corpus.texts("train")
    batches = recipes.batches(
        data.tokenizer, texts, seq_len=defaults.seq_len, batch_size=defaults.batch_size, seed=seed
    )
    pretrain(
        model,
        batches,
        setup.base_steps,
        defaults.lr,
        aux="mi",
        aux_weight=1.0,
        seed=seed,
        progress=False,
    )
    return model


def train_domain_expert(
    setup: HarmSetup, data: HarmData, base: torch.nn.Module, domain: str, seed: int
) -> dict[str, torch.Tensor]:
    """``agora expert train --domain DOMAIN --steps 200 --seed SEED`` (its defaults)."""
    model = copy.deepcopy(base)
    defaults = recipes.settings_for(model.config)
    opts = recipes.expert_options(
        data.tokenizer,
        data.corpus,
        domain,
        seq_len=defaults.seq_len,
        batch_size=defaults.batch_size,
        seed=seed,
        routing_reg=setup.routing_reg,
        max_general_share=setup.max_general_share,
        general_batches=setup.general_batches,
    )
    batches = recipes.batches(
        data.tokenizer,
        data.train_texts(domain),
        seq_len=defaults.seq_len,
        batch_size=defaults.batch_size,
        seed=seed,
    )
    trained = train_expert(
        model,
        batches,
        setup.expert_steps,
        defaults.expert_lr,
        seed=seed,
        progress=False,
        **{**opts, **setup.extra},
    )
    return trained.tensors


def bpb(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {d: float(r["bits_per_byte"]) for d, r in results.items()}


def run_seed(setup: HarmSetup, data: HarmData, seed: int) -> dict[str, Any]:
    """One seed's table: ``{"bits_per_byte": {row: {domain: bpb}}, "change": {row:
    {domain: relative change vs base}}, "own": {row: [its composition's domains]}}``."""
    base = train_base(setup, data, seed)
    texts = data.heldout()
    kw = {"batch_size": setup.eval_batch_size}
    rows: dict[str, dict[str, float]] = {"base": bpb(evaluate(base, data.tokenizer, texts, **kw))}
    own: dict[str, list[str]] = {"base": []}
    experts = {
        d: train_domain_expert(setup, data, base, d, seed) for d in (*SEEN_EXPERTS, *UNSEEN_EXPERTS)
    }
    shares = {d: general_share(base, data, d, e, setup) for d, e in experts.items()}
    for label, domains in COMPOSITIONS.items():
        chosen = [experts[d] for d in domains]
        for method in setup.methods:
            name = f"{label}: {method}"
            if method == "ties":
                res = evaluate_composition(
                    base, data.tokenizer, texts, chosen, "average", merge="ties", **kw
                )
            else:
                res = evaluate_composition(base, data.tokenizer, texts, chosen, method, **kw)
            rows[name] = bpb(res)
            own[name] = list(domains)
        # Removal: the ensemble without its first expert; that domain is now "outside".
        removed, kept = domains[0], [experts[d] for d in domains[1:]]
        name = f"{label}: ensemble - {removed}"
        rows[name] = bpb(evaluate_composition(base, data.tokenizer, texts, kept, "ensemble", **kw))
        own[name] = list(domains[1:])
    ref = rows["base"]
    change = {r: {d: v / ref[d] - 1.0 for d, v in row.items()} for r, row in rows.items()}
    return {
        "seed": seed,
        "bits_per_byte": rows,
        "change": change,
        "own": own,
        "general_share": shares,
    }


def general_share(
    base: torch.nn.Module,
    data: HarmData,
    domain: str,
    expert: Mapping[str, torch.Tensor],
    setup: HarmSetup,
) -> dict[str, float]:
    """Per layer, the share of *held-out* general text's tokens (every default domain but
    the expert's own) whose top-k includes the expert's module, inserted alone."""
    from modelcore.config import ModelConfig

    defaults = recipes.settings_for(ModelConfig.from_name(setup.preset))
    texts = [t for name, d in data.corpus.domains.items() if name != domain for t in d.heldout]
    batches = [
        b.tokens
        for b in eval_batches(data.tokenizer, texts, seq_len=defaults.seq_len, batch_size=16)
    ]
    with mixture(base, [expert]) as added:
        shares = lanes.routing_share(base, added[0], batches)
    return {str(i): v for i, v in shares.items()}


def outside_worst(report: Mapping[str, Any], row: str) -> float:
    """The largest relative rise of ``row`` on a domain outside its composition."""
    own = set(report["own"][row])
    return max(v for d, v in report["change"][row].items() if d not in own)


def format_table(report: Mapping[str, Any], domains: Sequence[str] | None = None) -> str:
    """bits/byte per row and domain, with the change against the base in brackets
    (``*`` marks the composition's own domains)."""
    rows = report["bits_per_byte"]
    cols = list(domains or rows["base"])
    head = "| bits/byte | " + " | ".join(cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for name, row in rows.items():
        own = set(report["own"][name])
        cells = []
        for d in cols:
            cell = f"{row[d]:.3f}"
            if name != "base":
                cell += f" ({100 * report['change'][name][d]:+.1f}%{'*' if d in own else ''})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(reports: Sequence[Mapping[str, Any]]) -> str:
    """Per row, over seeds: the worst rise outside the composition and the mean change on
    its own domains (the numbers the tests bound)."""
    lines = ["| composition | worst change outside (per seed) | own domains, mean change |"]
    lines.append("|---|---|---|")
    for row in reports[0]["own"]:
        if row == "base":
            continue
        worst = ", ".join(f"{100 * outside_worst(r, row):+.2f}%" for r in reports)
        own_domains = reports[0]["own"][row]
        own = ", ".join(
            f"{d} {100 * sum(r['change'][row][d] for r in reports) / len(reports):+.1f}%"
            for d in own_domains
        )
        lines.append(f"| {row} | {worst} | {own} |")
    return "\n".join(lines)


__all__ = [
    "COMPOSITIONS",
    "DOMAIN_NAMES",
    "HarmData",
    "HarmSetup",
    "format_summary",
    "format_table",
    "outside_worst",
    "prepare",
    "run_seed",
]
