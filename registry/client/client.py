"""``Agora``: the Python client of the registry's HTTP API v1.

One ``Transport`` (``registry/client/transport.py``: retries with backoff, idempotency
keys, typed errors, resumable sha256-verified downloads) under small resources, one per
part of the API, each an attribute of ``Agora``:

    agora.experts       submit, page, list, get, wait_for_arrival, datasheet, download
    agora.bases         list, get, only_revision, upload, download
    agora.retrieval     search, nearest
    agora.compositions  create, get, handle, download, load
    agora.evaluations   create, list
    agora.jobs          get, handle, list; the worker's lease, heartbeat, complete, fail
    agora.moderation    disable, enable, forgetting
    agora.audit         page, list, verify (moderators and admins)
    agora.tokens        create, list, revoke (admins)
    agora.reports       create, list, get, resolve (reports of experts)
    agora.monitoring    text sets, schedules, runs (moderators and admins)

``Agora``'s own methods (``submit_expert``, ``search``, ``compose``, ...) are the same
calls under their long-standing names and delegate to the resources.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from registry.client.cache import BlobCache, default_cache_dir
from registry.client.composed import ComposedModel, LocalComposition
from registry.client.jobs import CompositionHandle, EvaluationHandle, JobHandle
from registry.client.models import (
    BaseModelRevision,
    Composition,
    Evaluation,
    Expert,
    ExpertPage,
    Job,
    LeasedJob,
    ModerationAction,
    SearchResult,
    SearchResults,
    SubmittedExpert,
)
from registry.client.resources import (
    DEFAULT_TEMPERATURE,
    Audit,
    Bases,
    Compositions,
    Evaluations,
    Experts,
    ExpertSpec,
    Jobs,
    Moderation,
    Monitoring,
    Reports,
    Retrieval,
    Tokens,
)
from registry.client.transport import DEFAULT_TIMEOUT, ProgressCallback, Transport

__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_URL", "Agora", "ExpertSpec", "ProgressCallback"]

DEFAULT_URL = "http://127.0.0.1:8000"


class Agora:
    """Client of an Agora registry.

    >>> with Agora("http://127.0.0.1:8000", token="agora_...") as agora:  # doctest: +SKIP
    ...     submitted = agora.experts.submit("expert.safetensors", Path("datasheet.md"), rev)
    ...     path = agora.experts.download(submitted.id)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._transport = Transport(
            base_url,
            token,
            cache=BlobCache(Path(cache_dir) if cache_dir is not None else default_cache_dir()),
            sleep=time.sleep,
            clock=time.monotonic,
            transport=transport,
            timeout=timeout,
            max_retries=max_retries,
            backoff_factor=backoff_factor,
        )
        self.experts = Experts(self._transport)
        self.bases = Bases(self._transport)
        self.retrieval = Retrieval(self._transport)
        self.jobs = Jobs(self._transport)
        self.compositions = Compositions(self._transport, self.bases, self.jobs)
        self.evaluations = Evaluations(self._transport, self.jobs)
        self.moderation = Moderation(self._transport)
        self.audit = Audit(self._transport)
        self.tokens = Tokens(self._transport)
        self.reports = Reports(self._transport)
        self.monitoring = Monitoring(self._transport)

    # -- the transport's settings ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    @property
    def cache(self) -> BlobCache:
        return self._transport.cache

    @property
    def max_retries(self) -> int:
        return self._transport.max_retries

    @property
    def backoff_factor(self) -> float:
        return self._transport.backoff_factor

    # Indirection so tests can observe the delays without waiting them out.
    @property
    def _sleep(self) -> Callable[[float], None]:
        return self._transport.sleep

    @_sleep.setter
    def _sleep(self, sleep: Callable[[float], None]) -> None:
        self._transport.sleep = sleep

    @property
    def _clock(self) -> Callable[[], float]:
        return self._transport.clock

    @_clock.setter
    def _clock(self, clock: Callable[[], float]) -> None:
        self._transport.clock = clock

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- experts: agora.experts ------------------------------------------------------------

    def submit_expert(
        self,
        weights_path: str | os.PathLike[str],
        datasheet: str | os.PathLike[str],
        base_revision: str,
        *,
        expert_id: str | None = None,
        idempotency_key: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> SubmittedExpert:
        """``agora.experts.submit``: expert weights (safetensors) with their datasheet."""
        return self.experts.submit(
            weights_path,
            datasheet,
            base_revision,
            expert_id=expert_id,
            idempotency_key=idempotency_key,
            progress=progress,
        )

    def list_experts_page(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExpertPage:
        """``agora.experts.page``: one page of experts, with its ``next_cursor``."""
        return self.experts.page(
            base_revision=base_revision, status=status, q=q, limit=limit, cursor=cursor
        )

    def list_experts(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[Expert]:
        """``agora.experts.list``: every matching expert, page by page (lazily)."""
        return self.experts.list(
            base_revision=base_revision, status=status, q=q, limit=limit, page_size=page_size
        )

    def get_expert(self, expert_id: str) -> Expert:
        """``agora.experts.get``: the expert's metadata, with all its versions."""
        return self.experts.get(expert_id)

    def wait_for_arrival(
        self,
        expert_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 1.0,
        on_poll: Callable[[Expert], None] | None = None,
    ) -> Expert:
        """``agora.experts.wait_for_arrival``: the expert once its check on arrival is
        decided (``expert.status`` active, or quarantined and flagged to moderators)."""
        return self.experts.wait_for_arrival(
            expert_id, timeout=timeout, interval=interval, on_poll=on_poll
        )

    def get_datasheet(self, expert_id: str, version: int | None = None) -> str:
        """``agora.experts.datasheet``: the datasheet markdown (default: latest version)."""
        return self.experts.datasheet(expert_id, version)

    def download(
        self,
        expert_id: str,
        *,
        version: int | None = None,
        dest: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """``agora.experts.download``: an expert's weights, sha256-verified and cached."""
        return self.experts.download(expert_id, version=version, dest=dest, progress=progress)

    # -- retrieval and moderation ----------------------------------------------------------

    def search(
        self,
        texts: str | Sequence[str],
        base_revision: str,
        *,
        k: int = 4,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> SearchResults:
        """``agora.retrieval.search``: the ``k`` experts that best fit ``texts``."""
        return self.retrieval.search(texts, base_revision, k=k, temperature=temperature)

    def nearest_expert(
        self, texts_or_path: str | os.PathLike[str] | Sequence[str], base_revision: str
    ) -> SearchResult:
        """``agora.retrieval.nearest``: the expert closest to a contributor's data."""
        return self.retrieval.nearest(texts_or_path, base_revision)

    def disable_expert(self, expert_id: str, reason: str) -> ModerationAction:
        """``agora.moderation.disable``: withdraw an expert (moderator or admin)."""
        return self.moderation.disable(expert_id, reason)

    def enable_expert(self, expert_id: str, reason: str) -> ModerationAction:
        """``agora.moderation.enable``: re-enable a disabled expert (moderator or admin)."""
        return self.moderation.enable(expert_id, reason)

    def withdraw_expert(self, expert_id: str, reason: str | None = None) -> ModerationAction:
        """``agora.experts.withdraw``: withdraw one's own expert (its owner or an admin)."""
        return self.experts.withdraw(expert_id, reason)

    def restore_expert(self, expert_id: str, reason: str | None = None) -> ModerationAction:
        """``agora.experts.restore``: restore one's own withdrawn expert."""
        return self.experts.restore(expert_id, reason)

    # -- base models: agora.bases ----------------------------------------------------------

    def list_base_models(self) -> list[BaseModelRevision]:
        return self.bases.list()

    def get_base_model(self, revision: str) -> BaseModelRevision:
        return self.bases.get(revision)

    def upload_base_model(
        self,
        config: str | os.PathLike[str],
        tokenizer: str | os.PathLike[str],
        weights: str | os.PathLike[str],
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> BaseModelRevision:
        """``agora.bases.upload``: store a base model revision (admin)."""
        return self.bases.upload(config, tokenizer, weights, name=name, progress=progress)

    def download_base_model(
        self,
        revision: str,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """``agora.bases.download``: a revision's three files into ``dest_dir``."""
        return self.bases.download(revision, dest_dir, progress=progress)

    # -- compositions and evaluations ------------------------------------------------------

    def compose(
        self,
        method: str,
        *,
        base_revision: str | None = None,
        experts: Sequence[ExpertSpec] | None = None,
        texts: str | Sequence[str] | None = None,
        k: int = 4,
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
        with_base: bool = True,
        base_weight: float | None = None,
        temperature: float | None = None,
        idempotency_key: str | None = None,
    ) -> CompositionHandle:
        """``agora.compositions.create``: request a composition; wait on the handle."""
        return self.compositions.create(
            method,
            base_revision=base_revision,
            experts=experts,
            texts=texts,
            k=k,
            weights=weights,
            params=params,
            with_base=with_base,
            base_weight=base_weight,
            temperature=temperature,
            idempotency_key=idempotency_key,
        )

    def get_composition(self, composition_id: str) -> Composition:
        """``agora.compositions.get``: status pending, verifying, ready (manifest set) or
        failed."""
        return self.compositions.get(composition_id)

    def composition(self, composition_id: str) -> CompositionHandle:
        """``agora.compositions.handle``: a handle on an existing composition."""
        return self.compositions.handle(composition_id)

    def download_composition(
        self,
        composition: str | Composition,
        dest_dir: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> LocalComposition:
        """``agora.compositions.download``: every file a ready composition needs."""
        return self.compositions.download(composition, dest_dir, progress=progress)

    def load_composed(
        self,
        composition: str | Composition,
        *,
        device: str = "cpu",
        progress: ProgressCallback | None = None,
    ) -> ComposedModel:
        """``agora.compositions.load``: a ready composition as a local model (needs
        ``pip install 'agora[model]'``)."""
        return self.compositions.load(composition, device=device, progress=progress)

    def evaluate(
        self,
        text_sets: Mapping[str, str | Sequence[str]],
        *,
        expert_id: str | None = None,
        version: int | None = None,
        composition_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationHandle:
        """``agora.evaluations.create``: bits per byte of an expert or a composition."""
        return self.evaluations.create(
            text_sets,
            expert_id=expert_id,
            version=version,
            composition_id=composition_id,
            idempotency_key=idempotency_key,
        )

    def list_evaluations(
        self, *, expert_id: str | None = None, composition_id: str | None = None
    ) -> list[Evaluation]:
        """``agora.evaluations.list``: the stored evaluations of one subject."""
        return self.evaluations.list(expert_id=expert_id, composition_id=composition_id)

    # -- jobs: agora.jobs ------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def job(self, job_id: str) -> JobHandle:
        """``agora.jobs.handle``: a handle on any job by id, to ``wait()`` for it."""
        return self.jobs.handle(job_id)

    def list_jobs(
        self, *, status: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Job]:
        return self.jobs.list(status=status, kind=kind, limit=limit)

    def lease_job(
        self,
        worker: str,
        kinds: Sequence[str] | None = None,
        lease_seconds: float = 60,
    ) -> LeasedJob | None:
        """``agora.jobs.lease``: the next runnable job for a worker, or None."""
        return self.jobs.lease(worker, kinds, lease_seconds)

    def heartbeat_job(
        self, job_id: str, fencing_token: int, progress: Mapping[str, Any] | None = None
    ) -> datetime:
        """``agora.jobs.heartbeat``: extend the lease; the new expiry."""
        return self.jobs.heartbeat(job_id, fencing_token, progress)

    def complete_job(
        self,
        job_id: str,
        fencing_token: int,
        result: Mapping[str, Any],
        weights: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """``agora.jobs.complete``: report success (and upload a produced expert)."""
        return self.jobs.complete(job_id, fencing_token, result, weights, progress=progress)

    def fail_job(
        self,
        job_id: str,
        fencing_token: int,
        error: str,
        retryable: bool = True,
        release: bool = False,
    ) -> Job:
        """``agora.jobs.fail``: report a failure (or hand the job back with ``release``)."""
        return self.jobs.fail(job_id, fencing_token, error, retryable, release)
