"""Retrieval test helpers: domain corpora, submitting experts through the API, searching.

Used by tests/registry/retrieval (``from helpers.retrieval import ...``).
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.artifacts import make_datasheet
from registry.db.models import Expert

# Sample passages per domain (what a contributor puts in the datasheet) and held-out texts
# (what a consumer searches with). Vocabulary overlaps within a domain, as real text does.
DOMAINS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "samples": [
            "Whisk the eggs with sugar until pale, then fold in the sifted flour and butter.",
            "Simmer the tomato sauce with garlic and basil for twenty minutes before seasoning.",
            "Knead the bread dough until smooth, let it rise, then bake in a hot oven.",
            "Roast the vegetables with olive oil, salt and rosemary until caramelised.",
            "Season the soup with pepper and stir in the cream just before serving.",
        ],
        "queries": [
            "Preheat the oven, butter the pan and bake the cake with flour, eggs and sugar.",
            "Stir the garlic into the olive oil and simmer the sauce, then season with salt.",
        ],
    },
    "law": {
        "samples": [
            "The court held that the contract was void because the defendant lacked capacity.",
            "The appellant argues that the statute of limitations bars the plaintiff's claim.",
            "Under the tenancy agreement, the landlord must give notice before termination.",
            "The judge granted the motion to dismiss for lack of jurisdiction over the defendant.",
            "Damages for breach of contract put the plaintiff where performance would have.",
        ],
        "queries": [
            "The plaintiff sued for breach of contract and the court awarded damages.",
            "The defendant appealed the judge's ruling on jurisdiction and the statute.",
        ],
    },
    "astronomy": {
        "samples": [
            "The telescope resolved the binary star system into two orbiting components.",
            "A supernova remnant expands into the interstellar medium of the galaxy.",
            "The planet's orbit around its host star was measured from transit timing.",
            "Redshift of distant galaxies shows the expansion of the universe.",
            "The comet's tail points away from the sun as solar wind pushes the gas.",
        ],
        "queries": [
            "Astronomers pointed the telescope at the galaxy to measure its redshift.",
            "The star's planet crosses its disk, and the transit dims the star's light.",
        ],
    },
}


@dataclass(frozen=True)
class Submitted:
    id: str
    version: int
    domain: str


def datasheet_for(domain: str, *, samples: list[str] | None = None) -> bytes:
    return make_datasheet(
        name=f"{domain.capitalize()} expert",
        domain=f"Texts about {domain}.",
        samples=samples if samples is not None else DOMAINS[domain]["samples"],
    )


def submit_domain(
    api, domain: str, *, seed: int, expert_id: str | None = None, samples: list[str] | None = None
) -> Submitted:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=datasheet_for(domain, samples=samples),
        expert_id=expert_id,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Submitted(body["id"], body["version"], domain)


def search(api, texts, *, k: int = 4, base_revision: str | None = None, **extra):
    body = {
        "texts": texts,
        "base_revision": api.base.revision if base_revision is None else base_revision,
        "k": k,
        **extra,
    }
    return api.client.post("/v1/search", json=body)


def expert_status(api, expert_id: str) -> str:
    with api.app.state.runtime.sessions() as session:
        expert = session.get(Expert, expert_id)
        assert expert is not None
        return expert.status


def base_multipart_for(files: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {
        "config": ("config.json", files["config.json"]),
        "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
        "weights": ("model.safetensors", files["model.safetensors"]),
    }
