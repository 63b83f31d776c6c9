"""The workers' healthcheck in docker-compose.yml, run against a real worker's heartbeat file.

The worker (`agora worker --heartbeat-file`) touches the file at every poll and every lease
heartbeat; the healthcheck fails when the file is missing or older than its limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from registry.client import Agora
from registry.client.models import Job, LeasedJob
from worker import runner as runner_mod
from worker.runner import Worker

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def worker_service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    service: dict[str, Any] = services[name]
    return service


def healthcheck(name: str) -> tuple[list[str], str, int]:
    """The service's healthcheck command, the heartbeat file it reads, and its age limit."""
    service = worker_service(name)
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    command = " ".join(service["entrypoint"])
    heartbeat = re.search(r"--heartbeat-file (\S+)", command)
    assert heartbeat, f"{name} runs its worker without --heartbeat-file"
    path = heartbeat[1]
    assert f"os.stat('{path}')" in test[3], "the healthcheck reads another file"
    limit = re.search(r"> (\d+)\)$", test[3])
    assert limit
    return test[1:], path, int(limit[1])


def run_check(command: list[str], compose_path: str, actual: Path) -> int:
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    argv = [arg.replace(compose_path, str(actual)) for arg in argv]
    return subprocess.run(argv, check=False, timeout=60).returncode


def idle_agora(tmp_path: Path, on_lease: Any) -> Agora:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/lease"
        on_lease()
        return httpx.Response(204)  # the queue is empty

    return Agora(
        "http://registry.invalid",
        token="t",
        transport=httpx.MockTransport(handler),
        max_retries=0,
        cache_dir=tmp_path / "cache",
    )


@pytest.mark.parametrize("service", ["worker", "worker-cpu"])
def test_the_healthcheck_follows_the_worker_heartbeat_file(service, tmp_path) -> None:
    command, compose_path, limit = healthcheck(service)
    alive = tmp_path / "alive"
    assert run_check(command, compose_path, alive) != 0  # not started yet: unhealthy

    polls = []
    worker: Worker

    def on_lease() -> None:
        polls.append(alive.stat().st_mtime)  # touched before each poll
        if len(polls) == 3:
            worker.request_stop()

    worker = Worker(
        idle_agora(tmp_path, on_lease), name="w", poll_interval=0.01, heartbeat_file=alive
    )
    assert worker.run() == 0
    assert len(polls) == 3
    assert run_check(command, compose_path, alive) == 0

    # A worker that stopped turning: its file ages past the limit.
    stale = time.time() - limit - 5
    os.utime(alive, (stale, stale))
    assert run_check(command, compose_path, alive) != 0
    alive.unlink()
    assert run_check(command, compose_path, alive) != 0


def test_agora_worker_touches_the_file_its_option_names(tmp_path) -> None:
    """`agora worker --heartbeat-file` against a stub registry: one empty poll, then a
    refused token (the worker exits 2); the file was touched."""
    from agora.cli import build_app

    leases: list[str] = []

    class Registry(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            leases.append(self.path)
            if len(leases) == 1:
                self.send_response(204)
                self.end_headers()
                return
            body = json.dumps({"code": "unauthenticated", "title": "bad token", "status": 401})
            self.send_response(401)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    alive = tmp_path / "alive"
    try:
        result = CliRunner().invoke(
            build_app(),
            [
                "worker",
                "--registry",
                f"http://127.0.0.1:{server.server_port}",
                "--token",
                "agora_stub",
                "--device",
                "cpu",
                "--poll-interval",
                "0.05",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--heartbeat-file",
                str(alive),
            ],
        )
    finally:
        server.shutdown()
        thread.join(10)
    assert result.exit_code == 2, result.output
    assert "refused this token" in result.output
    assert leases == ["/v1/jobs/lease", "/v1/jobs/lease"]
    assert alive.exists()


def test_an_unwritable_heartbeat_file_does_not_stop_the_worker(tmp_path) -> None:
    polls: list[int] = []
    worker: Worker

    def on_lease() -> None:
        polls.append(1)
        worker.request_stop()

    worker = Worker(
        idle_agora(tmp_path, on_lease), heartbeat_file=tmp_path / "no-such-dir" / "alive"
    )
    assert worker.run() == 0
    assert polls == [1]


def test_a_running_job_keeps_the_heartbeat_file_fresh(tmp_path) -> None:
    """During a long job the loop does not turn: the lease's heartbeat thread touches the
    file, whether or not the registry answers."""
    ticks = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("registry down")

    agora = Agora(
        "http://registry.invalid",
        token="t",
        transport=httpx.MockTransport(handler),
        max_retries=0,
        cache_dir=tmp_path / "cache",
    )
    job = LeasedJob.model_construct(job=Job.model_construct(id="job_1"), fencing_token=1)
    lease = runner_mod._Lease(agora, job, 0.01, ticks.set)
    lease.start()
    try:
        assert ticks.wait(30)
    finally:
        lease.close()
    assert not lease.lost.is_set()  # a network failure is not a lost lease
