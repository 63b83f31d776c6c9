"""Servers to kill: a registry that restarts in a fraction of a second, for the
crash-consistency tests (tests/adversarial/test_crash_consistency.py).

`agora serve` takes seconds to start on a small machine, mostly importing; killing it a
few dozen times would take minutes. So one *zygote* process imports the registry once and
then forks a fresh server process per start: each child builds the app (the whole
lifespan: database, blob store, staging clean-up) and serves it under uvicorn on the port
it is given, with the ``AGORA_*`` settings it is given, until a crash point kills it
(registry/faults.py) or the test does. The zygote never opens a connection or starts a
thread, so forking it is safe.

Run as a script; it answers one JSON line per JSON line on stdin::

    {"op": "start", "port": 8123, "env": {...}, "log": "/path"}   -> {"pid": 4242}
    {"op": "wait", "pid": 4242, "timeout": 10}  -> {"signal": 9} | {"exit": 0} | {"alive": true}
    {"op": "kill", "pid": 4242}                 -> {"signal": 9}
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx


def _serve(command: dict[str, Any]) -> None:
    """The child: a registry on ``command["port"]`` (never returns)."""
    status = 1
    try:
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.environ.update(command["env"])
        import uvicorn

        from registry.app import create_app
        from registry.settings import Settings

        app = create_app(Settings())
        config = uvicorn.Config(app, host="127.0.0.1", port=command["port"], log_level="warning")
        uvicorn.Server(config).run()
        status = 0
    finally:
        os._exit(status)


def _status(pid: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return {"gone": True}  # reaped by an earlier wait
        if done:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"exit": os.WEXITSTATUS(status)}
        if time.monotonic() >= deadline:
            return {"alive": True}
        time.sleep(0.02)


def main() -> None:
    # Everything a server imports, imported once, before any fork.
    import uvicorn.protocols.http.httptools_impl
    import uvicorn.protocols.websockets.auto

    import registry.app
    import registry.retrieval.embedders
    import registry.retrieval.service

    del uvicorn, registry

    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _serve(command)
            reply: dict[str, Any] = {"pid": pid}
        elif command["op"] == "wait":
            reply = _status(command["pid"], command["timeout"])
        elif command["op"] == "kill":
            with contextlib.suppress(ProcessLookupError):
                os.kill(command["pid"], signal.SIGKILL)
            reply = _status(command["pid"], 30)
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Zygote:
    """The test's side: starts the zygote, then servers from it (see the module docstring)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = (log_dir / "zygote.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.servers: list[int] = []
        self.started = 0

    def _call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote died:\n{self.log()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def start(self, port: int, env: Mapping[str, str], *, timeout: float = 60) -> int:
        """A server on ``port`` with ``env``; returns its pid once /readyz answers 200."""
        self.started += 1
        log = self.log_dir / f"server-{self.started}.log"
        pid = int(self._call(op="start", port=port, env=dict(env), log=str(log))["pid"])
        self.servers.append(pid)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return pid
            except httpx.TransportError:
                pass
            state = self._call(op="wait", pid=pid, timeout=0)
            if not state.get("alive"):
                raise AssertionError(
                    f"server {pid} ended during start-up ({state}):\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"server {pid} not ready in {timeout:.0f} s")
            time.sleep(0.05)

    def wait(self, pid: int, timeout: float = 30) -> dict[str, Any]:
        return self._call(op="wait", pid=pid, timeout=timeout)

    def kill(self, pid: int) -> dict[str, Any]:
        return self._call(op="kill", pid=pid)

    def log(self) -> str:
        self._log.flush()
        return (self.log_dir / "zygote.log").read_text(errors="replace")

    def close(self) -> None:
        for pid in self.servers:
            state = self.wait(pid, timeout=0) if self.process.poll() is None else {}
            if state.get("alive"):
                self.kill(pid)
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


if __name__ == "__main__":
    main()
