"""`agora worker` and the `agora serve` hook, against the registry app behind a real uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_datasheet
from typer.testing import CliRunner

from registry.client import Agora


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The registry app on a loopback port (uvicorn in a thread) with tokens and a base."""
    import uvicorn

    from registry.app import create_app
    from registry.services.tokens import create_token
    from registry.settings import Settings

    app = create_app(Settings(data_dir=tmp_path / "agora", database_url=database_url))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn died"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    runtime = app.state.runtime
    secrets: dict[str, str] = {}
    with runtime.sessions() as session, session.begin():
        for name, role in [("admin", "admin"), ("alice", "contributor"), ("worker", "worker")]:
            _, secrets[name] = create_token(session=session, name=name, role=role)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "tokens": secrets, "data_dir": tmp_path}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def published(live, tiny, tmp_path: Path) -> dict[str, Any]:
    with Agora(live["url"], token=live["tokens"]["admin"], cache_dir=tmp_path / "c") as admin:
        base = tiny["base"]
        admin.upload_base_model(
            base / "config.json", base / "tokenizer.json", base / "model.safetensors"
        )
        sheet = make_datasheet(name="Py", domain="Python code.", samples=["def f(): pass"])
        expert = admin.submit_expert(tiny["experts"]["a"], sheet.decode(), tiny["revision"])
    return {"expert": expert}


def _compose(live: dict[str, Any], tiny, texts, tmp_path: Path) -> tuple[Agora, Any]:
    alice = Agora(live["url"], token=live["tokens"]["alice"], cache_dir=tmp_path / "alice")
    return alice, alice.compose(
        "mixture",
        base_revision=tiny["revision"],
        experts=[alice.list_experts_page().items[0].id],
        texts=texts,
    )


def test_agora_worker_runs_jobs_until_max_jobs(live, published, tiny, texts, tmp_path) -> None:
    from agora.cli import build_app

    alice, handle = _compose(live, tiny, texts, tmp_path)
    result = CliRunner().invoke(
        build_app(),
        [
            "worker",
            "--registry",
            live["url"],
            "--device",
            "cpu",
            "--kinds",
            "compose",
            "--poll-interval",
            "0.05",
            "--max-jobs",
            "1",
            "--cache-dir",
            str(tmp_path / "wc"),
            "--name",
            "cli-w",
        ],
        env={"AGORA_TOKEN": live["tokens"]["worker"]},
    )
    assert result.exit_code == 0, result.output
    job = alice.get_job(handle.job_id)
    assert job.status == "succeeded"
    assert job.result is not None
    assert job.result["metrics"]["bytes"] == sum(len(t.encode()) for t in texts)
    alice.close()


def test_agora_worker_refuses_bad_input(live, tmp_path) -> None:
    from agora.cli import build_app

    app = build_app()
    no_token = CliRunner().invoke(
        app, ["worker", "--registry", live["url"]], env={"AGORA_TOKEN": ""}
    )
    assert no_token.exit_code == 2
    assert "token" in no_token.output
    bad_kind = CliRunner().invoke(
        app, ["worker", "--registry", live["url"], "--token", "x", "--kinds", "compose.soup"]
    )
    assert bad_kind.exit_code == 2
    assert "compose.soup" in bad_kind.output
    wrong_role = CliRunner().invoke(
        app,
        [
            "worker",
            "--registry",
            live["url"],
            "--token",
            live["tokens"]["alice"],
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "wc"),
        ],
    )
    assert wrong_role.exit_code == 2
    assert "refused this token" in wrong_role.output


def test_sigterm_stops_an_idle_worker_process(live, tmp_path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from agora.cli import main; main()",
            "worker",
            "--registry",
            live["url"],
            "--device",
            "cpu",
            "--poll-interval",
            "0.1",
            "--cache-dir",
            str(tmp_path / "wc"),
        ],
        env={**os.environ, "AGORA_TOKEN": live["tokens"]["worker"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        # The start line is logged once the signal handlers are in place.
        while not any("kinds all" in line for line in lines):
            line = process.stdout.readline()
            assert line, f"the worker exited: {''.join(lines)}"
            lines.append(line)
        time.sleep(0.3)  # polling an empty queue
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=20)
        output = "".join(lines) + rest
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopped after 0 job(s)" in output


def test_serve_hook_runs_an_in_process_worker(live, published, tiny, texts, tmp_path) -> None:
    from agora.commands.worker import start_embedded

    stop = start_embedded(live["url"], live["tokens"]["worker"], live["data_dir"])
    try:
        alice, handle = _compose(live, tiny, texts, tmp_path)
        composition = handle.wait(timeout=60, poll=0.1)
        assert composition.status == "ready"
        assert (live["data_dir"] / "worker-cache" / "bases" / tiny["revision"]).is_dir()
        alice.close()
    finally:
        started = time.monotonic()
        stop()
        assert time.monotonic() - started < 5  # idle: it stops at once
