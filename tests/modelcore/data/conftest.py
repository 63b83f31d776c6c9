"""Shared, session-scoped data for the modelcore.data tests (built once: the corpus and the
tokenizer take about a second each on 2 cores)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from modelcore.data import Corpus, build_corpus, synthetic_corpus, train_tokenizer

# Small caps keep the whole directory well under its 60 s budget.
SMALL_CAP = 120_000


@pytest.fixture(scope="session")
def small_corpus() -> Corpus:
    return build_corpus(max_bytes_per_domain=SMALL_CAP)


@pytest.fixture(scope="session")
def synth() -> Corpus:
    return synthetic_corpus(4, seed=0, docs_per_domain=60)


@pytest.fixture(scope="session")
def tokenizer(small_corpus: Corpus) -> Tokenizer:
    texts, _ = small_corpus.texts("train")
    return train_tokenizer(texts, vocab_size=1024)
