# Entry points: `make run`, `make demo` and `make test`. Everything else is a helper of those.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: the CPU build lies on this machine's disk, and a
# plain `torch` requirement resolved later would otherwise pull gigabytes of CUDA wheels.
TORCH  ?= torch==2.13.0
# Pinned third-party versions: the corpus the tests train on is read from installed
# distributions, so unpinned releases would change the models and the numbers tests check.
PIN    := -c constraints.txt
TRITON ?= triton==3.6.0
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test lint typecheck contracts pytest install install-dev browser compose-tool demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) $(TORCH)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q $(PIN) $(TORCH) $(TRITON) -e '.[all]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q $(PIN) $(TORCH) -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/agora serve --host $(HOST) --port $(PORT)

# The whole system on this machine's own text (docs/demo.md): trains a small base and
# experts (cached in ./agora-demo), composes them through its own registry, then forgets one.
demo: install
	$(BIN)/agora demo $(DEMO_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

contracts: install-dev
	$(BIN)/lint-imports

# The browser tests (tests/e2e/test_web_browser.py) drive Debian's Chromium through
# Playwright's Python package; never `playwright install`, which downloads a browser of its
# own. Without its recommends: they pull in ~40 Perl libraries, and the system Perl's
# modules are a corpus domain the harm tests train on (modelcore/data/sources.py).
CHROMIUM_APT := apt-get install -y -q --no-install-recommends chromium
browser:
	@command -v chromium >/dev/null 2>&1 || $(CHROMIUM_APT) \
		|| (apt-get update -q && $(CHROMIUM_APT))

# tests/deploy/test_compose.py checks docker-compose.yml with Debian's docker-compose
# (`docker-compose config`: no Docker engine needed). Without its recommends, as chromium:
# they pull in docker.io, the engine, which nothing here runs.
COMPOSE_APT := apt-get install -y -q --no-install-recommends docker-compose
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || $(COMPOSE_APT) \
		|| (apt-get update -q && $(COMPOSE_APT))

pytest: install-dev browser compose-tool
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck contracts pytest

clean:
	rm -rf $(VENV) .agora agora-demo .pytest_cache .mypy_cache .ruff_cache
