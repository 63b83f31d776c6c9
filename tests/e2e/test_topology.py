"""The compose topology without Docker: the processes docker-compose.yml runs, started here.

On PostgreSQL only (skipped, with the reason, when ``AGORA_TEST_DATABASE_URL`` is unset, as
every PostgreSQL test is; CI sets it):

* a one-shot ``agora db upgrade`` migrates a fresh database (``agora serve`` refuses it
  before, naming that command);
* two registry replicas (``agora serve``, uvicorn) on two ports, with no
  ``AGORA_AUTO_MIGRATE``, sharing nothing but the database and an S3 bucket (moto's server
  on loopback); each has its own data directory (staging) and its own retrieval index;
* two ``agora worker`` processes with one worker token minted by ``agora admin
  create-token``: ``w-a`` leases evaluations (checks on arrival, forgetting measurements)
  through replica A, ``w-b`` compositions through replica B. Each flow below needs both.

Then, through the SDK and the CLI only (the database and the bucket are only read, to
check where things landed): the base and three experts go to A; their checks on arrival
run on ``w-a`` and activate them through A; B's search finds them (B's FAISS index catches
up through the version counter, docs/retrieval.md "Replicas") and puts the held-out
domain's expert first; B takes a composition by text, ``w-b`` computes it, A serves it,
and the loaded model scores that text better than the base. The expert is disabled through
A (the CLI); through B it leaves search, its weights and the composition answer 451, and
the forgetting reports (measured by ``w-a``, docs/governance.md "Proof of forgetting") show
what was forgotten: on the expert's samples the composition without it gives back most of
its gain over the base, the expert alone is replaced by the base, the other domain does
not move. Every blob is in the bucket and none on a replica's disk.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers.processes import (
    AGORA,
    Processes,
    Trained,
    base_env,
    free_port,
    start_registry,
    start_worker,
    wait_until,
)
from s3_fixture import S3_ENV

from registry.client import Agora, SearchResults, UnavailableForLegalReasons
from registry.client.models import ForgettingReport

pytestmark = pytest.mark.slow

DOMAIN = "licenses"  # the domain searched for, composed for, and whose expert is disabled
JOB_TIMEOUT_S = 300.0
# Longer than AGORA_RETRIEVAL_REFRESH_SECONDS (2 s) by far: a replica that never catches
# up fails here instead of passing by luck.
CATCH_UP_TIMEOUT_S = 60.0
# Searches are rate limited to 0.5/s per token (burst 10): one poll a second stays under.
SEARCH_POLL_S = 1.0


@pytest.fixture
def topology_procs(
    empty_database_url: str, s3_storage_url: str, procs: Processes
) -> Iterator[Processes]:
    """The test's processes, all stopped before its database and its bucket are dropped."""
    yield procs
    procs.stop_all()


def _agora(env: Mapping[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGORA, *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _base_bits_per_byte(trained: Trained, texts: list[str]) -> float:
    import torch

    from modelcore.artifacts import load_base
    from modelcore.eval import evaluate

    # One thread, as the workers run; restored, so the rest of the session keeps its own.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundle = load_base(trained.base_dir)
        scores = evaluate(bundle.model, bundle.tokenizer, {"t": texts})
    finally:
        torch.set_num_threads(previous)
    return float(scores["t"]["bits_per_byte"])


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _files_by_digest(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[hashlib.sha256(path.read_bytes()).hexdigest()] = path
    return found


def _bucket_digests(endpoint: str, storage_url: str) -> set[str]:
    import boto3

    from registry.storage.base import digest_of_key

    bucket = storage_url.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for obj in page.get("Contents", [])
    ]
    return {d for d in (digest_of_key(k) for k in keys) if d is not None}


def _search_on(agora: Agora, texts: list[str], revision: str) -> SearchResults:
    return agora.search(texts, revision, k=3)


# postgres_admin_url first: without PostgreSQL the test skips before training its models.
@pytest.mark.usefixtures("postgres_admin_url")
@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_two_replicas_and_two_workers_on_postgresql_and_s3(
    empty_database_url: str,
    s3_server: str,
    s3_storage_url: str,
    topology_procs: Processes,
    trained: Trained,
    tmp_path: Path,
) -> None:
    procs = topology_procs
    database_url = empty_database_url

    # -- migrate once, as the compose file's one-shot does ---------------------------------
    plain = base_env(AGORA_DATABASE_URL=database_url, AGORA_DATA_DIR=str(tmp_path / "ops"))
    port = str(free_port())
    refused = _agora(plain, tmp_path, "serve", "--host", "127.0.0.1", "--port", port)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "agora db upgrade" in refused.stderr
    upgraded = _agora(plain, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "is at revision" in upgraded.stdout

    # -- two replicas, one database, one bucket, nothing else shared -----------------------
    shared = {
        "AGORA_STORAGE_URL": s3_storage_url,
        "AGORA_S3_ENDPOINT_URL": s3_server,
        "AGORA_ARRIVAL_CHECKS": "true",
        **S3_ENV,
    }
    a = start_registry(
        procs, tmp_path / "a" / "data", database_url, settings=shared, auto_migrate=False
    )
    b = start_registry(
        procs, tmp_path / "b" / "data", database_url, settings=shared, auto_migrate=False
    )

    admin_token = a.cli_create_token("admin", "ops")
    user_token = a.cli_create_token("contributor", "alice")
    worker_token = a.cli_create_token("worker", "compose-worker")
    w_a = start_worker(procs, a, worker_token, name="w-a", kinds=["evaluate"])
    w_b = start_worker(procs, b, worker_token, name="w-b", kinds=["compose"])

    texts = trained.heldout[DOMAIN][:4]
    base_bpb = _base_bits_per_byte(trained, texts)
    sdk = tmp_path / "sdk"
    with (
        Agora(a.url, token=admin_token, cache_dir=sdk / "admin") as admin_a,
        # One user with one local cache, talking to either replica.
        Agora(a.url, token=user_token, cache_dir=sdk / "alice") as alice_a,
        Agora(b.url, token=user_token, cache_dir=sdk / "alice") as alice_b,
    ):
        # -- the base and the experts go to A; their checks on arrival run on w-a ----------
        base = trained.base_dir
        uploaded = admin_a.upload_base_model(
            base / "config.json", base / "tokenizer.json", base / "model.safetensors"
        )
        revision = uploaded.revision
        assert revision == trained.revision
        experts: dict[str, str] = {}
        for domain, weights in trained.experts.items():
            submitted = alice_a.submit_expert(weights, trained.datasheets[domain], revision)
            assert submitted.status == "quarantined", submitted
            experts[domain] = submitted.id
        for domain, expert_id in experts.items():
            arrived = alice_a.wait_for_arrival(expert_id, timeout=JOB_TIMEOUT_S, interval=0.3)
            assert arrived.status == "active", (domain, arrived.arrival)
        target = experts[DOMAIN]

        # -- B's index learns of experts A activated ---------------------------------------
        def caught_up() -> SearchResults | None:
            results = _search_on(alice_b, texts, revision)
            return results if len(results.results) == 3 else None

        found = wait_until(
            caught_up,
            timeout=CATCH_UP_TIMEOUT_S,
            interval=SEARCH_POLL_S,
            message="replica B's search to return the three experts activated through A",
        )
        assert set(found.expert_ids) == set(experts.values())
        assert found.expert_ids[0] == target, found

        # -- composed through B (w-b computes it), served by A, better than the base -------
        handle = alice_b.compose("ensemble", base_revision=revision, texts=texts, k=2)
        composition = handle.wait(timeout=JOB_TIMEOUT_S, poll=0.3)
        assert composition.manifest is not None
        used = {ref.id for ref in composition.manifest.experts}
        assert target in used, composition.manifest
        served = alice_a.get_composition(composition.id)
        assert served.status == "ready"
        model = alice_a.load_composed(composition.id)
        composed_bpb = model.bits_per_byte(texts)["bits_per_byte"]
        assert composed_bpb < base_bpb - 0.005, (composed_bpb, base_bpb)

        # -- every blob is in the bucket, none on a replica's disk -------------------------
        blobs = {_hex(f.digest) for f in (uploaded.files.config, uploaded.files.tokenizer)}
        blobs.add(_hex(uploaded.files.weights.digest))
        for expert_id in experts.values():
            blobs.update(_hex(v.digest) for v in alice_a.get_expert(expert_id).versions)
        assert len(blobs) == 6
        assert blobs <= _bucket_digests(s3_server, s3_storage_url)
        for replica in (a, b):
            on_disk = _files_by_digest(replica.data_dir)
            assert not blobs & set(on_disk), {d: on_disk[d] for d in blobs & set(on_disk)}

        # -- disabled through A (the CLI) ------------------------------------------------
        out = a.cli(
            "expert",
            "disable",
            target,
            "--reason",
            "license complaint upheld",
            "--registry",
            a.url,
            "--token",
            admin_token,
        )
        assert f"{target} is disabled" in out

        # -- ... and through B: gone from search, 451 for its weights and the composition -
        wait_until(
            lambda: target not in _search_on(alice_b, texts, revision).expert_ids,
            timeout=CATCH_UP_TIMEOUT_S,
            interval=SEARCH_POLL_S,
            message=f"replica B's search to drop {target}, disabled through A",
        )
        remaining = _search_on(alice_b, texts, revision)
        assert set(remaining.expert_ids) == set(experts.values()) - {target}
        assert alice_b.get_expert(target).status == "disabled"
        # The composition's load above cached the weights: the cache asks the registry first.
        with pytest.raises(UnavailableForLegalReasons) as weights_refused:
            alice_b.download(target)
        assert weights_refused.value.status == 451
        assert weights_refused.value.code == "expert_disabled"
        with pytest.raises(UnavailableForLegalReasons) as composition_refused:
            alice_b.get_composition(composition.id)
        assert composition_refused.value.code == "expert_disabled"
        with pytest.raises(UnavailableForLegalReasons):
            alice_b.load_composed(composition.id)
        # A client's CLI: the replica's URL and a token, no database or storage settings.
        cli_env = base_env(
            AGORA_REGISTRY_URL=b.url, AGORA_TOKEN=user_token, AGORA_CACHE_DIR=str(sdk / "cli")
        )
        cli_download = _agora(cli_env, tmp_path, "expert", "download", target)
        assert cli_download.returncode == 1, cli_download.stdout + cli_download.stderr
        assert "expert_disabled" in cli_download.stderr

        # -- the proof of forgetting, measured by w-a, read through B ----------------------
        def reports() -> list[ForgettingReport] | None:
            items = alice_b.moderation.forgetting(target)
            return items if len(items) == 2 and all(r.status != "pending" for r in items) else None

        wait_until(
            reports,
            timeout=JOB_TIMEOUT_S,
            interval=0.5,
            message=f"the two forgetting reports of {target} to be measured",
        )
    printed = _agora(cli_env, tmp_path, "expert", "forgetting", target, "--json")
    assert printed.returncode == 0, printed.stdout + printed.stderr
    by_subject: dict[str | None, dict[str, Any]] = {}
    for line in printed.stdout.splitlines():
        report = json.loads(line)
        by_subject[report["composition_id"]] = report
    assert set(by_subject) == {composition.id, None}, by_subject
    for report in by_subject.values():
        assert report["status"] == "ready", report
    alone = by_subject[None]
    mixed = by_subject[composition.id]
    assert (alone["method"], alone["without_method"]) == ("expert", "base")
    assert (mixed["method"], mixed["without_method"]) == ("ensemble", "ensemble")
    assert mixed["removed"] == [target]
    # On its own samples the expert, alone or in the composition, beat the base (measured:
    # -1.6% and -2.7%); without it the composition gave back most of that gain (measured:
    # -0.7% left, from what the other expert and the base path still contribute) ...
    assert alone["domain"]["with_vs_base"] < -0.005, alone
    assert alone["domain"]["without"] == pytest.approx(alone["domain"]["base"], rel=1e-6)
    assert mixed["domain"]["with_vs_base"] < -0.005, mixed
    assert abs(mixed["domain"]["without_vs_base"]) < abs(mixed["domain"]["with_vs_base"]) / 2, mixed
    # ... and the other expert's domain did not move (measured: -0.06%).
    assert len(mixed["others"]) == 1, mixed
    for other in mixed["others"].values():
        assert abs(other["change"]) < 0.01, mixed

    # Each worker did its kind of jobs through its own replica: w-a the three checks on
    # arrival and the two forgetting measurements, w-b the composition.
    done = a.query("SELECT r.worker, j.kind FROM job_results r JOIN jobs j ON j.id = r.job_id")
    assert sorted((row["worker"], row["kind"]) for row in done) == [
        *[("w-a", "evaluate")] * 5,
        ("w-b", "compose.ensemble"),
    ], done
    assert w_a.alive(), w_a.log()
    assert w_b.alive(), w_b.log()
