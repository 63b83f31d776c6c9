"""`agora serve` as a real process: uvicorn on a free port, answering health checks; and
what a killed one leaves behind, removed by the next start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers.adversarial import scaled
from helpers.processes import (
    Process,
    Processes,
    Registry,
    base_env,
    start_registry,
    wait_until,
)

from agora import server
from registry.storage import Staging


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_agora_serve_answers_health_and_readiness(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "AGORA_DATABASE_URL": database_url,
        "AGORA_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "agora.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                health = httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "storage": "ok"}}
        docs = httpx.get(f"{base}/openapi.json", timeout=5).json()
        assert "/v1/experts" in docs["paths"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert f"{base}/docs" in output
    assert "agora admin create-token --role admin" in output


# -- crash leftovers: what a SIGKILLed `agora serve` leaves, the next start removes -------


def _staging_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "staging").glob("*/upload-*"))


def _stall_upload(registry: Registry, token: str) -> socket.socket:
    """An expert upload whose body stops after its first bytes: the server has opened a
    staging file for the weights and waits for the rest."""
    boundary = "agoraboundary"
    part = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="weights"; filename="e.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"\0" * 4096
    head = (
        "POST /v1/experts HTTP/1.1\r\nHost: registry\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(part) + 1_000_000}\r\n\r\n"
    ).encode()
    host, port = registry.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head + part)
    return sock


def _embedded_tokens(registry: Registry) -> list[dict[str, object]]:
    return registry.query(
        "SELECT name, revoked_at FROM tokens WHERE name LIKE 'embedded-worker%' ORDER BY id"
    )


def test_a_killed_serve_leaves_no_staging_file_and_no_live_worker_token(
    database_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-upload, with the in-process worker on: the upload's staging file and the
    run's worker token survive the kill; the next start removes the one and revokes the
    other, so at most one embedded worker token is ever active (issue 14, defect 8)."""
    procs = Processes(tmp_path / "logs")
    data_dir = tmp_path / "data"
    embedded = {"AGORA_EMBEDDED_WORKER": "true"}
    kills = scaled(1, 8)
    try:
        for kill in range(kills):
            registry = start_registry(procs, data_dir, database_url, settings=embedded)
            sock = _stall_upload(registry, registry.create_token("contributor", f"c{kill}"))
            staged = wait_until(
                lambda: _staging_files(data_dir), timeout=30, interval=0.05, message="staging"
            )
            registry.process.kill()
            sock.close()
            # What the kill left: the half upload, and this run's worker token still active.
            assert all(path.exists() for path in staged)
            active = [t for t in _embedded_tokens(registry) if t["revoked_at"] is None]
            assert len(active) == 1, _embedded_tokens(registry)

        registry = start_registry(procs, data_dir, database_url, settings=embedded)
        assert _staging_files(data_dir) == []
        assert list((data_dir / "staging").iterdir()) == [], "dead runs' directories remain"
        tokens = _embedded_tokens(registry)
        assert len(tokens) == kills + 1
        assert [t["revoked_at"] is None for t in tokens] == [False] * kills + [True]
        assert "revoked:   1 in-process worker token(s) of killed runs" in registry.process.log()
        with registry.http() as http:
            assert http.get("/readyz").status_code == 200
    finally:
        procs.stop_all()
    # A clean stop revokes its own token and gives its claim up.
    assert all(t["revoked_at"] is not None for t in _embedded_tokens(registry))
    assert list((data_dir / "embedded-workers").glob("*.lock")) == []


_HOLD_A_STAGING_FILE = """
import sys, time
from pathlib import Path
from registry.storage import Staging
staged = Staging(Path(sys.argv[1])).new_file()
staged.write(b"half an upload")
print("staging file:", staged.path, flush=True)
time.sleep(600)
"""


def _holder(procs: Processes, root: Path, name: str) -> tuple[Process, Path]:
    """A process with a staging file open in ``root``, as a server mid-upload has."""
    process = procs.start(
        name, [sys.executable, "-c", _HOLD_A_STAGING_FILE, str(root)], env=base_env(), cwd=root
    )
    line = wait_until(
        lambda: next(
            (
                x
                for x in process.log_path.read_text().splitlines()
                if x.startswith("staging file: ")
            ),
            None,
        ),
        timeout=30,
        interval=0.05,
        message=lambda: f"{name} to stage a file: {process.log()}",
    )
    return process, Path(line.removeprefix("staging file: "))


def test_a_start_removes_only_the_staging_files_of_dead_processes(tmp_path: Path) -> None:
    """Processes sharing one staging directory: a start removes what killed ones left and
    never a live one's file, whether the live one is another process or itself."""
    root = tmp_path / "staging"
    root.mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        killed, killed_file = _holder(procs, root, "killed")
        alive, alive_file = _holder(procs, root, "alive")
        killed.kill()

        starting = Staging(root)
        assert starting.open() == [killed_file]
        assert not killed_file.parent.exists()
        assert alive_file.read_bytes() == b"half an upload"

        own = starting.new_file()
        # Another start in the same process (a second app, a CLI command) keeps it too.
        assert Staging(root).open() == []
        assert own.path.exists()
        assert alive_file.exists()

        alive.kill()
        assert Staging(root).open() == [alive_file]
        assert own.path.exists()
        starting.close()
        assert list(root.iterdir()) == []
    finally:
        procs.stop_all()


def test_a_start_revokes_the_tokens_of_dead_runs_only(tmp_path: Path) -> None:
    """The embedded SQLite registry: tokens of killed runs (claimed, or from before runs
    had claims) are revoked at start, a live run's token is kept."""
    from sqlalchemy import select

    from registry.app import build_runtime
    from registry.db.models import Token
    from registry.metrics import Metrics
    from registry.services.tokens import create_token
    from registry.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    runtime = build_runtime(settings, Metrics())
    try:
        live = server.claim_embedded_worker(settings)
        dead = server.claim_embedded_worker(settings)
        dead_name = dead.name
        dead.release()
        # A killed run: its lock file stays, and nobody holds it.
        (settings.data_dir / server.EMBEDDED_WORKER_RUNS / f"{dead_name}.lock").touch()
        with runtime.sessions() as session, session.begin():
            for name in (live.name, dead_name, server.LEGACY_EMBEDDED_WORKER, "someone-else"):
                create_token(session=session, name=name, role="worker")

        assert server.revoke_dead_embedded_workers(settings, runtime) == 2
        with runtime.sessions() as session:
            active = set(session.scalars(select(Token.name).where(Token.revoked_at.is_(None))))
        assert active == {live.name, "someone-else"}
        assert [p.stem for p in live.directory.glob("*.lock")] == [live.name]
        assert server.revoke_dead_embedded_workers(settings, runtime) == 0
        live.release()
    finally:
        runtime.staging.close()
        runtime.engine.dispose()
