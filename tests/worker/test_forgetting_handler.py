"""The worker's forgetting measurement (an ``evaluate`` job whose subject is a
``ForgettingSubject``; docs/governance.md, "Proof of forgetting") on experts that really
help their domain (helpers/forgetting_models.py), without a registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.forgetting_models import DOMAINS, train_world
from helpers.tiny_models import digest_of

from modelcore.artifacts import load_base
from modelcore.compose.composed import MANIFEST_FORMAT, ComposedModel
from modelcore.compose.merge import merge_files
from modelcore.experts import load_expert
from worker.handlers import BaseCache, JobContext, JobInputs, required_inputs, run_job


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train_world(tmp_path_factory.mktemp("forgetting-world"))


def ref(world: dict[str, Any], domain: str, **extra: Any) -> dict[str, Any]:
    path = world["experts"][domain]
    return {
        "id": f"ex_{domain}",
        "version": 1,
        "digest": digest_of(path),
        "size": path.stat().st_size,
        **extra,
    }


def payload(world: dict[str, Any], subject: dict[str, Any], domain: str) -> dict[str, Any]:
    sets = {"domain": world["heldout"][domain]}
    sets.update({f"ex_{d}": world["heldout"][d] for d in DOMAINS if d != domain})
    return {
        "base_revision": world["revision"],
        "subject": {"kind": "forgetting", "expert": ref(world, domain), **subject},
        "text_sets": sets,
        "purpose": "forgetting",
    }


def run(world: dict[str, Any], body: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    files = {digest_of(p): p for p in world["experts"].values()}
    inputs = JobInputs(base_dir=world["base"], expert_files=files)
    ctx = JobContext(work_dir=tmp_path, bases=BaseCache())
    return dict(run_job("evaluate", body, inputs, ctx).result["results"])


def ensemble_manifest(world: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "id": "cmp_1",
        "method": "ensemble",
        "base_revision": world["revision"],
        "experts": [ref(world, d, weight=0.25) for d in DOMAINS],
        "params": {"with_base": True},
        "with_base": True,
        "base_weight": 0.25,
    }


def test_an_ensemble_without_the_expert_forgets_its_domain_only(
    world: dict[str, Any], tmp_path: Path
) -> None:
    forgotten = "sums"
    rest = [ref(world, d) for d in DOMAINS if d != forgotten]
    subject = {
        "composition_id": "cmp_1",
        "manifest": ensemble_manifest(world),
        "without": {
            "method": "ensemble",
            "experts": rest,
            "weights": [0.25, 0.25],
            "with_base": True,
            "base_weight": 0.25,
        },
    }
    body = payload(world, subject, forgotten)
    base_revision, refs = required_inputs("evaluate", body)
    assert base_revision == world["revision"]
    assert sorted(r.id for r in refs) == sorted(f"ex_{d}" for d in DOMAINS)  # each once
    results = run(world, body, tmp_path)

    domain = results["domain"]
    base, with_, without = (
        domain["base_bits_per_byte"],
        domain["bits_per_byte"],
        domain["without_bits_per_byte"],
    )
    assert with_ < 0.9 * base  # the expert mattered on its own domain
    assert abs(without - base) <= 0.05 * base  # ... and without it the domain is the base's
    for d in DOMAINS:
        if d != forgotten:
            other = results[f"ex_{d}"]
            change = abs(other["without_bits_per_byte"] - other["bits_per_byte"])
            assert change < 0.01 * other["bits_per_byte"], d
            assert other["bits_per_byte"] < other["base_bits_per_byte"]  # their experts help


def test_the_expert_alone_without_it_is_the_base(world: dict[str, Any], tmp_path: Path) -> None:
    body = payload(world, {"without": {"method": "base"}}, "dna")
    body["text_sets"] = {"domain": world["heldout"]["dna"]}
    results = run(world, body, tmp_path)
    domain = results["domain"]
    assert domain["without_bits_per_byte"] == domain["base_bits_per_byte"]
    assert domain["bits_per_byte"] < 0.9 * domain["base_bits_per_byte"]


def test_an_average_without_the_expert_is_the_rest_merged_again(
    world: dict[str, Any], tmp_path: Path
) -> None:
    bundle = load_base(world["base"])
    paths = [world["experts"][d] for d in DOMAINS]
    merged_all = tmp_path / "all.safetensors"
    merge_files(paths, merged_all, "weighted", weights=[0.5, 0.25, 0.25])
    output = {
        "id": "ex_avg",
        "version": 1,
        "digest": digest_of(merged_all),
        "size": merged_all.stat().st_size,
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": "cmp_2",
        "method": "average",
        "base_revision": world["revision"],
        "experts": [
            ref(world, d, weight=w) for d, w in zip(DOMAINS, [0.5, 0.25, 0.25], strict=True)
        ],
        "params": {"merge": "weighted"},
        "output": output,
    }
    subject = {
        "composition_id": "cmp_2",
        "manifest": manifest,
        "without": {
            "method": "average",
            "experts": [ref(world, d) for d in DOMAINS[1:]],
            "weights": [0.25, 0.25],
            "params": {"merge": "weighted"},
        },
    }
    body = payload(world, subject, "sums")
    files = {digest_of(p): p for p in [*world["experts"].values(), merged_all]}
    inputs = JobInputs(base_dir=world["base"], expert_files=files)
    ctx = JobContext(work_dir=tmp_path / "job", bases=BaseCache())
    results = run_job("evaluate", body, inputs, ctx).result["results"]

    # The same numbers from modelcore directly: the merged output, and the rest re-merged.
    rest = tmp_path / "rest.safetensors"
    merge_files(paths[1:], rest, "weighted", weights=[0.25, 0.25])
    texts = world["heldout"]["sums"]
    with torch.no_grad():
        with ComposedModel(bundle, "average", [load_expert(merged_all)[0]]) as composed:
            with_ = composed.bits_per_byte(texts)["bits_per_byte"]
        with ComposedModel(bundle, "average", [load_expert(rest)[0]]) as composed:
            without = composed.bits_per_byte(texts)["bits_per_byte"]
    assert results["domain"]["bits_per_byte"] == pytest.approx(with_, rel=1e-6)
    assert results["domain"]["without_bits_per_byte"] == pytest.approx(without, rel=1e-6)
