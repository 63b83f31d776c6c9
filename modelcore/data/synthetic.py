"""A synthetic multi-domain corpus for fast tests.

Each domain has its own pseudo-word vocabulary (built from its own consonants and vowels,
disjoint from the other domains' words), its own sentence terminator, and a first-order
Markov chain over its words plus a few function words every domain shares. So domains are
separable by bag of words (discovery must recover them), yet not trivially: the shared
words carry domain-specific successors, and each word has only ``branching`` successors,
so a tiny LM learns a domain's grammar in a few hundred steps (the per-word entropy is at
most ln(branching) nats, about 1.4 for the default 4).
"""

from __future__ import annotations

import random
import string

from modelcore.data.corpus import Corpus, Domain

__all__ = ["SHARED_WORDS", "synthetic_corpus"]

SHARED_WORDS = ("the", "of", "and", "to", "in", "is")
_VOWELS = "aeiouy"
_CONSONANTS = "".join(c for c in string.ascii_lowercase if c not in _VOWELS)
_TERMINATORS = (".", "!", "?", ";", ":", " ~")


def _vocabulary(rng: random.Random, size: int, taken: set[str]) -> list[str]:
    consonants = rng.sample(_CONSONANTS, 6)
    vowels = rng.sample(_VOWELS, 2)
    words: list[str] = []
    while len(words) < size:
        syllables = rng.randint(1, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in taken and word not in SHARED_WORDS:
            taken.add(word)
            words.append(word)
    return words


def _chain(
    rng: random.Random, states: list[str], targets: list[str], branching: int
) -> dict[str, tuple[list[str], list[float]]]:
    """Each state's successors and their probabilities (Dirichlet(1) weights)."""
    table = {}
    for state in states:
        succ = rng.sample(targets, branching)
        weights = [rng.expovariate(1.0) for _ in succ]
        total = sum(weights)
        table[state] = (succ, [w / total for w in weights])
    return table


def _document(
    rng: random.Random,
    words: list[str],
    chain: dict[str, tuple[list[str], list[float]]],
    terminator: str,
    sentences: int,
) -> str:
    out = []
    for _ in range(sentences):
        word = rng.choice(words)
        sentence = [word]
        for _ in range(rng.randint(4, 12)):
            succ, probs = chain[word]
            word = rng.choices(succ, probs)[0]
            sentence.append(word)
        out.append(" ".join(sentence).capitalize() + terminator)
    # Two or three sentences a line: documents have some layout to learn, like real text.
    lines = [" ".join(out[i : i + 3]) for i in range(0, len(out), 3)]
    return "\n".join(lines) + "\n"


def synthetic_corpus(
    n_domains: int,
    seed: int = 0,
    *,
    docs_per_domain: int = 200,
    sentences_per_doc: int = 6,
    vocab_per_domain: int = 40,
    branching: int = 4,
    shared_word_fraction: float = 0.15,
    heldout_fraction: float = 0.1,
) -> Corpus:
    """``n_domains`` domains named ``synthetic_0``, ``synthetic_1``, ...; deterministic in
    ``seed``. ``shared_word_fraction`` is the share of successor slots filled by the
    shared function words (0 makes domains disjoint in vocabulary)."""
    if n_domains < 1 or n_domains > len(_TERMINATORS) * 4:
        raise ValueError(f"n_domains must be in [1, {len(_TERMINATORS) * 4}]")
    if branching < 1 or branching > vocab_per_domain:
        raise ValueError("branching must be in [1, vocab_per_domain]")
    if not 0.0 <= heldout_fraction < 1.0 or docs_per_domain < 2:
        raise ValueError("need docs_per_domain >= 2 and heldout_fraction in [0, 1)")
    rng = random.Random(seed)
    taken: set[str] = set()
    domains: dict[str, Domain] = {}
    n_heldout = max(1, round(docs_per_domain * heldout_fraction)) if heldout_fraction else 0
    for d in range(n_domains):
        name = f"synthetic_{d}"
        words = _vocabulary(rng, vocab_per_domain, taken)
        # Shared words appear among successors in proportion to shared_word_fraction.
        n_shared = round(len(words) * shared_word_fraction / max(1e-9, 1 - shared_word_fraction))
        shared = [SHARED_WORDS[i % len(SHARED_WORDS)] for i in range(n_shared)]
        chain = _chain(rng, words + list(SHARED_WORDS), words + shared, branching)
        terminator = _TERMINATORS[d % len(_TERMINATORS)]
        docs = [
            _document(rng, words, chain, terminator, sentences_per_doc)
            for _ in range(docs_per_domain)
        ]
        ids = [f"{name}:doc{i:05d}#0" for i in range(docs_per_domain)]
        cut = docs_per_domain - n_heldout
        domains[name] = Domain(name, docs[:cut], docs[cut:], ids[:cut], ids[cut:])
    params = {
        "synthetic": True,
        "n_domains": n_domains,
        "seed": seed,
        "docs_per_domain": docs_per_domain,
        "sentences_per_doc": sentences_per_doc,
        "vocab_per_domain": vocab_per_domain,
        "branching": branching,
        "shared_word_fraction": shared_word_fraction,
        "heldout_fraction": heldout_fraction,
    }
    return Corpus(domains, params)
