"""The index and the database agree: a rebuild equals the live index, a second app on the
same database (a replica) catches up within its refresh delay, and a change of embedder
re-embeds every expert instead of mixing vector spaces."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.retrieval import DOMAINS, search, submit_domain
from sqlalchemy import select

from registry.app import create_app
from registry.db.models import ExpertVector
from registry.retrieval.embedders import HashingEmbedder
from registry.retrieval.service import Retrieval
from registry.settings import Settings


@pytest.fixture
def settings(request, database_url: str, tmp_path: Path) -> Settings:
    # exact_max 2: with three experts and more, the HNSW path (tombstones, revival) runs.
    exact_max = 2 if getattr(request, "param", "exact") == "hnsw" else 20_000
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        retrieval_exact_max_vectors=exact_max,
    )


@pytest.mark.parametrize("settings", ["exact", "hnsw"], indirect=True)
def test_an_index_rebuilt_from_the_database_equals_the_live_one(api, experts, settings) -> None:
    moderator = api.auth(api.tokens.moderator)
    law, cooking = experts["law"].id, experts["cooking"].id
    extra = submit_domain(api, "astronomy", seed=20)
    for action, reason in [("disable", "spam"), ("enable", "appeal upheld")]:
        r = api.client.post(
            f"/v1/experts/{law}/{action}", json={"reason": reason}, headers=moderator
        )
        assert r.status_code == 200
    r = api.client.post(
        f"/v1/experts/{extra.id}/disable", json={"reason": "dup"}, headers=moderator
    )
    assert r.status_code == 200
    # A new version on a mixed datasheet: several vectors replace the old one.
    mixed = [
        "Simmer the garlic sauce slowly.",
        "Garlic sauce: simmer it slowly.",
        "Slowly simmer garlic into the sauce.",
        "The sauce needs garlic and a slow simmer.",
        "The court dismissed the appeal.",
        "On appeal, the court dismissed the claim.",
        "The appeal was dismissed by the court.",
        "Court dismissed appeal and claim.",
    ]
    submit_domain(api, "cooking", seed=21, expert_id=cooking, samples=mixed)

    live_retrieval = api.app.state.runtime.retrieval
    live = live_retrieval.index_for(api.base.revision)
    expected_kind = "exact" if settings.retrieval_exact_max_vectors > 100 else "hnsw"
    assert live.kind == expected_kind
    rebuilt_retrieval = Retrieval(
        sessions=api.app.state.runtime.sessions,
        embedder=live_retrieval.embedder,
        settings=settings,
    )
    rebuilt_retrieval.start()
    rebuilt = rebuilt_retrieval.index_for(api.base.revision)

    assert live.experts() == rebuilt.experts() == {e.id for e in experts.values()}
    ids = live.vector_ids()
    assert ids == rebuilt.vector_ids()
    assert len(ids) == 5  # law, astronomy, and the mixed cooking v2's mean + 2 centroids
    for vector_id in ids:
        np.testing.assert_array_equal(live.reconstruct(vector_id), rebuilt.reconstruct(vector_id))
    query = live_retrieval.embed_query(DOMAINS["law"]["queries"])
    live_hits, rebuilt_hits = live.search(query, 3), rebuilt.search(query, 3)
    # The same experts in the same order; distances equal up to float32 rounding (an HNSW
    # graph built incrementally and one built at once can sum a distance's terms in a
    # different SIMD order: faiss 1.15 differs by one ulp here).
    assert [hit[0] for hit in live_hits] == [hit[0] for hit in rebuilt_hits]
    np.testing.assert_allclose(
        [hit[1] for hit in live_hits], [hit[1] for hit in rebuilt_hits], rtol=1e-6, atol=0
    )


def test_a_replica_sees_changes_within_its_refresh_delay(api, experts, settings, tmp_path) -> None:
    delay = 0.3
    replica_settings = settings.model_copy(
        update={"data_dir": tmp_path / "replica", "retrieval_refresh_seconds": delay}
    )
    with TestClient(create_app(replica_settings)) as replica:

        def replica_search(texts: list[str]) -> list[str]:
            body = {"texts": texts, "base_revision": api.base.revision, "k": 10}
            response = replica.post("/v1/search", json=body)
            assert response.status_code == 200, response.text
            return [r["expert_id"] for r in response.json()["results"]]

        assert set(replica_search(DOMAINS["law"]["queries"])) == {e.id for e in experts.values()}
        new = submit_domain(
            api, "law", seed=30, samples=["Habeas corpus petitions challenge unlawful detention."]
        )
        time.sleep(delay * 1.2)
        assert new.id in replica_search(["A habeas corpus petition against detention."])

        r = api.client.post(
            f"/v1/experts/{new.id}/disable",
            json={"reason": "test"},
            headers=api.auth(api.tokens.moderator),
        )
        assert r.status_code == 200
        # The primary applied it before answering; the replica within its delay.
        assert new.id not in [
            x["expert_id"] for x in search(api, ["habeas corpus"], k=10).json()["results"]
        ]
        time.sleep(delay * 1.2)
        assert new.id not in replica_search(["A habeas corpus petition against detention."])


def test_a_new_embedder_reembeds_every_expert(api, experts, settings, tmp_path) -> None:
    old_id = api.app.state.runtime.retrieval.embedder.id
    other = HashingEmbedder(dim=256)
    assert other.id != old_id
    replica_settings = settings.model_copy(update={"data_dir": tmp_path / "replica"})
    with TestClient(create_app(replica_settings, embedder=other)) as replica:
        with api.app.state.runtime.sessions() as session:
            rows = session.execute(
                select(ExpertVector.expert_id, ExpertVector.embedder, ExpertVector.dim)
            ).all()
        made = {(e, emb, dim) for e, emb, dim in rows}
        for expert in experts.values():
            assert (expert.id, other.id, 256) in made
            # The other embedder's vectors stay for replicas still running it.
            assert (expert.id, old_id, 384) in made
        for domain, spec in DOMAINS.items():
            body = {"texts": spec["queries"], "base_revision": api.base.revision, "k": 3}
            answer = replica.post("/v1/search", json=body).json()
            assert answer["embedder"] == other.id
            assert answer["results"][0]["expert_id"] == experts[domain].id

        # An expert accepted by the old-embedder app gets this replica's vectors on sync.
        new = submit_domain(api, "astronomy", seed=40)
        replica.app.state.runtime.retrieval.sync()
        assert new.id in replica.app.state.runtime.retrieval.index_for(api.base.revision).experts()
        with api.app.state.runtime.sessions() as session:
            embedders = set(
                session.scalars(
                    select(ExpertVector.embedder).where(ExpertVector.expert_id == new.id)
                )
            )
        assert embedders == {old_id, other.id}


def test_a_late_reembed_never_overwrites_a_newer_versions_vectors(api, experts) -> None:
    """A replica re-embedding v1 while v2 is accepted must not replace v2's vectors."""
    from registry.retrieval import store

    law = experts["law"].id
    v1_vectors = api.app.state.runtime.retrieval.vectors_for_samples(DOMAINS["law"]["samples"])
    submit_domain(api, "astronomy", seed=50, expert_id=law)  # v2
    runtime = api.app.state.runtime
    with runtime.sessions() as session, session.begin():
        stored = store.replace_vectors_of_embedder(
            session=session,
            expert_id=law,
            version=1,
            embedder=runtime.retrieval.embedder.id,
            vectors=v1_vectors,
        )
    assert stored is False
    with runtime.sessions() as session:
        versions = set(
            session.scalars(select(ExpertVector.version).where(ExpertVector.expert_id == law))
        )
    assert versions == {2}
    top = search(api, DOMAINS["astronomy"]["queries"], k=1).json()["results"][0]
    assert top["expert_id"] in {law, experts["astronomy"].id}
