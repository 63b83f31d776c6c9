"""Handles on jobs submitted through the SDK: poll, wait with backoff, report progress.

``Agora.compose`` returns a ``CompositionHandle`` and ``Agora.evaluate`` an
``EvaluationHandle``; both wait for the job the registry queued and a worker computes.
A handle polls through the ``Jobs`` resource and sleeps on its transport's clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from registry.client.errors import AgoraError, JobFailed
from registry.client.models import Caution, Composition, EvaluationScore, Job

if TYPE_CHECKING:
    from registry.client.resources.compositions import Compositions
    from registry.client.resources.jobs import Jobs

JobCallback = Callable[[Job], None]
"""Called with the job as last polled (status, attempts, ``progress``)."""

# Polling starts at ``poll`` seconds and slows by this factor while nothing changes, up to
# MAX_POLL_S (or ``poll`` itself when that is larger); any change resets it.
POLL_BACKOFF = 1.5
MAX_POLL_S = 5.0


class _Handle:
    """A submitted job: ``refresh()`` polls it once, ``wait_job()`` until it ends."""

    def __init__(self, jobs: Jobs, job_id: str) -> None:
        self._jobs = jobs
        self.job_id = job_id
        self.job: Job | None = None

    def __repr__(self) -> str:
        status = self.job.status if self.job is not None else "?"
        return f"{type(self).__name__}(job_id={self.job_id!r}, status={status!r})"

    def refresh(self) -> Job:
        """The job as the registry sees it now."""
        self.job = self._jobs.get(self.job_id)
        return self.job

    def wait_job(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        progress: JobCallback | None = None,
    ) -> Job:
        """Poll until the job ends; the succeeded job.

        Raises ``JobFailed`` (``.job``, ``.code`` ``job_failed`` or ``job_dead``, the job's
        error as detail) if it failed or died, ``TimeoutError`` if ``timeout`` seconds pass
        first. ``progress`` is called with the job after every poll.
        """
        if poll <= 0:
            raise ValueError("poll must be positive")
        clock, sleep = self._jobs.transport.clock, self._jobs.transport.sleep
        deadline = None if timeout is None else clock() + timeout
        delay = poll
        last: str | None = None
        while True:
            job = self.refresh()
            if progress is not None:
                progress(job)
            if job.status == "succeeded":
                return job
            if job.status in ("failed", "dead"):
                raise JobFailed(
                    job.error or f"job {job.id} ended {job.status}",
                    code=f"job_{job.status}",
                    job=job,
                )
            state = json.dumps([job.status, job.attempts, job.progress], sort_keys=True)
            delay = poll if state != last else min(delay * POLL_BACKOFF, max(poll, MAX_POLL_S))
            last = state
            if deadline is None:
                sleep(delay)
                continue
            remaining = deadline - clock()
            if remaining <= 0:
                raise TimeoutError(
                    f"job {job.id} is still {job.status} after {timeout:g} s "
                    f"(attempt {job.attempts}); it keeps running: wait again or poll it "
                    "with get_job"
                )
            sleep(min(delay, remaining))


class JobHandle(_Handle):
    """Any job by its id (``Agora.job(id)``): ``wait()`` returns the succeeded job."""

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        progress: JobCallback | None = None,
    ) -> Job:
        return self.wait_job(timeout=timeout, poll=poll, progress=progress)


class CompositionHandle(_Handle):
    """A requested composition: ``wait()`` returns the ready ``Composition`` (its manifest
    names the base, the experts with their digests and weights, and any new expert).

    ``warnings`` are the registry's cautions about the method (``average_may_harm`` for
    ``average``); empty for most methods."""

    def __init__(
        self,
        jobs: Jobs,
        compositions: Compositions,
        job_id: str,
        composition_id: str,
        *,
        warnings: Sequence[Caution] = (),
    ) -> None:
        super().__init__(jobs, job_id)
        self._compositions = compositions
        self.composition_id = composition_id
        self.warnings: list[Caution] = list(warnings)

    def __repr__(self) -> str:
        status = self.job.status if self.job is not None else "?"
        return (
            f"CompositionHandle(composition_id={self.composition_id!r}, "
            f"job_id={self.job_id!r}, status={status!r})"
        )

    def composition(self) -> Composition:
        return self._compositions.get(self.composition_id)

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        progress: JobCallback | None = None,
    ) -> Composition:
        """Wait for the job, then return the composition (``status`` ready, ``manifest`` set).

        ``JobFailed`` if the job failed or died, ``TimeoutError`` after ``timeout`` seconds.
        """
        clock = self._jobs.transport.clock
        start = clock()
        job = self.wait_job(timeout=timeout, poll=poll, progress=progress)
        composition = self.composition()
        # The registry builds the manifest as the job succeeds; should a reader ever see the
        # job first, the composition follows within the same deadline.
        delay = poll
        while composition.status != "ready":
            if composition.status == "failed":
                check = composition.verification or {}
                raise JobFailed(
                    job.error
                    or (check.get("cause") and f"its output failed its check: {check['cause']}")
                    or f"composition {self.composition_id} failed",
                    code="composition_failed",
                    job=job,
                )
            if timeout is not None and clock() - start >= timeout:
                raise TimeoutError(
                    f"composition {self.composition_id} is still {composition.status} "
                    f"after {timeout:g} s although job {self.job_id} succeeded"
                )
            self._jobs.transport.sleep(delay)
            delay = min(delay * POLL_BACKOFF, max(poll, MAX_POLL_S))
            composition = self.composition()
        if composition.manifest is None:
            raise AgoraError(
                f"composition {self.composition_id} is ready but has no manifest",
                code="bad_response",
            )
        return composition


class EvaluationHandle(_Handle):
    """A requested evaluation: ``wait()`` returns bits per byte per text set."""

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        progress: JobCallback | None = None,
    ) -> dict[str, EvaluationScore]:
        """``{text set name: EvaluationScore}`` once the job succeeded (also stored: see
        ``Agora.list_evaluations``). ``JobFailed`` / ``TimeoutError`` as for compositions."""
        job = self.wait_job(timeout=timeout, poll=poll, progress=progress)
        results = (job.result or {}).get("results")
        if not isinstance(results, dict):
            raise AgoraError(
                f"evaluation job {job.id} succeeded without results", code="bad_response"
            )
        return {name: EvaluationScore.model_validate(score) for name, score in results.items()}
