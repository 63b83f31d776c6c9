"""Real Agora processes for end-to-end tests: a registry (`agora serve`) and workers
(`agora worker`), each a subprocess with its own log file.

Every process is started through a ``Processes`` set, which stops them all at teardown
(SIGTERM, then SIGKILL after a grace period) and can show their logs when a test fails.
Output goes to files, never to pipes, so a chatty process can never block on a full pipe.

Usage (see tests/e2e/conftest.py for the fixtures built on it)::

    procs = Processes(tmp_path / "logs")
    server = start_registry(procs, tmp_path / "data", database_url)
    token = server.create_token("worker", "w1")
    worker = start_worker(procs, server, token, name="w1", lease_seconds=3)
    ...
    procs.stop_all()
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

AGORA = [sys.executable, "-m", "agora.cli"]
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
LOG_TAIL_CHARS = 12_000
_IDLE_POLL = re.compile(r'/v1/jobs/lease "?HTTP/1\.1"? 204')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every ``AGORA_`` setting, plus ``extra``.

    One thread per process: the machine is small and several processes share it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        AGORA_EMBEDDER="hashing",
        # Off as in every test process (tests/conftest.py); a test passes "true" in extra.
        AGORA_ARRIVAL_CHECKS="false",
    )
    env.update(extra)
    return env


class Process:
    """One subprocess with its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group: a signal meant for it never reaches pytest, and
            # anything it spawns is stopped with it.
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL, at once, the way a crash or the OOM killer ends a process."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> int:
        """``sig``, then SIGKILL to its group if it has not exited within ``grace``.
        Idempotent: a stopped (or killed) process is left alone."""
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=30)
        if not self._log.closed:
            self._log.close()
        return int(self.popen.returncode)

    def _signal_group(self, sig: int) -> None:
        # Only while the process is unreaped: its pid (the group id) cannot be reused yet.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def log(self, tail: int | None = LOG_TAIL_CHARS) -> str:
        """The log's end, without the lines of idle polls (a lease answered 204), which
        would otherwise fill the tail of a worker's or the registry's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        lines = [line for line in text.splitlines(keepends=True) if not _IDLE_POLL.search(line)]
        text = "".join(lines)
        return text if tail is None or len(text) <= tail else "...\n" + text[-tail:]


@dataclass
class Processes:
    """The processes a test started; ``stop_all`` ends every one of them."""

    log_dir: Path
    started: list[Process] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path
    ) -> Process:
        # One log per process; a restarted worker gets a fresh file next to the old one.
        n = sum(1 for p in self.started if p.name == name)
        log = self.log_dir / (f"{name}.log" if n == 0 else f"{name}.{n}.log")
        process = Process(name, argv, env=env, cwd=cwd, log=log)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        # Workers before the registry, so they do not spend their grace retrying it; all
        # workers are signalled first and then waited for, so their exits overlap.
        workers = [p for p in self.started if p.name != "registry"]
        for process in workers:
            process.send(signal.SIGTERM)
        for process in [*workers, *(p for p in self.started if p.name == "registry")]:
            process.stop()

    def logs(self) -> list[tuple[str, str]]:
        return [
            (f"{p.log_path.name} (pid {p.pid}, rc {p.returncode()})", p.log()) for p in self.started
        ]


@dataclass(frozen=True)
class Trained:
    base_dir: Path
    revision: str
    experts: dict[str, Path]
    datasheets: dict[str, Path]
    heldout: dict[str, list[str]]


@dataclass
class Published:
    """What ``publish`` put in a registry: the base revision and expert id per domain."""

    revision: str
    experts: dict[str, str]
    admin_token: str
    user_token: str
    digests: dict[str, str] = field(default_factory=dict)


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {text}")
        time.sleep(interval)


@dataclass
class Registry:
    """A running `agora serve` and what talks to it."""

    url: str
    env: dict[str, str]
    data_dir: Path
    database_url: str
    process: Process

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run an `agora` command with the registry's settings; its stdout."""
        run = subprocess.run(
            [*AGORA, *args],
            env=self.env,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if run.returncode != 0:
            raise AssertionError(f"agora {' '.join(args)} exited {run.returncode}:\n{run.stderr}")
        return run.stdout

    def cli_create_token(self, role: str, name: str) -> str:
        """`agora admin create-token`, as an operator runs it: the secret is its last line."""
        lines = self.cli("admin", "create-token", "--role", role, "--name", name).splitlines()
        return lines[-1].strip()

    def create_token(self, role: str, name: str) -> str:
        """A token written straight into the database: what `agora admin create-token`
        does, without the seconds a new process takes to import the registry."""
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from registry.services.tokens import create_token

        engine = create_engine(self.database_url)
        try:
            with Session(engine) as session, session.begin():
                _, secret = create_token(session=session, name=name, role=role)
        finally:
            engine.dispose()
        return secret

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    @property
    def backend(self) -> str:
        return "postgresql" if self.database_url.startswith("postgresql") else "sqlite"

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Rows of a SQL query on the registry's database (tests read it directly)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return [dict(row._mapping) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()

    def scalar(self, sql: str, **params: Any) -> Any:
        rows = self.query(sql, **params)
        assert len(rows) == 1, rows
        assert len(rows[0]) == 1, rows
        return next(iter(rows[0].values()))


def wait_ready(process: Process, url: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise AssertionError(f"{process.name} exited early:\n{process.log()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.name} was not ready in {timeout:.0f} s")
        time.sleep(0.2)


def start_registry(
    procs: Processes,
    data_dir: Path,
    database_url: str,
    *,
    settings: Mapping[str, str] | None = None,
    auto_migrate: bool = True,
) -> Registry:
    """`agora serve` on a free port, with no embedded worker (the tests start their own).

    The database is migrated at start (``AGORA_AUTO_MIGRATE=true``, also for PostgreSQL);
    with ``auto_migrate=False`` the variable is not set, as in a deployment that runs
    `agora db upgrade` first: the server then refuses an un-migrated PostgreSQL.
    ``settings`` are extra ``AGORA_...`` variables (job attempts, backoff...).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(
        AGORA_DATA_DIR=str(data_dir),
        AGORA_DATABASE_URL=database_url,
        AGORA_EMBEDDED_WORKER="false",
        AGORA_CACHE_DIR=str(data_dir.parent / "client-cache"),
    )
    if auto_migrate:
        env["AGORA_AUTO_MIGRATE"] = "true"
    env.update(settings or {})
    process = procs.start(
        "registry",
        [*AGORA, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=data_dir.parent,
    )
    wait_ready(process, url)
    return Registry(url=url, env=env, data_dir=data_dir, database_url=database_url, process=process)


def start_worker(
    procs: Processes,
    registry: Registry,
    token: str,
    *,
    name: str,
    lease_seconds: float | None = None,
    kinds: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    poll_interval: float = 0.2,
    extra_args: Sequence[str] = (),
) -> Process:
    """`agora worker` against ``registry`` on the CPU, with its own blob cache."""
    cache = cache_dir or registry.data_dir.parent / f"cache-{name}"
    env = base_env(AGORA_CACHE_DIR=str(cache))
    argv = [
        *AGORA,
        "worker",
        "--registry",
        registry.url,
        "--token",
        token,
        "--device",
        "cpu",
        "--name",
        name,
        "--poll-interval",
        str(poll_interval),
    ]
    if lease_seconds is not None:
        argv += ["--lease-seconds", str(lease_seconds)]
    for kind in kinds or ():
        argv += ["--kinds", kind]
    argv += list(extra_args)
    return procs.start(name, argv, env=env, cwd=registry.data_dir.parent)
