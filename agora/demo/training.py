"""The demo's local half: the corpus, a base, one expert per domain and per discovered
cluster, and their datasheets, each cached by the content it depends on (docs/demo.md,
"What is cached").

A cache entry's key is the sha256 of everything that decides its bytes: the corpus's
fingerprint (its passages and ids), the model's configuration, the steps, rates and
seeds, and, for an expert, the base's revision and the exact passages it trains on. A
second run with the same text and options finds every entry and trains nothing; a
changed input (an upgraded package adds a license file to the corpus) trains again only
what depends on it. Entries are written under a temporary name and renamed, so an
interrupted run never leaves one half written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agora.demo import provenance

# Bump when the demo changes what a cache entry holds for the same inputs.
CACHE_FORMAT = "agora.demo-cache/1"
# The base learns these (DEMix's setting: general text); experts bring the others.
BASE_DOMAINS = ("python_stdlib", "python_tests", "c_headers")
# Named domains: one expert each (DEMix). Their text is the experts' alone: no other
# expert trains on it, so removing one takes its domain back to the base.
NAMED_DOMAINS = ("licenses", "python_docs")
# Text nobody labelled, pooled: domain discovery (c-BTM) clusters it and each cluster gets
# an expert; the table still scores each source domain on its own. Those absent on a
# machine are left out (perl_modules needs a system Perl).
UNLABELED_DOMAINS = ("perl_modules", "package_readmes")
CONTACT = "https://github.com/agora-registry/agora (agora demo)"


class DemoError(Exception):
    """A step of the demo that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Plan:
    """Every option the demo's training depends on (all part of the cache keys)."""

    preset: str = "small"
    named: tuple[str, ...] = NAMED_DOMAINS
    unlabeled: tuple[str, ...] = UNLABELED_DOMAINS
    clusters: int = 2
    max_bytes_per_domain: int = 128 * 1024
    heldout_fraction: float = 0.3
    seq_len: int = 128
    batch_size: int = 8
    base_steps: int = 400
    base_lr: float = 2e-3
    aux_weight: float = 1.0
    expert_steps: int = 80
    expert_lr: float = 1e-2
    seed: int = 0
    # Held-out text per domain: the datasheet's samples, the consumer's query (search,
    # composition, distillation), and the evaluation text of the table, all disjoint.
    sample_bytes: int = 8 * 1024
    query_bytes: int = 8 * 1024
    eval_bytes: int = 16 * 1024

    def vocab_size(self) -> int:
        from modelcore.config import ModelConfig

        return ModelConfig.from_name(self.preset).vocab_size


@dataclass(frozen=True)
class DomainText:
    """A domain's held-out passages, cut three ways (never overlapping)."""

    samples: list[str]
    query: list[str]
    eval: list[str]


@dataclass(frozen=True)
class TrainedExpert:
    name: str  # the domain, or cluster-K
    kind: str  # "domain" or "cluster"
    weights: Path
    datasheet: Path
    sha256: str
    cached: bool
    description: str
    license: str


@dataclass
class Trained:
    base_dir: Path
    revision: str
    base_cached: bool
    experts: list[TrainedExpert]
    texts: dict[str, DomainText]
    corpus_fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)


def content_key(**parts: Any) -> str:
    """sha256 of a canonical JSON of ``parts`` (and the cache format)."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def digest_texts(ids: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for pid, text in zip(ids, texts, strict=True):
        h.update(pid.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cut(passages: Sequence[str], budget: int) -> tuple[list[str], list[str]]:
    """Whole passages from the front up to ``budget`` bytes (at least one), and the rest."""
    taken: list[str] = []
    used = 0
    for i, text in enumerate(passages):
        size = len(text.encode("utf-8"))
        if taken and used + size > budget:
            return taken, list(passages[i:])
        taken.append(text)
        used += size
    return taken, []


def split_heldout(passages: Sequence[str], plan: Plan, domain: str) -> DomainText:
    """Samples, query and evaluation text from the front of a domain's held-out passages,
    each up to its budget, or a third of the text where there is less than all three."""
    third = sum(len(p.encode("utf-8")) for p in passages) // 3
    samples, rest = _cut(passages, min(plan.sample_bytes, third))
    query, rest = _cut(rest, min(plan.query_bytes, third))
    evaluation, _ = _cut(rest, plan.eval_bytes)
    if not evaluation:
        raise DemoError(
            f"the {domain} domain has too little held-out text for samples, a query and an "
            f"evaluation ({len(passages)} passages): raise --max-bytes-per-domain"
        )
    return DomainText(samples, query, evaluation)


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def available_domains(wanted: Sequence[str]) -> list[str]:
    """Those of ``wanted`` this machine has text for."""
    from modelcore.data.sources import SourcePaths, list_sources

    paths = SourcePaths.current()
    return [d for d in wanted if list_sources(d, paths)]


def load_corpus(plan: Plan, cache: Path) -> Any:
    from modelcore.data.corpus import build_corpus

    return build_corpus(
        max_bytes_per_domain=plan.max_bytes_per_domain,
        heldout_fraction=plan.heldout_fraction,
        seed=plan.seed,
        domains=[*BASE_DOMAINS, *plan.named, *plan.unlabeled],
        cache_dir=cache / "corpus",
    )


def train_base(plan: Plan, corpus: Any, cache: Path, progress: bool) -> tuple[Path, bool]:
    """The base bundle's directory (trained now or found in the cache) and whether cached."""
    from modelcore.artifacts import config_document
    from modelcore.config import ModelConfig

    config = ModelConfig.from_name(plan.preset)
    key = content_key(
        what="base",
        corpus=corpus.fingerprint(),
        config=config_document(config),
        domains=BASE_DOMAINS,
        steps=plan.base_steps,
        lr=plan.base_lr,
        aux_weight=plan.aux_weight,
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        seed=plan.seed,
    )
    final = cache / "bases" / key[:32]
    if (final / "model.safetensors").is_file():
        return final, True

    def build(out: Path) -> None:
        from modelcore.artifacts import save_base
        from modelcore.train import recipes
        from modelcore.train.pretrain import pretrain

        tokenizer = recipes.corpus_tokenizer(corpus, config.vocab_size, seed=plan.seed)
        model = recipes.new_base(config, tokenizer, seed=plan.seed)
        texts = [t for d in BASE_DOMAINS for t in corpus.domains[d].train]
        data = recipes.batches(
            tokenizer, texts, seq_len=plan.seq_len, batch_size=plan.batch_size, seed=plan.seed
        )
        pretrain(
            model,
            data,
            plan.base_steps,
            plan.base_lr,
            aux="mi",
            aux_weight=plan.aux_weight,
            seed=plan.seed,
            progress=progress,
        )
        save_base(out, model, tokenizer)

    _atomic_dir(final, build)
    return final, False


@dataclass(frozen=True)
class ExpertData:
    """What one expert trains on and is described by."""

    name: str
    kind: str
    description: str
    train_ids: list[str]
    train: list[str]
    samples: list[str]


def cluster_data(plan: Plan, corpus: Any, texts: dict[str, DomainText]) -> list[ExpertData]:
    """c-BTM: the unlabelled pool's training passages clustered (TF-IDF, SVD, balanced
    k-means; modelcore/data/discovery.py), whatever domain they came from; one expert per
    cluster. Its samples are the pool's held-out samples nearest its centroid."""
    from modelcore.data.discovery import discover_domains

    ids = [i for d in plan.unlabeled for i in corpus.domains[d].train_ids]
    train = [t for d in plan.unlabeled for t in corpus.domains[d].train]
    found = discover_domains(train, plan.clusters, seed=plan.seed)
    terms = found.top_terms(train, n=6)
    pool = [s for d in plan.unlabeled for s in texts[d].samples]
    nearest = found.assign(pool) if pool else []
    distances = found.distances(pool) if pool else None
    out = []
    for k in range(found.n_clusters):
        members = [i for i, label in enumerate(found.labels) if label == k]
        mine = [pool[i] for i, label in enumerate(nearest) if label == k]
        if not mine and distances is not None:  # no sample is nearest: the closest one
            mine = [pool[int(distances[:, k].argmin())]]
        samples, _ = _cut(mine, plan.sample_bytes)
        shares: dict[str, int] = {}
        for i in members:
            domain = ids[i].split(":", 1)[0]
            shares[domain] = shares.get(domain, 0) + 1
        mix = ", ".join(f"{n} {d}" for d, n in sorted(shares.items(), key=lambda x: -x[1]))
        out.append(
            ExpertData(
                name=f"cluster-{k}",
                kind="cluster",
                description=(
                    f"A cluster discovered in unlabelled text (c-BTM): "
                    f"{len(members)} passages ({mix}); top terms {', '.join(terms[k])}."
                ),
                train_ids=[ids[i] for i in members],
                train=[train[i] for i in members],
                samples=samples,
            )
        )
    return out


DOMAIN_WORDS = {
    "licenses": "Software license texts: the LICENSE, COPYING and NOTICE files of "
    "installed Python packages.",
    "python_docs": "Prose of the Python documentation: the interpreter's help topics.",
    "perl_modules": "Perl 5 modules: Perl code with its POD documentation.",
    "package_readmes": "Descriptions of Python packages (README prose in Markdown and "
    "reStructuredText).",
}


def train_experts(
    plan: Plan,
    *,
    corpus: Any,
    base_dir: Path,
    data: Sequence[ExpertData],
    cache: Path,
    sheets: Path,
    progress: bool,
    on_expert: Callable[[str, bool, float], None],
) -> list[TrainedExpert]:
    """One expert per entry of ``data`` (insertion training against the frozen base, with
    the CLI's do-no-harm defaults), and its datasheet in ``sheets``."""
    from modelcore.artifacts import compute_revision

    revision = compute_revision(base_dir)
    bundle: Any = None
    general = [t for d in BASE_DOMAINS for t in corpus.domains[d].train]
    out = []
    sheets.mkdir(parents=True, exist_ok=True)
    for item in data:
        key = content_key(
            what="expert",
            base=revision,
            name=item.name,
            train=digest_texts(item.train_ids, item.train),
            general=BASE_DOMAINS,
            steps=plan.expert_steps,
            lr=plan.expert_lr,
            seq_len=plan.seq_len,
            batch_size=plan.batch_size,
            seed=plan.seed,
        )
        final = cache / "experts" / f"{key[:32]}.safetensors"
        started = time.perf_counter()
        cached = final.is_file()
        if not cached:
            if bundle is None:
                from modelcore.artifacts import load_base

                bundle = load_base(base_dir)
            _train_one(
                plan,
                corpus=corpus,
                bundle=bundle,
                item=item,
                general=general,
                final=final,
                progress=progress,
            )
        on_expert(item.name, cached, time.perf_counter() - started)
        tokenizer = _tokenizer(base_dir) if bundle is None else bundle.tokenizer
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(item.train))
        found = provenance.origins(item.train_ids)
        license_ = provenance.combined_license(found)
        sheet = sheets / f"{item.name}.md"
        sheet.write_text(
            datasheet(
                item, found=found, license_=license_, tokens=tokens, plan=plan, revision=revision
            ),
            encoding="utf-8",
        )
        out.append(
            TrainedExpert(
                name=item.name,
                kind=item.kind,
                weights=final,
                datasheet=sheet,
                sha256=sha256_file(final),
                cached=cached,
                description=item.description,
                license=license_,
            )
        )
    return out


def _tokenizer(base_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(base_dir / "tokenizer.json"))


def _train_one(
    plan: Plan,
    *,
    corpus: Any,
    bundle: Any,
    item: ExpertData,
    general: list[str],
    final: Path,
    progress: bool,
) -> None:
    from modelcore.experts import save_expert
    from modelcore.train import recipes
    from modelcore.train.insertion import train_expert

    model = copy.deepcopy(bundle.model)
    opts = recipes.expert_options(
        bundle.tokenizer,
        corpus,
        None,
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        seed=plan.seed,
        general=general,
    )
    batches = recipes.batches(
        bundle.tokenizer,
        item.train,
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        seed=plan.seed + 1000,
    )
    result = train_expert(
        model,
        batches,
        plan.expert_steps,
        plan.expert_lr,
        seed=plan.seed,
        progress=progress,
        **opts,
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    save_expert(final, result.tensors, base_revision=bundle.revision)


def datasheet(
    item: ExpertData,
    *,
    found: Sequence[provenance.Origin],
    license_: str,
    tokens: int,
    plan: Plan,
    revision: str,
) -> str:
    """The datasheet markdown: front matter the registry checks, and a body saying what
    the text is, where it came from and how the expert was trained."""
    from agora.commands.datasheet import dump_yaml

    words = DOMAIN_WORDS.get(item.name, item.description)
    front: dict[str, Any] = {
        "name": f"{item.name} (agora demo)",
        "domain": words if item.kind == "domain" else item.description,
        "license": license_,
        "language": ["en"],
        "sources": [o.source() for o in found],
        "collection": (
            "Read by `agora demo` from files this machine carries (modelcore/data/"
            "sources.py), cut into passages of at most 4 KiB, near-duplicate license "
            f"texts dropped; {plan.heldout_fraction:.0%} of the documents held out by a "
            "hash of their id, and the samples drawn only from those."
        ),
        "token_count": tokens,
        "pii_handling": (
            "Public software files and documentation; they name their authors and "
            "maintainers (copyright lines, e-mail addresses), which were kept as published."
        ),
        "intended_uses": ["Demonstrating Agora: retrieval, composition and forgetting"],
        "out_of_scope_uses": ["Anything beyond the demo: the model is small and briefly trained"],
        "contact": CONTACT,
        "samples": item.samples,
        "tags": ["agora-demo", item.kind],
    }
    lines = [
        f"# {front['name']}",
        "",
        front["domain"],
        "",
        "## Data",
        "",
        f"{len(item.train)} training passages ({tokens} tokens with the base's tokenizer).",
        "Sources and their terms:",
        "",
        *[f"- {o.name}: {o.license or provenance.NOT_DECLARED}" for o in found],
        "",
        "## Training",
        "",
        f"One feed-forward module per MoE layer with its router row, inserted into the "
        f"frozen base {revision[:12]} and trained {plan.expert_steps} steps (batch "
        f"{plan.batch_size} x {plan.seq_len} tokens, lr {plan.expert_lr}), with routing "
        "regularization, replay of the base's general text and a router bias calibrated "
        'on it (docs/composition.md, "Do no harm").',
        "",
    ]
    return f"---\n{dump_yaml(front)}---\n\n" + "\n".join(lines)


def train_all(
    plan: Plan,
    root: Path,
    *,
    progress: bool,
    say: Callable[[str], None],
) -> Trained:
    """Everything the demo trains, from the cache where it can."""
    cache = root / "cache"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    corpus = load_corpus(plan, cache)
    sizes = corpus.sizes()
    timings["corpus"] = time.perf_counter() - started
    say(
        "corpus: "
        + ", ".join(f"{d} {sizes[d]['train_bytes'] // 1024} KiB" for d in corpus.domains)
        + f" ({timings['corpus']:.0f} s)"
    )
    texts = {
        d: split_heldout(corpus.domains[d].heldout, plan, d) for d in (*plan.named, *plan.unlabeled)
    }
    started = time.perf_counter()
    base_dir, base_cached = train_base(plan, corpus, cache, progress)
    timings["base"] = time.perf_counter() - started
    from modelcore.artifacts import compute_revision

    revision = compute_revision(base_dir)
    took = "cached" if base_cached else f"{timings['base']:.0f} s"
    say(
        f"base: {plan.preset}, {plan.base_steps} steps on {', '.join(BASE_DOMAINS)}: "
        f"{revision[:12]} ({took})"
    )
    data = [
        ExpertData(
            name=d,
            kind="domain",
            description=DOMAIN_WORDS.get(d, d),
            train_ids=corpus.domains[d].train_ids,
            train=corpus.domains[d].train,
            samples=texts[d].samples,
        )
        for d in plan.named
    ]
    if plan.clusters > 0 and plan.unlabeled:
        data += cluster_data(plan, corpus, texts)

    def on_expert(name: str, cached: bool, seconds: float) -> None:
        say(f"expert {name}: {'cached' if cached else f'trained in {seconds:.0f} s'}")

    started = time.perf_counter()
    experts = train_experts(
        plan,
        corpus=corpus,
        base_dir=base_dir,
        data=data,
        cache=cache,
        sheets=root / "datasheets",
        progress=progress,
        on_expert=on_expert,
    )
    timings["experts"] = time.perf_counter() - started
    return Trained(
        base_dir=base_dir,
        revision=revision,
        base_cached=base_cached,
        experts=experts,
        texts=texts,
        corpus_fingerprint=corpus.fingerprint(),
        timings=timings,
    )


def plan_dict(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)
