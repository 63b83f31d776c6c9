"""Jobs: read and wait for any job; the worker's side of the protocol (lease, heartbeat,
complete, fail), every call after the lease carrying its fencing token."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from registry.client.errors import AgoraError
from registry.client.jobs import JobHandle
from registry.client.models import Job, LeasedJob
from registry.client.transport import (
    ProgressCallback,
    Transport,
    items,
    json_body,
    parse,
    reader_of,
    seg,
    without_none,
)


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def get(self, job_id: str) -> Job:
        """A job (its submitter, moderators, admins and workers may read it)."""
        return self.transport.get(Job, f"/v1/jobs/{seg(job_id)}")

    def handle(self, job_id: str) -> JobHandle:
        """A handle on any job by id, to ``wait()`` for it."""
        return JobHandle(self, job_id)

    def list(
        self, *, status: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """Jobs by status and kind, e.g. ``status="dead"`` (moderators and admins)."""
        params = without_none({"status": status, "kind": kind, "limit": limit})
        response = self.transport.request("GET", "/v1/jobs", params=params)
        return [Job.model_validate(item) for item in items(response)]

    # -- the worker's side -------------------------------------------------------------------

    def lease(
        self,
        worker: str,
        kinds: Sequence[str] | None = None,
        lease_seconds: float = 60,
    ) -> LeasedJob | None:
        """Lease the next runnable job (role worker or admin), or None when there is none.

        ``kinds`` limits which job kinds this worker takes (None: any). The lease lasts
        ``lease_seconds`` (the registry clamps it to [2, 3600]) and is extended by
        ``heartbeat``; every later call about the job must carry the returned
        ``fencing_token``.
        """
        body = {
            "worker": worker,
            "kinds": list(kinds) if kinds is not None else None,
            "lease_seconds": lease_seconds,
        }
        response = self.transport.request("POST", "/v1/jobs/lease", json=body)
        if response.status_code == 204:
            return None
        data = json_body(response)
        job = Job.model_validate(data.get("job") if isinstance(data, dict) else None)
        if job.fencing_token is None:
            raise AgoraError(
                f"the registry leased job {job.id} without a fencing token", code="bad_response"
            )
        return LeasedJob(job=job, fencing_token=job.fencing_token)

    def heartbeat(
        self, job_id: str, fencing_token: int, progress: Mapping[str, Any] | None = None
    ) -> datetime:
        """Extend the lease (and report ``progress``, e.g. ``{"done": 3, "total": 10}``).

        Returns the new lease expiry. Raises ``LeaseLost`` when the lease is gone: the
        worker must stop working on the job and must not complete it.
        """
        body = {
            "fencing_token": fencing_token,
            "progress": dict(progress) if progress is not None else None,
        }
        response = self.transport.request("POST", f"/v1/jobs/{seg(job_id)}/heartbeat", json=body)
        data = json_body(response)
        expires = data.get("lease_expires_at") if isinstance(data, dict) else None
        if not isinstance(expires, str):
            raise AgoraError(
                "the heartbeat answer has no lease_expires_at",
                status=response.status_code,
                code="bad_response",
            )
        return datetime.fromisoformat(expires)

    def complete(
        self,
        job_id: str,
        fencing_token: int,
        result: Mapping[str, Any],
        weights: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """Report success with ``result``; ``weights`` (an agora.expert/1 safetensors file,
        streamed from disk) is the new expert of a job whose method produces one.

        Repeating the same completion is harmless (the registry answers with the same job);
        ``LeaseLost`` when this worker no longer holds the lease, ``ValidationFailed`` (422)
        when the output is invalid (then report it with ``fail(..., retryable=False)``).
        """
        path = f"/v1/jobs/{seg(job_id)}/complete"
        if weights is None:
            body = {"fencing_token": fencing_token, "result": dict(result)}
            return self.transport.post(Job, path, body)
        file = Path(weights)
        data = {
            "fencing_token": str(fencing_token),
            "result": json.dumps(dict(result), allow_nan=False),
        }
        with file.open("rb") as raw:
            files = {"weights": (file.name, reader_of(raw, progress), "application/octet-stream")}
            response = self.transport.request("POST", path, data=data, files=files, rewind=[raw])
        return parse(Job, response)

    def fail(
        self,
        job_id: str,
        fencing_token: int,
        error: str,
        retryable: bool = True,
        release: bool = False,
    ) -> Job:
        """Report a failure. ``retryable``: queued again after a backoff (``dead`` once the
        attempts are spent); not retryable: ``failed`` for good. ``release=True`` hands the
        job back at once without counting the attempt (a worker shutting down)."""
        body = {
            "fencing_token": fencing_token,
            "error": error,
            "retryable": retryable,
            "release": release,
        }
        return self.transport.post(Job, f"/v1/jobs/{seg(job_id)}/fail", body)
