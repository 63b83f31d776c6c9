"""`agora demo` as a newcomer runs it, at the tiny preset: a real `agora serve` of its own
(SQLite, its in-process worker, checks on arrival on), the SDK through HTTP, the job queue.

The first run trains everything and prints the results as JSON; the second finds every
trained file in its cache and every composition and evaluation in its state, and only
disables (and measures the forgetting) again. A run against a registry given by URL (with
its own `agora worker`) reuses the same cache. Bad options are refused before anything is
trained.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.processes import AGORA, Processes, base_env, start_registry, start_worker

pytestmark = pytest.mark.slow

TINY = [
    "--preset",
    "tiny",
    "--base-steps",
    "40",
    "--expert-steps",
    "15",
    "--distill-steps",
    "3",
    "--max-bytes-per-domain",
    str(64 * 1024),
    "--json",
    "--no-progress",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr[-4000:]
        return json.loads(self.stdout)


def demo(directory: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    done = subprocess.run(
        [*AGORA, "demo", "--dir", str(directory), *args],
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class TwoRuns:
    directory: Path
    first: Run
    second: Run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> TwoRuns:
    directory = tmp_path_factory.mktemp("demo") / "agora-demo"
    first = demo(directory, *TINY)
    second = demo(directory, *TINY)
    return TwoRuns(directory, first, second)


def front_matter(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---\n", 2)[1])  # type: ignore[no-any-return]


def test_the_demo_publishes_composes_and_measures_every_domain(two_runs: TwoRuns) -> None:
    result = two_runs.first.result
    names = {e["name"]: e for e in result["experts"]}
    # One expert per domain with text on this machine (two at least) and one per cluster.
    assert {"licenses", "python_docs", "cluster-0", "cluster-1"} <= set(names)
    assert all(e["status"] in {"active", "quarantined"} for e in names.values())
    assert all(e["arrival_base_bits_per_byte"] is not None for e in names.values())
    named = {n for n, e in names.items() if e["kind"] == "domain"}
    assert named == {"licenses", "python_docs"}
    # The unlabelled pool's domains are scored too; their experts are the clusters.
    assert set(result["domains"]) == named | set(result["unlabeled"])
    assert "package_readmes" in result["unlabeled"]
    for domain, row in result["domains"].items():
        assert len(row["found"]) >= 2, domain
        assert row["found"][0]["name"] is not None
        for column in ("base", "best_single", "ensemble", "average", "distill"):
            assert isinstance(row[column], float), (domain, column)
        assert row["best_single"] == min(row["singles"].values())
        assert row["best_single_expert"] in row["singles"]
        # The ensemble has the base as a path: never more than a hair worse than it (its
        # posterior starts at the prior and learns the fit token by token).
        assert row["ensemble"] <= row["base"] * 1.002, (domain, row)
    # The table went to results.json too, and the datasheets name their real sources.
    saved = json.loads((two_runs.directory / "results.json").read_text(encoding="utf-8"))
    assert saved["domains"] == two_runs.second.result["domains"]  # the last run's
    docs = front_matter(two_runs.directory / "datasheets" / "python_docs.md")
    assert docs["license"] == "PSF-2.0"
    assert any("pydoc_data" in s["name"] for s in docs["sources"])
    licenses = front_matter(two_runs.directory / "datasheets" / "licenses.md")
    assert all(s["name"].endswith("(license files)") for s in licenses["sources"])
    assert all(s["license"] for s in licenses["sources"])


def test_disabling_one_expert_returns_its_domain_to_the_base(two_runs: TwoRuns) -> None:
    forgetting = two_runs.first.result["forgetting"]
    experts = {e["id"]: e["name"] for e in two_runs.first.result["experts"]}
    assert experts[forgetting["expert_id"]] == forgetting["domain"] == "licenses"
    reports = forgetting["reports"]
    assert reports
    assert all(r["status"] == "ready" for r in reports), reports
    alone = [r for r in reports if r["composition_id"] is None]
    assert len(alone) == 1
    # Without the expert the model is exactly the base, and it was not the base with it.
    assert alone[0]["without"] == alone[0]["base"]
    assert alone[0]["with"] != alone[0]["base"]
    # Every composition of the licenses text that used it was measured without it.
    used = {c for c in two_runs.first.result["domains"]["licenses"]["compositions"].values()}
    assert used <= {r["composition_id"] for r in reports}
    for r in reports:
        if r["composition_id"] is not None:
            assert r["others"] >= 1
            assert r["others_max_change"] is not None
    assert forgetting["found_by_search_after"] is False
    assert forgetting["restored"] is True


def test_a_second_run_trains_nothing_and_asks_for_nothing_again(two_runs: TwoRuns) -> None:
    first, second = two_runs.first.result, two_runs.second.result
    assert "trained in" in two_runs.first.stderr
    assert "trained in" not in two_runs.second.stderr
    assert "(cached)" in two_runs.second.stderr
    assert all(e["cached"] for e in second["experts"])
    assert [e["id"] for e in second["experts"]] == [e["id"] for e in first["experts"]]
    for domain, row in first["domains"].items():
        again = second["domains"][domain]
        assert again["compositions"] == row["compositions"], domain
        assert again["ensemble"] == row["ensemble"]
        assert again["distill"] == row["distill"]
    # The same expert version in the same compositions: the first run's proof of forgetting
    # is read back from the registry, not measured again.
    assert second["forgetting"]["reused"] is True
    assert second["forgetting"]["moderation_action"] == first["forgetting"]["moderation_action"]
    assert second["forgetting"]["reports"] == first["forgetting"]["reports"]
    assert second["timings_s"]["training"] < first["timings_s"]["training"]


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_the_demo_runs_against_a_registry_given_by_url(
    two_runs: TwoRuns, empty_database_url: str, tmp_path: Path
) -> None:
    procs = Processes(tmp_path / "logs")
    try:
        registry = start_registry(procs, tmp_path / "data", empty_database_url)
        # Trusted, as the compose file mints it: its averages and distillations need no
        # second worker's check.
        worker_token = registry.cli(
            "admin", "create-token", "--role", "worker", "--name", "w1", "--trusted"
        )
        start_worker(procs, registry, worker_token.splitlines()[-1].strip(), name="w1")
        admin = registry.create_token("admin", "ops")
        run = demo(
            two_runs.directory,
            *TINY,
            "--registry",
            registry.url,
            "--token",
            admin,
            "--keep-disabled",
        )
        result = run.result
        assert "trained in" not in run.stderr  # the same cache as the embedded runs
        assert result["base_revision"] == two_runs.first.result["base_revision"]
        ids = {e["id"] for e in result["experts"]}
        assert ids.isdisjoint({e["id"] for e in two_runs.first.result["experts"]})
        assert registry.scalar("SELECT count(*) FROM experts") >= len(ids)
        assert result["forgetting"]["reports"]
        # --keep-disabled: the expert stays disabled on that registry after the demo.
        assert result["forgetting"]["restored"] is False
        status = registry.scalar(
            "SELECT status FROM experts WHERE id = :id", id=result["forgetting"]["expert_id"]
        )
        assert status == "disabled"
    finally:
        procs.stop_all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--disable", "poetry"], "--disable must be one of"),
        (["--registry", "127.0.0.1:8000", "--token", "t"], "must be an http(s) URL"),
        (["--registry", "http://127.0.0.1:9"], "needs an admin token"),
        (["--preset", "molm_4b_k2"], "--preset must be tiny or small"),
    ],
)
def test_bad_options_are_refused_before_anything_is_trained(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run = demo(tmp_path / "d", *args)
    assert run.returncode == 2
    assert message in run.stderr
    assert not (tmp_path / "d").exists()


def test_an_unreachable_registry_is_named_before_anything_is_trained(tmp_path: Path) -> None:
    run = demo(tmp_path / "d", "--registry", "http://127.0.0.1:9", "--token", "agora_x")
    assert run.returncode == 1
    assert "cannot use the registry at http://127.0.0.1:9" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "d").exists()
