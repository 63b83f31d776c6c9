"""The README's quickstart, run as a new user would: real `agora serve`, the CLI, the snippet.

The bash block and the Python snippet are read out of README.md, so the README cannot drift
from what works. Two substitutions only: the server listens on a free port instead of 8000
(the snippet's URL and AGORA_REGISTRY_URL follow it), and `. .venv/bin/activate` becomes
this interpreter's bin directory on PATH. The server uses the hashing embedder to keep the
test fast; MiniLM retrieval has its own test in tests/registry/retrieval.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _block(readme: str, language: str, marker: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", readme, flags=re.S):
        if marker in block:
            return str(block)
    raise AssertionError(f"README.md has no ```{language} block containing {marker!r}")


def _wait_ready(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, "agora serve exited early"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "agora serve did not become ready"
        time.sleep(0.3)


def _environment(tmp_path: Path, url: str) -> dict[str, str]:
    # The corpus keeps the suite's pinned distributions (tests/conftest.py): a test tool
    # installed into this venv must not change the text the quickstart's expert trains on.
    kept = ("AGORA_EMBEDDER", "AGORA_CORPUS_DISTRIBUTIONS")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AGORA_") or key in kept
    }
    env.update(
        AGORA_EMBEDDER="hashing",
        AGORA_REGISTRY_URL=url,
        AGORA_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


def _serve_and_run(
    tmp_path: Path, url: str, port: int, script: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``script`` with bash in ``tmp_path`` against a real ``agora serve``; returns the
    script's result and the server's log (the server is stopped with SIGTERM)."""
    env = _environment(tmp_path, url)
    server = subprocess.Popen(
        [sys.executable, "-m", "agora.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_ready(server, url)
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        # SIGTERM, as a process manager stops it: the in-process worker stops first.
        server.send_signal(signal.SIGTERM)
        try:
            server_log, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server_log, _ = server.communicate()
    return run, server_log


def test_readme_quickstart_round_trips_an_expert(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = _block(readme, "bash", "agora base upload")
    snippet = _block(readme, "python", "from registry.client import Agora")
    assert quickstart.splitlines()[0].strip() == ". .venv/bin/activate"

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "quickstart.py").write_text(snippet.replace("http://127.0.0.1:8000", url))
    script = quickstart.replace(
        ". .venv/bin/activate", f'export PATH="{Path(sys.executable).parent}:$PATH"', 1
    )

    run, server_log = _serve_and_run(tmp_path, url, port, script)

    assert run.returncode == 0, run.stdout + run.stderr + server_log
    # The snippet downloaded exactly the bytes `agora expert train` wrote.
    trained = (tmp_path / "licenses.safetensors").read_bytes()
    assert (tmp_path / "copy.safetensors").read_bytes() == trained
    # The snippet's search found the submitted expert; the CLI listed and searched it too.
    expert_ids = set(re.findall(r"ex_[0-9a-z]{26}", run.stdout))
    assert len(expert_ids) == 1, run.stdout
    assert "Open-source lice" in run.stdout
    assert "embedder hashing" in run.stdout
    # `agora compose` was computed by the server's in-process worker and downloaded; the
    # loaded composition generated text.
    manifest = json.loads((tmp_path / "composed" / "manifest.json").read_text())
    assert manifest["method"] == "ensemble"
    assert [e["id"] for e in manifest["experts"]] == sorted(expert_ids)
    assert "worker:    one in-process" in server_log
    assert "stopping the in-process worker" in server_log
    generated = run.stdout.strip().splitlines()[-1]
    assert generated.strip(), run.stdout
    # The worker token made for that run was revoked at shutdown.
    tokens = subprocess.run(
        [sys.executable, "-m", "agora.cli", "admin", "list-tokens"],
        cwd=tmp_path,
        env=_environment(tmp_path, url),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    embedded = [line for line in tokens.splitlines() if "embedded-worker" in line]
    assert embedded, tokens
    assert all("revoked" in line for line in embedded), tokens


def test_readme_contribute_section_runs_as_written(tmp_path: Path) -> None:
    """ "Contribute an expert from your own text": discover, train, datasheet, check and
    submit, as written, after the quickstart's token, base and upload lines."""
    readme = (ROOT / "README.md").read_text()
    quickstart = _block(readme, "bash", "agora base upload")
    contribute = _block(readme, "bash", "agora data discover")
    assert contribute.splitlines()[0].strip() == ". .venv/bin/activate"
    setup = [
        line
        for line in quickstart.splitlines()
        if any(cmd in line for cmd in ("create-token", "agora base init", "agora base upload"))
    ]
    assert len(setup) == 3, quickstart
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    for folder in ("docs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    activate = f'export PATH="{Path(sys.executable).parent}:$PATH"'
    script = "\n".join([activate, *setup, contribute.replace(". .venv/bin/activate", "", 1)])

    run, server_log = _serve_and_run(tmp_path, url, port, script)

    assert run.returncode == 0, run.stdout + run.stderr + server_log
    clusters = json.loads((tmp_path / "domains" / "clusters.json").read_text())
    assert len(clusters["clusters"]) == 2
    # The train summary: held-out numbers of the base and of the expert on cluster 0.
    summary = next(json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"'))
    # The quickstart's base is untrained, so the expert cannot move them much (that an
    # expert on your own text helps is tests/modelcore/train/test_own_data.py's claim).
    heldout = summary["heldout_bits_per_byte"]
    assert 0 < heldout["expert"] < 20, heldout
    assert 0 < heldout["base"] < 20, heldout
    assert summary["split"]["heldout_documents"] >= 1
    # The datasheet was generated complete (every human field from a flag), the offline
    # check passed, and the registry accepted the pair.
    from registry.validation.datasheet import parse_datasheet

    sheet = parse_datasheet((tmp_path / "mine.md").read_bytes())  # raises if any is unfilled
    assert sheet.name == "Agora design notes"
    assert sheet.token_count == summary["split"]["train_tokens"]
    submitted = re.findall(r"submitted (ex_[0-9a-z]{26}) version 1", run.stdout)
    assert len(submitted) == 1, run.stdout
