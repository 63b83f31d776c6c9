"""The worker loop: lease a job, keep its lease alive, fetch inputs, compute, report.

Guarantees (docs/architecture.md, the job protocol; docs/jobs.md), and who provides them:

* **Leases.** ``lease_job`` gives this worker the job for ``lease_seconds``; a background
  thread heartbeats every ``lease_seconds / 3`` with the latest progress. If the registry
  answers ``lease_lost`` (the lease expired and another worker took the job, or it ended)
  the thread sets a flag the handlers check between steps: the worker stops and never
  completes the job.
* **Fencing.** Every heartbeat, completion and failure carries the fencing token of this
  lease; the registry refuses stale ones, so a worker that lost its lease cannot
  overwrite anything.
* **Crashes.** A worker killed with SIGKILL reports nothing: its lease expires and the
  next worker leases the job again (``attempts + 1``). Outputs are content addressed
  (same payload, same bytes), so a re-run applies nothing twice.
* **SIGTERM** (``request_stop``): lease nothing more, finish the current job, exit. A
  second SIGTERM (``request_release``) stops the current job at its next check and hands
  it back at once (``fail_job(..., release=True)``: queued again, attempt not counted).
* **Errors.** ``PermanentJobError`` (a payload that can never work, an expert refused
  for legal reasons) fails the job for good; anything else fails it as retryable, and
  the registry re-queues it with backoff until its attempts run out (``dead``).
* **Registry unavailable.** Connection errors and 5xx when leasing are retried with
  capped exponential backoff and jitter (the registry may be starting); an empty queue
  is polled every ``poll_interval`` seconds, jittered so workers do not poll in step.

* **Liveness.** With ``heartbeat_file`` the worker touches that file at every turn of its
  loop (each lease poll) and every lease heartbeat while a job runs: its age says whether
  the worker is still turning (docker-compose.yml's worker healthcheck reads it).

Inputs come through the SDK's verified cache (sha256 of every file); the last loaded
base stays in memory between jobs (``BaseCache``). One log line per job: id, kind,
outcome, seconds.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from registry.client import (
    Agora,
    AgoraError,
    Forbidden,
    LeasedJob,
    LeaseLost,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthenticated,
    UnavailableForLegalReasons,
    ValidationFailed,
)
from registry.client.cache import parse_digest
from registry.protocol import COMPOSE_KINDS, COMPOSE_PREFIX, ExpertRef
from worker.handlers import (
    KINDS,
    BaseCache,
    JobCancelled,
    JobContext,
    JobInputs,
    PermanentJobError,
    required_inputs,
    run_job,
)

log = logging.getLogger("agora.worker")

# Backoff while the registry is unreachable: 0.5 s doubling up to 30 s, half of it jitter.
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
ERROR_TEXT_LIMIT = 4000


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def expand_kinds(values: Sequence[str] | None) -> list[str] | None:
    """``["compose,evaluate"]`` / ``["compose.mixture", "evaluate"]`` -> exact kinds; None
    or empty = every kind. ``compose`` stands for every compose kind (one per method)."""
    if not values:
        return None
    every_compose = COMPOSE_PREFIX.rstrip(".")
    out: list[str] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            expanded = list(COMPOSE_KINDS) if item == every_compose else [item]
            for kind in expanded:
                if kind not in KINDS:
                    raise ValueError(
                        f"unknown job kind {kind!r}; known: {every_compose}, {', '.join(KINDS)}"
                    )
                if kind not in out:
                    out.append(kind)
    return out or None


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= ERROR_TEXT_LIMIT else text[: ERROR_TEXT_LIMIT - 3] + "..."


class _Lease:
    """Heartbeats one leased job in a background thread until ``close``."""

    def __init__(
        self,
        agora: Agora,
        job: LeasedJob,
        interval: float,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.agora = agora
        self.job = job
        self.interval = interval
        self.on_tick = on_tick
        self.lost = threading.Event()
        self._closed = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, done: int, total: int, message: str) -> None:
        self._progress = {"done": done, "total": total, "message": message}

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            self.on_tick()
            try:
                self.agora.heartbeat_job(self.job.id, self.job.fencing_token, self._progress)
            except LeaseLost:
                log.warning("job %s: lease lost; stopping work on it", self.job.id)
                self.lost.set()
                return
            except AgoraError as exc:
                # Transient (the SDK already retried): keep trying while the lease may last.
                log.warning("job %s: heartbeat failed: %s", self.job.id, exc)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


class Worker:
    """Leases and runs jobs until stopped (or ``max_jobs`` are done)."""

    def __init__(
        self,
        agora: Agora,
        *,
        name: str | None = None,
        kinds: Sequence[str] | None = None,
        lease_seconds: float = 60.0,
        poll_interval: float = 2.0,
        device: str = "cpu",
        kernels: str = "auto",
        max_jobs: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        heartbeat_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be positive")
        self.agora = agora
        self.name = name or default_name()
        # Always an explicit list: a newer registry's kinds this worker cannot run stay
        # queued for workers that can, instead of failing here.
        self.kinds = expand_kinds(kinds) or list(KINDS)
        self.lease_seconds = float(lease_seconds)
        self.poll_interval = float(poll_interval)
        self.max_jobs = max_jobs
        self.bases = BaseCache(device=device, kernels=kernels)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.heartbeat_file = Path(heartbeat_file) if heartbeat_file is not None else None
        self.outcomes: list[str] = []  # per job run, in order (for callers and tests)
        self._stopping = threading.Event()
        self._releasing = threading.Event()
        self._base_dirs: dict[str, Path] = {}

    # -- control --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Lease no more jobs; the current one is finished (first SIGTERM)."""
        self._stopping.set()

    def request_release(self) -> None:
        """Stop the current job at its next check and hand it back (second SIGTERM)."""
        self._releasing.set()
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def beat(self) -> None:
        """Touch ``heartbeat_file`` (if any): the worker is still turning. A failure to
        write it is logged, never raised: liveness reporting must not stop the work."""
        if self.heartbeat_file is None:
            return
        try:
            self.heartbeat_file.touch()
        except OSError as exc:
            log.warning("heartbeat file %s: %s", self.heartbeat_file, exc)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped or ``max_jobs`` jobs ran; returns how many ran."""
        ran = 0
        failures = 0
        log.info(
            "worker %s: registry %s, kinds %s, lease %.0fs",
            self.name,
            self.agora.base_url,
            "all" if sorted(self.kinds) == sorted(KINDS) else ",".join(self.kinds),
            self.lease_seconds,
        )
        while not self._stopping.is_set():
            self.beat()
            if self.max_jobs is not None and ran >= self.max_jobs:
                break
            try:
                leased = self.agora.lease_job(self.name, self.kinds, self.lease_seconds)
            except (Unauthenticated, Forbidden):
                raise  # a wrong token or role does not fix itself: let the caller see it
            except (TransportError, ServerError, RateLimited) as exc:
                delay = min(BACKOFF_CAP_S, BACKOFF_START_S * 2.0**failures)
                failures += 1
                log.warning("lease failed (%s); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay / 2 + random.uniform(0, delay / 2))
                continue
            failures = 0
            if leased is None:
                self._stopping.wait(self.poll_interval * random.uniform(0.5, 1.5))
                continue
            self.run_job(leased)
            ran += 1
        log.info("worker %s: stopped after %d job(s)", self.name, ran)
        return ran

    def run_job(self, job: LeasedJob) -> str:
        """Run one leased job to its end; returns the outcome (also logged)."""
        started = time.monotonic()
        lease = _Lease(self.agora, job, max(0.5, self.lease_seconds / 3), self.beat)
        lease.start()
        scratch = Path(tempfile.mkdtemp(prefix="agora-job-", dir=self._scratch_root()))
        ctx = JobContext(
            work_dir=scratch,
            bases=self.bases,
            progress=lease.report,
            cancelled=lambda: lease.lost.is_set() or self._releasing.is_set(),
        )
        try:
            outcome = self._attempt(job, ctx, lease)
        finally:
            lease.close()
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.monotonic() - started
        log.info("job %s kind=%s outcome=%s seconds=%.2f", job.id, job.kind, outcome, seconds)
        self.outcomes.append(outcome)
        return outcome

    def _attempt(self, job: LeasedJob, ctx: JobContext, lease: _Lease) -> str:
        try:
            revision, refs = required_inputs(job.kind, job.payload)
            inputs = JobInputs(
                base_dir=self._base(revision, ctx), expert_files=self._experts(refs, ctx)
            )
            output = run_job(job.kind, job.payload, inputs, ctx)
        except JobCancelled:
            return self._cancelled(job, lease)
        except LeaseLost:
            return "lease_lost"
        except PermanentJobError as exc:
            return self._fail(job, str(exc), retryable=False)
        except Exception as exc:
            if lease.lost.is_set():
                return "lease_lost"
            log.debug("job %s failed:\n%s", job.id, traceback.format_exc())
            return self._fail(job, _error_text(exc), retryable=True)
        if lease.lost.is_set():
            return "lease_lost"  # another worker holds it now: report nothing
        # A release asked for after the work is done is not worth it: deliver the result.
        try:
            self.agora.complete_job(job.id, job.fencing_token, output.result, output.weights)
        except LeaseLost:
            return "lease_lost"
        except ValidationFailed as exc:
            # The registry refused the output itself: running it again gives the same bytes.
            return self._fail(job, f"the registry refused the output: {exc}", retryable=False)
        except AgoraError as exc:
            return self._fail(job, f"completing failed: {exc}", retryable=True)
        return "succeeded"

    def _cancelled(self, job: LeasedJob, lease: _Lease) -> str:
        if lease.lost.is_set():
            return "lease_lost"
        try:
            self.agora.fail_job(
                job.id, job.fencing_token, "worker shutting down", retryable=True, release=True
            )
        except AgoraError as exc:
            log.warning("job %s: release failed (%s); its lease will expire", job.id, exc)
            return "abandoned"
        return "released"

    def _fail(self, job: LeasedJob, error: str, *, retryable: bool) -> str:
        try:
            self.agora.fail_job(job.id, job.fencing_token, error, retryable=retryable)
        except LeaseLost:
            return "lease_lost"
        except AgoraError as exc:
            log.warning("job %s: reporting the failure failed (%s): %s", job.id, exc, error)
            return "abandoned"
        log.warning("job %s failed (%s): %s", job.id, "retry" if retryable else "final", error)
        return "retry" if retryable else "failed"

    # -- inputs ---------------------------------------------------------------------------
    def _scratch_root(self) -> Path | None:
        if self.work_dir is None:
            return None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def _base(self, revision: str, ctx: JobContext) -> Path:
        known = self._base_dirs.get(revision)
        if known is not None and self.bases.holds(revision):
            return known  # already in memory: nothing to fetch or re-hash
        ctx.check()
        target = self.agora.cache.root / "bases" / revision
        try:
            self.agora.download_base_model(revision, target)
        except NotFound as exc:
            raise PermanentJobError(f"base model {revision} is not in the registry") from exc
        self._base_dirs = {revision: target}
        return target

    def _experts(self, refs: Sequence[ExpertRef], ctx: JobContext) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for ref in refs:
            ctx.check()
            if ref.digest in files:
                continue
            hexdigest = parse_digest(ref.digest)
            try:
                path = self.agora.download(ref.id, version=ref.version)
            except UnavailableForLegalReasons as exc:
                raise PermanentJobError(f"expert {ref.id} is disabled: {exc}") from exc
            except NotFound as exc:
                raise PermanentJobError(f"expert {ref.id} v{ref.version}: {exc}") from exc
            if path != self.agora.cache.blob_path(hexdigest):
                raise PermanentJobError(
                    f"expert {ref.id} v{ref.version} is not the version the job names "
                    f"({ref.digest})"
                )
            files[ref.digest] = path
        return files
