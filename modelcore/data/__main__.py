"""Report the corpus this installation gives, and what discovery finds in it.

    python -m modelcore.data corpus [--max-bytes N|0] [--no-system-include] [--json]
    python -m modelcore.data tokenizer [--max-bytes N] [--vocab 512 4096]
    python -m modelcore.data discover [--max-bytes N] [--k K] [--method kmeans|agglomerative]

``--max-bytes 0`` means no cap per domain.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from modelcore.data.corpus import Corpus, build_corpus


def _corpus(args: argparse.Namespace) -> Corpus:
    return build_corpus(
        max_bytes_per_domain=args.max_bytes or None,
        system_include=None if args.no_system_include else Path("/usr/include"),
        seed=args.seed,
    )


def _report_corpus(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    corpus = _corpus(args)
    seconds = time.perf_counter() - start
    sizes = corpus.sizes()
    if args.json:
        print(json.dumps({"fingerprint": corpus.fingerprint(), "domains": sizes}, indent=2))
        return
    print("| domain | documents | train bytes | held-out bytes | train / held-out passages |")
    print("|---|---:|---:|---:|---:|")
    for name, s in sizes.items():
        print(
            f"| {name} | {s['documents']} | {s['train_bytes']:,} | {s['heldout_bytes']:,} "
            f"| {s['train_passages']} / {s['heldout_passages']} |"
        )
    print(f"\nfingerprint {corpus.fingerprint()[:16]}, built in {seconds:.2f} s")


def _report_tokenizer(args: argparse.Namespace) -> None:
    from modelcore.data.batches import count_bytes, encode_texts
    from modelcore.data.tokenizer import train_tokenizer

    corpus = _corpus(args)
    train, _ = corpus.texts("train")
    print("| vocab | train s | " + " | ".join(corpus.domains) + " |")
    print("|---:|---:|" + "---:|" * len(corpus.domains))
    for vocab in args.vocab:
        start = time.perf_counter()
        tok = train_tokenizer(train, vocab_size=vocab)
        seconds = time.perf_counter() - start
        ratios = []
        for dom in corpus.domains.values():
            n_tokens = sum(map(len, encode_texts(tok, dom.heldout, append_eot=False)))
            ratios.append(f"{count_bytes(dom.heldout) / n_tokens:.2f}")
        print(f"| {vocab} | {seconds:.1f} | " + " | ".join(ratios) + " |")
    print("\nheld-out UTF-8 bytes per token")


def _report_discovery(args: argparse.Namespace) -> None:
    from sklearn.metrics import adjusted_rand_score

    from modelcore.data.discovery import discover_domains

    corpus = _corpus(args)
    texts, labels = corpus.texts("train")
    k = args.k or len(corpus.domains)
    start = time.perf_counter()
    found = discover_domains(texts, k, method=args.method, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"{len(texts)} passages, k={k}, {args.method}, {seconds:.2f} s")
    print(f"ARI vs named domains: {adjusted_rand_score(labels, found.labels):.3f}")
    for j, size in enumerate(found.sizes()):
        top = Counter(lab for lab, c in zip(labels, found.labels, strict=True) if c == j)
        print(
            f"  cluster {j}: {size:4d} passages, "
            + ", ".join(f"{n} {d}" for d, n in top.most_common(3))
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m modelcore.data")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("corpus", "tokenizer", "discover"):
        p = sub.add_parser(name)
        p.add_argument("--max-bytes", type=int, default=1 << 20, help="per domain; 0: no cap")
        p.add_argument("--no-system-include", action="store_true")
        p.add_argument("--seed", type=int, default=0)
        if name == "corpus":
            p.add_argument("--json", action="store_true")
        if name == "tokenizer":
            p.add_argument("--vocab", type=int, nargs="+", default=[512, 1024, 4096])
        if name == "discover":
            p.add_argument("--k", type=int, default=0, help="default: number of named domains")
            p.add_argument("--method", choices=["kmeans", "agglomerative"], default="kmeans")
    args = parser.parse_args()
    {"corpus": _report_corpus, "tokenizer": _report_tokenizer, "discover": _report_discovery}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
