"""Shared, expensive state of the training tests: the corpus, its tokenizer and ONE
pretrained tiny base per seed, built once per session and cached on disk (as a real base
bundle) under the session's tmp dir; every experiment starts from a fresh copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcore.train import experiments as ex

SEEDS = (0, 1, 2)


class BaseCache:
    """Pretrained bases by (seed, aux), saved with ``save_base`` and loaded per use."""

    def __init__(self, setup: ex.Setup, prep: ex.Prepared, root: Path) -> None:
        self.setup = setup
        self.prep = prep
        self.root = root
        self._bpb: dict[int, dict[str, float]] = {}

    def load(self, seed: int, aux: str = "mi"):
        from modelcore.artifacts import load_base, save_base

        path = self.root / f"{aux}-seed{seed}"
        if not (path / "model.safetensors").is_file():
            model = ex.train_base(self.setup, self.prep, seed, aux=aux)
            save_base(path, model, self.prep.tokenizer)
        return load_base(path).model

    def base_bpb(self, seed: int) -> dict[str, float]:
        if seed not in self._bpb:
            self._bpb[seed] = ex.bpb(self.setup, self.prep, self.load(seed))
        return self._bpb[seed]


@pytest.fixture(scope="session")
def setup() -> ex.Setup:
    return ex.Setup()


@pytest.fixture(scope="session")
def prep(setup: ex.Setup, tmp_path_factory: pytest.TempPathFactory) -> ex.Prepared:
    return ex.prepare(setup, cache_dir=tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def bases(setup: ex.Setup, prep: ex.Prepared, tmp_path_factory) -> BaseCache:
    return BaseCache(setup, prep, tmp_path_factory.mktemp("bases"))


def _per_seed(experiment, setup, prep, bases):
    """``experiment(setup, prep, base, seed, base_bpb=...)`` per seed, computed on first use
    and kept for the session (several tests read each result)."""
    cache: dict = {}

    def get(seed: int):
        if seed not in cache:
            cache[seed] = experiment(
                setup, prep, bases.load(seed), seed, base_bpb=bases.base_bpb(seed)
            )
        return cache[seed]

    return get


@pytest.fixture(scope="session")
def insertion_results(setup, prep, bases):
    """Experiments 1 and 2 (an inserted expert vs finetuning the whole base)."""
    return _per_seed(ex.insertion_vs_full, setup, prep, bases)


@pytest.fixture(scope="session")
def prune_results(setup, prep, bases):
    """Experiment 4 (load concentration, then pruning)."""
    return _per_seed(ex.concentrate_and_prune, setup, prep, bases)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # On a loaded machine a second torch thread spins waiting for a core: one thread is
    # faster (docs/modelcore.md, "Tests and numbers").
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The ``agora`` command in-process, with its own corpus cache; arguments may be paths
    or numbers."""
    from typer.testing import CliRunner

    from agora.cli import build_app

    cache = tmp_path_factory.mktemp("xdg-cache")
    runner = CliRunner()
    app = build_app()

    def run(*args):
        # Wide enough that rich never wraps an error message inside its box.
        env = {"XDG_CACHE_HOME": str(cache), "COLUMNS": "400"}
        return runner.invoke(app, [str(a) for a in args], env=env)

    return run
