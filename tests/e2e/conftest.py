"""Fixtures of the end-to-end job tests: real `agora serve` and `agora worker` processes.

* ``trained``: a tiny base pretrained on three real corpus domains and one expert per domain
  of ``EXPERT_DOMAINS`` (insertion training), saved as files, once per test session.
* ``procs``: the processes a test starts; all stopped at teardown, and their logs attached
  to the report of a failed test.
* ``launch``: starts a registry on ``empty_database_url`` (SQLite and PostgreSQL; a test
  narrows it with ``@pytest.mark.parametrize("empty_database_url", ["postgresql"],
  indirect=True)``), with extra ``AGORA_...`` settings.
* ``publish``: uploads the trained base and experts (with datasheets whose samples are the
  domain's text) to a registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers.artifacts import make_datasheet
from helpers.processes import Processes, Published, Registry, Trained, start_registry

# Domains with an expert. The base is pretrained on modelcore.compose.experiments'
# BASE_DOMAINS, so "licenses" and "python_docs" are new to it (DEMix's setting) and
# "c_headers" is one it knows: an expert that retrieval should not pick for licenses.
EXPERT_DOMAINS = ("licenses", "python_docs", "c_headers")
LICENSES = {"licenses": "CC0-1.0", "python_docs": "PSF-2.0", "c_headers": "MIT"}
SAMPLE_BYTES = 12 * 1024
BASE_STEPS = 100
EXPERT_STEPS = 70

_PROCS = pytest.StashKey[Processes]()


def _samples(texts: Sequence[str], budget: int) -> list[str]:
    out: list[str] = []
    used = 0
    for text in texts:
        piece = text[: max(0, budget - used)]
        if not piece.strip():
            break
        out.append(piece)
        used += len(piece.encode("utf-8"))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train once per session (about half a minute on one thread) and save as files."""
    import torch

    from modelcore.artifacts import save_base
    from modelcore.compose import experiments as cx
    from modelcore.experts import save_expert
    from modelcore.train import experiments as ex

    root = tmp_path_factory.mktemp("e2e-trained")
    setup = dataclasses.replace(cx.ComposeSetup(), base_steps=BASE_STEPS, expert_steps=EXPERT_STEPS)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prep = ex.prepare(setup.inner, cache_dir=root / "corpus")
        base = cx.train_base(setup, prep, seed=0)
        tensors = {d: cx.train_domain_expert(setup, prep, base, d, seed=0) for d in EXPERT_DOMAINS}
    finally:
        torch.set_num_threads(previous)
    revision = save_base(root / "base", base, prep.tokenizer)
    experts: dict[str, Path] = {}
    datasheets: dict[str, Path] = {}
    for domain in EXPERT_DOMAINS:
        experts[domain] = root / f"{domain}.safetensors"
        save_expert(experts[domain], tensors[domain], base_revision=revision)
        datasheets[domain] = root / f"{domain}.md"
        datasheets[domain].write_bytes(
            make_datasheet(
                name=f"{domain} expert",
                domain=f"Text of the {domain.replace('_', ' ')} domain of the test corpus.",
                license=LICENSES[domain],
                samples=_samples(prep.corpus.domains[domain].train, SAMPLE_BYTES),
                tags=[domain.replace("_", "-")],
            )
        )
    heldout = {d: list(texts) for d, texts in prep.heldout.items()}
    return Trained(root / "base", revision, experts, datasheets, heldout)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    procs = item.stash.get(_PROCS, None)
    if procs is not None and report.failed:
        for name, text in procs.logs():
            report.sections.append((f"log of {name}", text))


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path / "logs")
    request.node.stash[_PROCS] = processes
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
def launch(
    empty_database_url: str, procs: Processes, tmp_path: Path
) -> Iterator[Callable[..., Registry]]:
    """``launch(**settings)``: a registry on this test's backend; settings such as
    ``AGORA_JOB_MAX_ATTEMPTS="2"`` go to its environment. One per test.

    Every process stops before the test database is dropped (this fixture's teardown
    runs before that of the database it depends on).
    """

    def start(**settings: str) -> Registry:
        return start_registry(procs, tmp_path / "data", empty_database_url, settings=settings)

    yield start
    procs.stop_all()


@pytest.fixture
def publish(trained: Trained) -> Callable[..., Published]:
    """``publish(registry, domains=EXPERT_DOMAINS)``: tokens, the base, and the experts."""

    def run(registry: Registry, domains: Sequence[str] = EXPERT_DOMAINS) -> Published:
        from registry.client import Agora

        admin_token = registry.create_token("admin", "root")
        user_token = registry.create_token("contributor", "alice")
        with Agora(registry.url, token=admin_token, cache_dir=registry.data_dir / "c") as admin:
            base = trained.base_dir
            uploaded = admin.upload_base_model(
                base / "config.json", base / "tokenizer.json", base / "model.safetensors"
            )
        assert uploaded.revision == trained.revision
        experts: dict[str, str] = {}
        digests: dict[str, str] = {}
        with Agora(registry.url, token=user_token, cache_dir=registry.data_dir / "c") as user:
            for domain in domains:
                submitted = user.submit_expert(
                    trained.experts[domain], trained.datasheets[domain], trained.revision
                )
                experts[domain] = submitted.id
                digests[domain] = user.get_expert(submitted.id).versions[-1].digest
        return Published(trained.revision, experts, admin_token, user_token, digests)

    return run
