"""Shared, expensive state of the composition tests: per seed, one tiny base pretrained
on three real corpus domains and one expert per new domain, built once per session."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from modelcore.compose import experiments as cx
from modelcore.train import experiments as ex

SEEDS = (0, 1, 2)


@dataclass
class SeedRun:
    seed: int
    base: torch.nn.Module
    experts: dict[str, dict[str, torch.Tensor]]
    cache: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def setup() -> cx.ComposeSetup:
    return cx.ComposeSetup()


@pytest.fixture(scope="session")
def prep(setup: cx.ComposeSetup, tmp_path_factory: pytest.TempPathFactory) -> ex.Prepared:
    return ex.prepare(setup.inner, cache_dir=tmp_path_factory.mktemp("compose-corpus"))


@pytest.fixture(scope="session")
def runs(setup, prep):
    cache: dict[int, SeedRun] = {}

    def get(seed: int) -> SeedRun:
        if seed not in cache:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                base = cx.train_base(setup, prep, seed)
                experts = {
                    d: cx.train_domain_expert(setup, prep, base, d, seed) for d in cx.EXPERT_DOMAINS
                }
            finally:
                torch.set_num_threads(previous)
            cache[seed] = SeedRun(seed, base, experts)
        return cache[seed]

    return get


@pytest.fixture(scope="session")
def saved_base(runs, prep, tmp_path_factory) -> Path:
    """Seed 0's base and experts as files (for the CLI and file round trips)."""
    from modelcore.artifacts import save_base
    from modelcore.experts import save_expert

    run = runs(0)
    root = tmp_path_factory.mktemp("compose-files")
    revision = save_base(root / "base", run.base, prep.tokenizer)
    for name, tensors in run.experts.items():
        save_expert(root / f"{name}.safetensors", tensors, base_revision=revision)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # As in tests/modelcore/train: on a loaded machine one thread is faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
