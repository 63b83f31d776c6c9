"""A composition requested by text, end to end with real processes, on SQLite and PostgreSQL.

`agora serve` (no embedded worker) and one `agora worker` run as subprocesses. A tiny base
and three domain experts, trained on the real corpus, are uploaded with datasheets whose
samples are their domain's text. A user asks for an ensemble of the k=2 experts that fit
held-out text of one domain; the worker computes it; the SDK loads the composition and
scores that text locally, better than the base does. The CLI does the same with
`agora compose --texts FILE --out DIR`, and the directory loads offline.

And the embedded default: `agora serve` alone (its in-process worker) averages two experts
into a new one with lineage and a license derived from its parents'.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.processes import AGORA, Processes, Published, Registry, Trained, start_worker

from registry.client import Agora, CompositionWarning

pytestmark = pytest.mark.slow

DOMAIN = "licenses"


def _base_bits_per_byte(trained: Trained, texts: list[str]) -> float:
    import torch

    from modelcore.artifacts import load_base
    from modelcore.eval import evaluate

    torch.set_num_threads(1)
    bundle = load_base(trained.base_dir)
    return float(evaluate(bundle.model, bundle.tokenizer, {"t": texts})["t"]["bits_per_byte"])


def test_a_composition_requested_by_text_is_computed_by_a_worker_and_loaded(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    procs: Processes,
    trained: Trained,
    tmp_path: Path,
) -> None:
    registry = launch()
    published = publish(registry)
    worker_token = registry.cli_create_token("worker", "w1")
    worker = start_worker(procs, registry, worker_token, name="w1")
    # A few held-out passages (about 8 KB): enough for retrieval and a clear margin.
    texts = trained.heldout[DOMAIN][:4]
    base_bpb = _base_bits_per_byte(trained, texts)

    seen: list[Any] = []
    with Agora(registry.url, token=published.user_token, cache_dir=tmp_path / "sdk") as agora:
        handle = agora.compose("ensemble", base_revision=published.revision, texts=texts, k=2)
        composition = handle.wait(timeout=300, poll=0.3, progress=seen.append)
        job = agora.get_job(handle.job_id)
        model = agora.load_composed(composition)
        composed = model.bits_per_byte(texts)

    assert worker.alive(), worker.log()
    # The worker reported progress through the job as it went, and the job succeeded once.
    assert seen, "the progress callback was never called"
    assert job.status == "succeeded"
    assert job.attempts == 1
    assert job.composition_id == composition.id
    # Retrieval chose the domain's own expert among the two, from the text alone.
    manifest = composition.manifest
    assert manifest is not None
    assert manifest.method == "ensemble"
    assert manifest.base_revision == published.revision
    assert len(manifest.experts) == 2
    by_id = {ref.id: ref for ref in manifest.experts}
    assert published.experts[DOMAIN] in by_id
    for domain, expert_id in published.experts.items():
        if expert_id in by_id:
            assert by_id[expert_id].digest == published.digests[domain]
    weights = [ref.weight for ref in manifest.experts]
    assert all(w is not None and w >= 0 for w in weights), weights
    # The base is one more path by default: the experts' weights and its share sum to 1.
    assert manifest.with_base is True
    assert manifest.base_weight is not None
    total = sum(w for w in weights if w is not None) + manifest.base_weight
    assert math.isclose(total, 1.0, rel_tol=1e-4)
    assert model.ensemble is not None
    assert model.ensemble.n_paths == 3

    # The claim: the composition scores the user's text better than the base.
    assert composed["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert composed["bits_per_byte"] < base_bpb - 0.005, (composed, base_bpb)
    # What the worker measured is what the user gets locally.
    metrics = manifest.metrics
    assert metrics is not None
    assert metrics["bits_per_byte"] == pytest.approx(composed["bits_per_byte"], rel=0.02)
    assert metrics["base_bits_per_byte"] == pytest.approx(base_bpb, rel=0.02)
    # Exactly one accepted result for the job, from its one lease.
    rows = registry.query("SELECT job_id FROM job_results")
    assert [r["job_id"] for r in rows] == [handle.job_id]

    # The same through the CLI: compose by text into a directory, then load it offline.
    text_file = tmp_path / "mine.txt"
    text_file.write_text("\n\n".join(t.strip() for t in texts) + "\n")
    out = tmp_path / "composed"
    env = dict(registry.env, AGORA_REGISTRY_URL=registry.url, AGORA_TOKEN=published.user_token)
    env["AGORA_CACHE_DIR"] = str(tmp_path / "cli-cache")
    run = subprocess.run(
        [
            *AGORA,
            "compose",
            "--texts",
            str(text_file),
            "--method",
            "ensemble",
            "-k",
            "2",
            "--out",
            str(out),
            "--timeout",
            "300",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed["status"] == "ready"
    assert published.experts[DOMAIN] in {e["id"] for e in printed["manifest"]["experts"]}
    assert (out / "manifest.json").is_file()

    from registry.client.composed import load_composed_dir

    offline = load_composed_dir(out)
    assert offline.bits_per_byte(texts)["bits_per_byte"] < base_bpb - 0.005


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_one_agora_serve_averages_experts_with_its_embedded_worker(
    launch: Callable[..., Registry],
    publish: Callable[..., Published],
    trained: Trained,
    tmp_path: Path,
) -> None:
    """The embedded default: `agora serve` alone computes jobs. An average is a new expert,
    stored like any other, whose datasheet names its parents and their joint license."""
    import yaml
    from safetensors.numpy import load_file

    registry = launch(AGORA_EMBEDDED_WORKER="true")
    published = publish(registry, domains=("licenses", "python_docs"))
    parents = [published.experts["licenses"], published.experts["python_docs"]]
    with Agora(registry.url, token=published.user_token, cache_dir=tmp_path / "sdk") as agora:
        with pytest.warns(CompositionWarning, match="average_may_harm"):
            handle = agora.compose(
                "average",
                base_revision=published.revision,
                experts=parents,
                params={"merge": "uniform"},
            )
        composition = handle.wait(timeout=300, poll=0.3)
        assert composition.expert_id is not None
        assert composition.manifest is not None
        assert composition.manifest.output is not None
        assert composition.manifest.output.id == composition.expert_id
        new = agora.get_expert(composition.expert_id)
        # The front matter ends at the first line that is only "---"; a "---" inside a
        # quoted sample (a license's rule line) is not one.
        sheet = agora.get_datasheet(new.id)
        front = yaml.safe_load(sheet.removeprefix("---\n").split("\n---\n", 1)[0])
        merged = load_file(agora.download(new.id))
        inputs = [load_file(agora.download(p)) for p in parents]
        model = agora.load_composed(composition)
        score = model.bits_per_byte(trained.heldout["licenses"][:2])

    assert new.owner == "alice"
    assert new.status == "active"
    assert new.base_revision == published.revision
    # Lineage and license follow from the parents (CC0-1.0 and PSF-2.0).
    assert [(p["expert_id"], p["version"]) for p in front["parents"]] == [(p, 1) for p in parents]
    assert front["license"] == "CC0-1.0 AND PSF-2.0"
    # The worker uploaded the uniform average of the parents, tensor by tensor.
    assert sorted(merged) == sorted(inputs[0])
    for name, tensor in merged.items():
        expected = (inputs[0][name] + inputs[1][name]) / 2
        assert abs(tensor - expected).max() < 1e-6, name
    assert 0 < score["bits_per_byte"] < 10
    # No `agora worker` ran: the one result came from the registry's in-process worker.
    assert len(registry.query("SELECT job_id FROM job_results")) == 1
