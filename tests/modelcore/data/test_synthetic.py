from __future__ import annotations

import re

import pytest

from modelcore.data import Corpus, synthetic_corpus
from modelcore.data.synthetic import SHARED_WORDS


def _words(texts: list[str]) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


def test_deterministic_in_the_seed(synth: Corpus) -> None:
    again = synthetic_corpus(4, seed=0, docs_per_domain=60)
    assert again.fingerprint() == synth.fingerprint()
    assert synthetic_corpus(4, seed=1, docs_per_domain=60).fingerprint() != synth.fingerprint()


def test_domains_have_disjoint_vocabularies_apart_from_shared_words(synth: Corpus) -> None:
    assert list(synth.domains) == [f"synthetic_{i}" for i in range(4)]
    vocabs = {
        name: _words(d.train + d.heldout) - set(SHARED_WORDS) for name, d in synth.domains.items()
    }
    names = list(vocabs)
    for i, a in enumerate(names):
        assert len(vocabs[a]) >= 30
        for b in names[i + 1 :]:
            assert not vocabs[a] & vocabs[b]
    shared = [_words(d.train) & set(SHARED_WORDS) for d in synth.domains.values()]
    assert all(shared)  # the shared function words do occur


def test_splits_and_sizes(synth: Corpus) -> None:
    for dom in synth.domains.values():
        assert (len(dom.train), len(dom.heldout)) == (54, 6)
        assert not set(dom.train_ids) & set(dom.heldout_ids)
    assert synthetic_corpus(2, seed=0, docs_per_domain=10, shared_word_fraction=0.0).domains
    with pytest.raises(ValueError):
        synthetic_corpus(0)
    with pytest.raises(ValueError):
        synthetic_corpus(2, branching=100)
