"""``Agora``: the Python client of the registry's HTTP API v1.

Requests that fail without a response (connection refused or reset, timeouts), or that
the server answers with 429 or a 5xx, are retried with exponential backoff and jitter; a
429's or 503's ``Retry-After`` is honoured. Every POST carries an ``Idempotency-Key``
generated once per call and reused by its retries, so a retried submission is applied once
by the server even when the first attempt's response was lost.

Uploads stream from disk; downloads stream to a ``.part`` file in the cache, resume it
with ``Range`` after an interruption, and are sha256-verified against the registry's
digest before they are returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self, TypeAlias, TypeVar

import httpx
from pydantic import BaseModel

from registry.client.cache import (
    BlobCache,
    HashingWriter,
    default_cache_dir,
    parse_digest,
    place,
    sha256_file,
)
from registry.client.composed import (
    LocalComposition,
    build_composed_model,
    expert_filename,
    require_model_dependencies,
)
from registry.client.errors import (
    AgoraError,
    BadRequest,
    CompositionWarning,
    Conflict,
    DigestMismatch,
    NotFound,
    TransportError,
    content_range_total,
    error_from_response,
    parse_retry_after,
)
from registry.client.jobs import CompositionHandle, EvaluationHandle, JobHandle
from registry.client.models import (
    BaseModelRevision,
    Composition,
    Evaluation,
    Expert,
    ExpertPage,
    ExpertRef,
    Job,
    JobAccepted,
    LeasedJob,
    ModerationAction,
    SearchResult,
    SearchResults,
    SubmittedExpert,
)
from registry.contracts import METHOD_SPECS

if TYPE_CHECKING:
    from registry.client.composed import ComposedModel

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TEMPERATURE = 0.1
# What `nearest_expert` sends of a contributor's data: under the server's 64 KiB / 256 texts
# search limits, spread evenly over the passages so a long corpus is sampled, not truncated.
NEAREST_MAX_BYTES = 60 * 1024
NEAREST_MAX_TEXTS = 200
# Reads may wait on the server validating a large upload (it hashes and scans every value
# after the last byte arrives), so the read timeout is generous; connecting is not.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
BACKOFF_CAP_S = 8.0
RETRY_AFTER_CAP_S = 60.0

ExpertSpec: TypeAlias = str | SubmittedExpert | SearchResult | ExpertRef | Expert
"""An expert named for a composition: an id (``"ex_..."``, ``"ex_...@3"``) or an SDK object."""

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None) as a transfer advances."""

_M = TypeVar("_M", bound=BaseModel)

# Failures where no response arrived, or the connection broke mid-response. Other httpx
# transport errors (an unsupported scheme, a bad proxy configuration) will not heal by retrying.
_RETRYABLE_EXC = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class _ProgressReader:
    """A binary file wrapper that reports how far httpx has read it.

    httpx's multipart encoder seeks every file to 0 before sending, so a retried attempt
    restarts the count too; ``fileno`` lets httpx take the length from ``fstat`` and send a
    Content-Length instead of chunked encoding.
    """

    def __init__(self, raw: IO[bytes], total: int, progress: ProgressCallback | None) -> None:
        self._raw = raw
        self._total = total
        self._progress = progress
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._done += len(chunk)
        if self._progress is not None and chunk:
            self._progress(self._done, self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        self._done = position
        return position

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()


class Agora:
    """Client of an Agora registry.

    >>> with Agora("http://127.0.0.1:8000", token="agora_...") as agora:  # doctest: +SKIP
    ...     submitted = agora.submit_expert("expert.safetensors", Path("datasheet.md"), rev)
    ...     path = agora.download(submitted.id)
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
        headers = {"User-Agent": "agora-sdk/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        self.cache = BlobCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # Indirection so tests can observe the delays without waiting them out.
        self._sleep: Callable[[float], None] = time.sleep
        self._clock: Callable[[], float] = time.monotonic

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- experts ---------------------------------------------------------------------------

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
        """Submit expert weights (a safetensors file) with their datasheet.

        ``datasheet`` is a path (``Path``, or a one-line ``str`` naming an existing file) or
        the markdown text itself. Pass ``expert_id`` to add a new version of your own expert.
        The weights stream from disk; they are never read whole into memory.
        """
        weights = Path(weights_path)
        datasheet_bytes = _datasheet_bytes(datasheet)
        data = {"base_revision": base_revision}
        if expert_id is not None:
            data["expert_id"] = expert_id
        with weights.open("rb") as raw:
            reader = _ProgressReader(raw, os.fstat(raw.fileno()).st_size, progress)
            files = {
                "weights": (weights.name, reader, "application/octet-stream"),
                "datasheet": ("datasheet.md", datasheet_bytes, "text/markdown"),
            }
            response = self._request(
                "POST",
                "/v1/experts",
                data=data,
                files=files,
                rewind=[raw],
                idempotency_key=idempotency_key,
            )
        return _parse(SubmittedExpert, response)

    def list_experts_page(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExpertPage:
        """One page of experts; pass its ``next_cursor`` back as ``cursor`` for the next."""
        params = {
            "base_revision": base_revision,
            "status": status,
            "q": q,
            "limit": limit,
            "cursor": cursor,
        }
        response = self._request(
            "GET", "/v1/experts", params={k: v for k, v in params.items() if v is not None}
        )
        return _parse(ExpertPage, response)

    def list_experts(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[Expert]:
        """Iterate over the matching experts, following cursors page by page (lazily).

        ``limit`` caps the number of experts yielded (None: all); ``page_size`` is how many
        each request asks for (the server caps it at 100).
        """
        if limit is not None and limit <= 0:
            return
        if page_size is None and limit is not None:
            page_size = min(limit, 100)
        yielded = 0
        cursor: str | None = None
        while True:
            page = self.list_experts_page(
                base_revision=base_revision, status=status, q=q, limit=page_size, cursor=cursor
            )
            for expert in page.items:
                yield expert
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def get_expert(self, expert_id: str) -> Expert:
        """The expert's metadata, with all its versions."""
        return _parse(Expert, self._request("GET", f"/v1/experts/{_seg(expert_id)}"))

    def get_datasheet(self, expert_id: str, version: int | None = None) -> str:
        """The datasheet markdown of the given (default: latest) version."""
        params = {"version": version} if version is not None else None
        response = self._request("GET", f"/v1/experts/{_seg(expert_id)}/datasheet", params=params)
        return response.text

    def download(
        self,
        expert_id: str,
        *,
        version: int | None = None,
        dest: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Download an expert's weights, verified against the registry's sha256.

        Returns the cached file, or ``dest`` (a file path, or a directory that receives
        ``<id>-v<version>.safetensors``) when given. A blob already in the cache is
        re-hashed and returned without transferring it again; an interrupted download
        resumes from its ``.part`` file.
        """
        expert = self.get_expert(expert_id)
        number = version if version is not None else expert.latest_version
        entry = next((v for v in expert.versions if v.version == number), None)
        if entry is None:
            raise NotFound(f"expert {expert_id} has no version {number}", code="version_not_found")
        hexdigest = parse_digest(entry.digest)
        # Only an active expert is served from the cache: for a disabled one the registry
        # must get the chance to answer 451 (or serve it to a moderator).
        cached = self.cache.lookup(hexdigest) if expert.status == "active" else None
        path = cached or self._fetch_blob(
            f"/v1/experts/{_seg(expert_id)}/weights",
            params={"version": number},
            hexdigest=hexdigest,
            size=entry.size,
            progress=progress,
        )
        if dest is None:
            return path
        target = Path(dest)
        if target.is_dir():
            target = target / f"{expert_id}-v{number}.safetensors"
        return place(path, target)

    # -- search and moderation -------------------------------------------------------------

    def search(
        self,
        texts: str | Sequence[str],
        base_revision: str,
        *,
        k: int = 4,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> SearchResults:
        """The ``k`` active experts of ``base_revision`` that best fit ``texts``, best first,
        with ensemble weights softmax(-d^2 / temperature) that sum to 1."""
        body = {
            "texts": [texts] if isinstance(texts, str) else list(texts),
            "base_revision": base_revision,
            "k": k,
            "temperature": temperature,
        }
        return _parse(SearchResults, self._request("POST", "/v1/search", json=body))

    def nearest_expert(
        self, texts_or_path: str | os.PathLike[str] | Sequence[str], base_revision: str
    ) -> SearchResult:
        """The existing expert closest to a contributor's data: a text file, a directory of
        ``.txt`` files, or the texts themselves. The starting point for training a new one
        (``agora expert init --from-nearest``)."""
        passages = _sample_passages(_read_passages(texts_or_path))
        if not passages:
            raise AgoraError("no text to compare with the experts", code="empty_texts")
        found = self.search(passages, base_revision, k=1)
        if not found.results:
            raise NotFound(
                f"base revision {base_revision} has no active expert yet", code="no_expert"
            )
        return found.results[0]

    def disable_expert(self, expert_id: str, reason: str) -> ModerationAction:
        """Withdraw an expert (moderator or admin): gone from search and downloads at once."""
        return self._moderate(expert_id, "disable", reason)

    def enable_expert(self, expert_id: str, reason: str) -> ModerationAction:
        """Re-enable a disabled expert (moderator or admin)."""
        return self._moderate(expert_id, "enable", reason)

    def _moderate(self, expert_id: str, action: str, reason: str) -> ModerationAction:
        response = self._request(
            "POST", f"/v1/experts/{_seg(expert_id)}/{action}", json={"reason": reason}
        )
        return _parse(ModerationAction, response)

    # -- base models -----------------------------------------------------------------------

    def list_base_models(self) -> list[BaseModelRevision]:
        response = self._request("GET", "/v1/base-models")
        body = _json(response)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise AgoraError("unexpected response to GET /v1/base-models", code="bad_response")
        return [BaseModelRevision.model_validate(item) for item in items]

    def get_base_model(self, revision: str) -> BaseModelRevision:
        return _parse(BaseModelRevision, self._request("GET", f"/v1/base-models/{_seg(revision)}"))

    def upload_base_model(
        self,
        config: str | os.PathLike[str],
        tokenizer: str | os.PathLike[str],
        weights: str | os.PathLike[str],
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> BaseModelRevision:
        """Store a base model revision (admin). Identical files give the same revision."""
        paths = {"config": Path(config), "tokenizer": Path(tokenizer), "weights": Path(weights)}
        with contextlib.ExitStack() as stack:
            raws = {field: stack.enter_context(p.open("rb")) for field, p in paths.items()}
            total = sum(os.fstat(raw.fileno()).st_size for raw in raws.values())
            # One running total across the three files, as one transfer.
            offsets: dict[str, int] = {}

            def report(field: str) -> ProgressCallback | None:
                if progress is None:
                    return None
                cb = progress

                def on_read(done: int, _total: int | None) -> None:
                    offsets[field] = done
                    cb(sum(offsets.values()), total)

                return on_read

            files = {
                field: (
                    paths[field].name,
                    _ProgressReader(raw, os.fstat(raw.fileno()).st_size, report(field)),
                    "application/octet-stream",
                )
                for field, raw in raws.items()
            }
            data = {"name": name} if name is not None else None
            response = self._request(
                "POST", "/v1/base-models", data=data, files=files, rewind=list(raws.values())
            )
        return _parse(BaseModelRevision, response)

    def download_base_model(
        self,
        revision: str,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Fetch ``config.json``, ``tokenizer.json`` and ``model.safetensors`` into ``dest_dir``."""
        base = self.get_base_model(revision)
        target = Path(dest_dir)
        target.mkdir(parents=True, exist_ok=True)
        layout = {
            "config": ("config.json", base.files.config),
            "tokenizer": ("tokenizer.json", base.files.tokenizer),
            "weights": ("model.safetensors", base.files.weights),
        }
        for kind, (filename, info) in layout.items():
            hexdigest = parse_digest(info.digest)
            path = self.cache.lookup(hexdigest) or self._fetch_blob(
                f"/v1/base-models/{_seg(revision)}/files/{kind}",
                params=None,
                hexdigest=hexdigest,
                size=info.size,
                progress=progress,
            )
            place(path, target / filename)
        return target

    # -- compositions and evaluations -----------------------------------------------------

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
        """Request a composition (``mixture``, ``ensemble``, ``average`` or ``distill``).

        An ``ensemble`` (and a ``distill``'s teacher) has the unmodified base as one more
        path, the null expert its posterior falls back on where no expert fits;
        ``with_base=False`` leaves it out. ``base_weight`` is its prior weight on the scale
        of ``weights`` (default: their mean). Both travel as ``params`` (see
        ``registry.contracts.METHOD_SPECS`` for every method's parameters).

        ``experts`` are ids (latest version), ``"ex_...@3"``, or what the SDK returned for
        them (``SubmittedExpert``, ``SearchResult``: that exact version; ``Expert``: its
        latest); with ``texts`` and no
        experts, the registry picks the top ``k`` by retrieval and their c-BTM weights.
        ``temperature`` is retrieval's T in softmax(-d^2/T) (default: the registry's).
        ``base_revision`` defaults to the registry's only base model. Returns at once with
        a handle; ``handle.wait()`` blocks until a worker has computed it. The same
        ``idempotency_key`` always gives the same job.

        The registry's cautions about the method are ``handle.warnings`` and are also
        warned as ``CompositionWarning``: ``average_may_harm`` for ``average`` (measured, a
        parameter average of independent experts harms; prefer ensemble or distill).
        """
        if experts is None and texts is None:
            raise ValueError("compose needs experts, texts, or both")
        params = _base_params(method, params, with_base=with_base, base_weight=base_weight)
        body: dict[str, Any] = {
            "method": method,
            "base_revision": base_revision or self._only_base_revision(),
            "experts": [_expert_spec(e) for e in experts] if experts is not None else None,
            "texts": [texts] if isinstance(texts, str) else list(texts) if texts else None,
            "k": k,
            "weights": list(weights) if weights is not None else None,
            "params": params,
        }
        if temperature is not None:
            body["temperature"] = temperature
        response = self._request(
            "POST", "/v1/compositions", json=body, idempotency_key=idempotency_key
        )
        accepted = _parse(JobAccepted, response)
        if accepted.composition_id is None:
            raise AgoraError(
                "the registry accepted the composition without a composition_id",
                status=response.status_code,
                code="bad_response",
            )
        for caution in accepted.warnings:
            warnings.warn(CompositionWarning(caution.detail, code=caution.code), stacklevel=2)
        return CompositionHandle(
            self, accepted.job_id, accepted.composition_id, warnings=accepted.warnings
        )

    def get_composition(self, composition_id: str) -> Composition:
        """The composition: ``status`` pending, ready (``manifest`` set) or failed."""
        return _parse(Composition, self._request("GET", f"/v1/compositions/{_seg(composition_id)}"))

    def composition(self, composition_id: str) -> CompositionHandle:
        """A handle on an existing composition, to ``wait()`` for it."""
        composition = self.get_composition(composition_id)
        if composition.job_id is None:
            raise AgoraError(f"composition {composition_id} names no job", code="bad_response")
        return CompositionHandle(
            self, composition.job_id, composition.id, warnings=composition.warnings
        )

    def get_job(self, job_id: str) -> Job:
        """A job (its submitter, moderators, admins and workers may read it)."""
        return _parse(Job, self._request("GET", f"/v1/jobs/{_seg(job_id)}"))

    def job(self, job_id: str) -> JobHandle:
        """A handle on any job by id, to ``wait()`` for it."""
        return JobHandle(self, job_id)

    def list_jobs(
        self, *, status: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs by status and kind, e.g. ``status="dead"`` (moderators and admins)."""
        params = {"status": status, "kind": kind, "limit": limit}
        response = self._request(
            "GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None}
        )
        return [Job.model_validate(item) for item in _items(response)]

    def evaluate(
        self,
        text_sets: Mapping[str, str | Sequence[str]],
        *,
        expert_id: str | None = None,
        version: int | None = None,
        composition_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationHandle:
        """Request bits per byte of an expert (as base + expert) or of a composition on
        named text sets, e.g. ``{"held_out": ["...", ...]}``. ``handle.wait()`` returns the
        scores; they are also stored (``list_evaluations``)."""
        if (expert_id is None) == (composition_id is None):
            raise ValueError("evaluate needs exactly one of expert_id and composition_id")
        body = {
            "expert_id": expert_id,
            "version": version,
            "composition_id": composition_id,
            "text_sets": {
                name: [texts] if isinstance(texts, str) else list(texts)
                for name, texts in text_sets.items()
            },
        }
        response = self._request(
            "POST", "/v1/evaluations", json=body, idempotency_key=idempotency_key
        )
        return EvaluationHandle(self, _parse(JobAccepted, response).job_id)

    def list_evaluations(
        self, *, expert_id: str | None = None, composition_id: str | None = None
    ) -> list[Evaluation]:
        """The stored evaluations of an expert (all versions) or of a composition."""
        if (expert_id is None) == (composition_id is None):
            raise ValueError("list_evaluations needs exactly one of expert_id and composition_id")
        path = (
            f"/v1/experts/{_seg(expert_id)}/evaluations"
            if expert_id is not None
            else f"/v1/compositions/{_seg(composition_id or '')}/evaluations"
        )
        return [Evaluation.model_validate(item) for item in _items(self._request("GET", path))]

    def download_composition(
        self,
        composition: str | Composition,
        dest_dir: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> LocalComposition:
        """Fetch everything a ready composition needs to run, sha256-verified and cached.

        With ``dest_dir`` the files are also placed there for offline use:
        ``manifest.json``, ``base/`` (the base bundle) and
        ``experts/<id>-v<version>.safetensors`` (``load_composed_dir`` reads that layout).
        Without it the base bundle goes under the cache and the experts stay in it.
        Every expert file is checked against the digest the manifest names.
        """
        composition_id = composition if isinstance(composition, str) else composition.id
        # Always asked again: the registry answers 451 if an expert was disabled since.
        current = self.get_composition(composition_id)
        if current.status != "ready" or current.manifest is None:
            raise Conflict(
                f"composition {composition_id} is {current.status}, not ready"
                + (f" (job {current.job_id})" if current.job_id else ""),
                code="composition_not_ready",
            )
        manifest = current.manifest
        target = Path(dest_dir) if dest_dir is not None else None
        base_dir = (
            target / "base"
            if target is not None
            else self.cache.root / "bases" / parse_digest(manifest.base_revision)
        )
        self.download_base_model(manifest.base_revision, base_dir, progress=progress)
        refs = list(manifest.experts) + ([manifest.output] if manifest.output else [])
        files: dict[str, Path] = {}
        for ref in refs:
            hexdigest = parse_digest(ref.digest)
            path = self.cache.lookup(hexdigest) or self._fetch_blob(
                f"/v1/experts/{_seg(ref.id)}/weights",
                params={"version": ref.version},
                hexdigest=hexdigest,
                size=ref.size,
                progress=progress,
            )
            if target is not None:
                path = place(path, target / "experts" / expert_filename(ref.id, ref.version))
            files[ref.digest] = path
        raw = manifest.model_dump(mode="json", exclude_unset=True)
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
            tmp = target / f".manifest.json.{os.getpid()}.{uuid.uuid4().hex[:12]}.agora-tmp"
            tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, target / "manifest.json")
        return LocalComposition(
            composition=current, manifest=raw, base_dir=base_dir, expert_files=files
        )

    def load_composed(
        self,
        composition: str | Composition,
        *,
        device: str = "cpu",
        progress: ProgressCallback | None = None,
    ) -> ComposedModel:
        """A ready composition as a local ``modelcore`` model that scores and generates.

        Downloads the base bundle and every expert the manifest names (verified against
        the manifest's digests, cached: a second call transfers nothing), then builds
        ``ComposedModel.from_manifest``. Needs the model extra (``pip install
        'agora[model]'``); ``ModelDependenciesMissing`` says so otherwise.
        """
        require_model_dependencies()  # before downloading anything
        local = self.download_composition(composition, progress=progress)
        return build_composed_model(
            local.manifest, local.base_dir, local.expert_files, device=device
        )

    def _only_base_revision(self) -> str:
        bases = self.list_base_models()
        if len(bases) != 1:
            raise BadRequest(
                f"the registry has {len(bases)} base models: name one with base_revision "
                f"({', '.join(b.revision[:12] for b in bases) or 'none yet'})",
                code="base_revision_required",
            )
        return bases[0].revision

    # -- jobs: the worker's side ----------------------------------------------------------

    def lease_job(
        self,
        worker: str,
        kinds: Sequence[str] | None = None,
        lease_seconds: float = 60,
    ) -> LeasedJob | None:
        """Lease the next runnable job (role worker or admin), or None when there is none.

        ``kinds`` limits which job kinds this worker takes (None: any). The lease lasts
        ``lease_seconds`` (the registry clamps it to [2, 3600]) and is extended by
        ``heartbeat_job``; every later call about the job must carry the returned
        ``fencing_token``.
        """
        body = {
            "worker": worker,
            "kinds": list(kinds) if kinds is not None else None,
            "lease_seconds": lease_seconds,
        }
        response = self._request("POST", "/v1/jobs/lease", json=body)
        if response.status_code == 204:
            return None
        data = _json(response)
        job = Job.model_validate(data.get("job") if isinstance(data, dict) else None)
        if job.fencing_token is None:
            raise AgoraError(
                f"the registry leased job {job.id} without a fencing token", code="bad_response"
            )
        return LeasedJob(job=job, fencing_token=job.fencing_token)

    def heartbeat_job(
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
        response = self._request("POST", f"/v1/jobs/{_seg(job_id)}/heartbeat", json=body)
        data = _json(response)
        expires = data.get("lease_expires_at") if isinstance(data, dict) else None
        if not isinstance(expires, str):
            raise AgoraError(
                "the heartbeat answer has no lease_expires_at",
                status=response.status_code,
                code="bad_response",
            )
        return datetime.fromisoformat(expires)

    def complete_job(
        self,
        job_id: str,
        fencing_token: int,
        result: Mapping[str, Any],
        weights: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """Report success with ``result``; ``weights`` (an agora.expert/1 safetensors file,
        streamed from disk) is the new expert of an ``average`` or ``distill`` job.

        Repeating the same completion is harmless (the registry answers with the same job);
        ``LeaseLost`` when this worker no longer holds the lease, ``ValidationFailed`` (422)
        when the output is invalid (then report it with ``fail_job(..., retryable=False)``).
        """
        path = f"/v1/jobs/{_seg(job_id)}/complete"
        if weights is None:
            body = {"fencing_token": fencing_token, "result": dict(result)}
            return _parse(Job, self._request("POST", path, json=body))
        file = Path(weights)
        data = {
            "fencing_token": str(fencing_token),
            "result": json.dumps(dict(result), allow_nan=False),
        }
        with file.open("rb") as raw:
            reader = _ProgressReader(raw, os.fstat(raw.fileno()).st_size, progress)
            files = {"weights": (file.name, reader, "application/octet-stream")}
            response = self._request("POST", path, data=data, files=files, rewind=[raw])
        return _parse(Job, response)

    def fail_job(
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
        return _parse(Job, self._request("POST", f"/v1/jobs/{_seg(job_id)}/fail", json=body))

    # -- transfers -------------------------------------------------------------------------

    def _fetch_blob(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> Path:
        with self.cache.locked(hexdigest):
            # Another process (or thread) sharing this cache may have fetched it meanwhile.
            cached = self.cache.lookup(hexdigest)
            if cached is not None:
                return cached
            return self._fetch_blob_locked(
                path, params=params, hexdigest=hexdigest, size=size, progress=progress
            )

    def _fetch_blob_locked(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> Path:
        part = self.cache.part_path(hexdigest)
        resumed = part.exists() and part.stat().st_size > 0
        got = self._stream_to_part(
            path, params=params, part=part, hexdigest=hexdigest, size=size, progress=progress
        )
        if got != hexdigest and resumed:
            # The bytes kept from an earlier attempt may be the bad ones: start over once.
            part.unlink(missing_ok=True)
            got = self._stream_to_part(
                path, params=params, part=part, hexdigest=hexdigest, size=size, progress=progress
            )
        if got != hexdigest:
            part.unlink(missing_ok=True)
            raise DigestMismatch(
                f"downloaded bytes hash to sha256:{got}, the registry advertised "
                f"sha256:{hexdigest}; nothing was kept"
            )
        return self.cache.commit(part, hexdigest)

    def _stream_to_part(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        part: Path,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> str:
        """Stream the blob into ``part`` (resuming what is there); the sha256 hex of it all."""
        hasher = hashlib.sha256()
        offset = 0
        if part.exists():
            offset = part.stat().st_size
            if size is not None and offset > size:
                part.unlink()
                offset = 0
            else:
                # Hash what is kept so the final digest covers the whole file.
                sha256_file(part, hasher)
                if offset == size:
                    # Complete but never renamed (interrupted at the end): the caller's
                    # digest check decides, no request needed.
                    return hasher.hexdigest()
        failures = 0
        while True:
            # Byte ranges are offsets into the stored bytes, so ask for them uncompressed.
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with self._stream(
                    "GET", path, params=params, headers=headers, also_ok=frozenset({416})
                ) as response:
                    if response.status_code == 416:
                        # Nothing left to send from `offset`: either the part is complete
                        # (the digest check decides) or it is longer than the blob.
                        total = content_range_total(response.headers.get("Content-Range"))
                        if total is not None and total == offset:
                            return hasher.hexdigest()
                        hasher, offset = hashlib.sha256(), 0
                        part.unlink(missing_ok=True)
                        failures += 1
                        if failures > self.max_retries:
                            raise AgoraError(
                                "the registry refused every byte range",
                                status=416,
                                code="range_not_satisfiable",
                            )
                        continue
                    if response.status_code == 206:
                        start = _content_range_start(response.headers.get("Content-Range"))
                        if start != offset:
                            raise AgoraError(
                                f"asked for bytes from {offset}, got a range from {start}",
                                status=206,
                                code="bad_content_range",
                            )
                        mode = "ab"
                    else:
                        # A 200 is the whole blob: the server ignored (or could not honour)
                        # the range, so whatever the part held is replaced.
                        hasher, offset, mode = hashlib.sha256(), 0, "wb"
                    advertised = response.headers.get("X-Agora-Digest")
                    if advertised is not None and parse_digest(advertised) != hexdigest:
                        raise DigestMismatch(
                            f"the registry serves {advertised} where sha256:{hexdigest} "
                            "was expected"
                        )
                    # The writer is closed (every chunk received is on disk) before an
                    # exception leaves this block, so `offset` is exactly the part's size.
                    with HashingWriter(part, mode, hasher) as out:
                        encoded = response.headers.get("Content-Encoding", "identity")
                        # iter_raw skips httpx's decoder layer; only a server that ignored
                        # our Accept-Encoding needs the decoding iterator.
                        chunks = (
                            response.iter_raw()
                            if encoded.strip().lower() == "identity"
                            else response.iter_bytes()
                        )
                        for chunk in chunks:
                            out.write(chunk)
                            offset += len(chunk)
                            if progress is not None:
                                progress(offset, size)
                return hasher.hexdigest()
            except _RETRYABLE_EXC as exc:
                # The connection broke mid-body: what arrived is on disk, resume after it.
                failures += 1
                if failures > self.max_retries:
                    raise TransportError(f"download of {path} failed: {exc}") from exc
                self._sleep(self._backoff(failures - 1))

    # -- request machinery ----------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        delay = min(BACKOFF_CAP_S, self.backoff_factor * 2.0**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        rewind: list[IO[bytes]] | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
        also_ok: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Send with retries; returns a 2xx (or ``also_ok``) response, else raises a typed error."""
        all_headers = dict(headers or {})
        if method == "POST":
            # One key per logical call, reused by every retry of it.
            all_headers["Idempotency-Key"] = idempotency_key or f"agora-{uuid.uuid4().hex}"
        attempt = 0
        while True:
            for raw in rewind or ():
                raw.seek(0)
            request = self._http.build_request(
                method, path, params=params, data=data, files=files, json=json, headers=all_headers
            )
            try:
                response = self._http.send(request, stream=stream)
            except _RETRYABLE_EXC as exc:
                if attempt >= self.max_retries:
                    raise TransportError(
                        f"{method} {self.base_url}{path} failed after {attempt + 1} "
                        f"attempt(s): {exc or type(exc).__name__}"
                    ) from exc
                delay = self._backoff(attempt)
            except httpx.HTTPError as exc:
                raise TransportError(f"{method} {self.base_url}{path}: {exc}") from exc
            else:
                if response.is_success or response.status_code in also_ok:
                    return response
                if stream:
                    response.read()
                response.close()
                if not _retryable_status(response.status_code) or attempt >= self.max_retries:
                    raise error_from_response(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = (
                    min(retry_after, RETRY_AFTER_CAP_S)
                    if retry_after is not None
                    else self._backoff(attempt)
                )
            self._sleep(delay)
            attempt += 1

    @contextlib.contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self._request(method, path, stream=True, **kwargs)
        try:
            yield response
        finally:
            response.close()


def _seg(value: str) -> str:
    """A path segment, percent-encoded so an id can never add path components."""
    from urllib.parse import quote

    return quote(value, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise AgoraError(
            f"the registry answered {response.request.method} {response.request.url.path} "
            "with a body that is not JSON",
            status=response.status_code,
            code="bad_response",
        ) from exc


def _base_params(
    method: str,
    params: Mapping[str, Any] | None,
    *,
    with_base: bool,
    base_weight: float | None,
) -> dict[str, Any]:
    """``params`` with the base path's settings, for the methods that have a base path
    (ensemble, distill). ``params`` may say them instead (as the REST API takes them); a
    keyword that contradicts it is a ``ValueError``."""
    out = dict(params or {})
    spec = METHOD_SPECS.get(method)
    if spec is None:  # the registry answers invalid_method
        return out
    if not any(p.name == "with_base" for p in spec.params):
        if not with_base or base_weight is not None:
            raise ValueError(
                f"with_base and base_weight are for ensemble and distill, not {method}"
            )
        return out
    if "with_base" not in out:
        out["with_base"] = with_base
    elif not with_base and out["with_base"] is not False:
        raise ValueError(f"params['with_base'] is {out['with_base']!r} but with_base=False")
    if base_weight is not None:
        if out.get("base_weight", base_weight) != base_weight:
            raise ValueError(
                f"params['base_weight'] is {out['base_weight']!r} but base_weight={base_weight!r}"
            )
        out["base_weight"] = base_weight
    return out


def _expert_spec(expert: ExpertSpec) -> str:
    """``id`` or ``id@version`` for the registry, from an id or an SDK object naming one."""
    if isinstance(expert, str):
        return expert
    if isinstance(expert, SearchResult):
        return f"{expert.expert_id}@{expert.version}"
    if isinstance(expert, SubmittedExpert | ExpertRef):
        return f"{expert.id}@{expert.version}"
    if isinstance(expert, Expert):
        return expert.id
    raise TypeError(f"not an expert id or SDK expert object: {expert!r}")


def _items(response: httpx.Response) -> list[Any]:
    body = _json(response)
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise AgoraError(
            f"unexpected response to {response.request.method} {response.request.url.path}",
            status=response.status_code,
            code="bad_response",
        )
    return items


def _parse(model: type[_M], response: httpx.Response) -> _M:
    return model.model_validate(_json(response))


def _datasheet_bytes(datasheet: str | os.PathLike[str]) -> bytes:
    if isinstance(datasheet, os.PathLike):
        return Path(datasheet).read_bytes()
    # A one-line string naming an existing file is a path; anything else is the markdown.
    if "\n" not in datasheet and datasheet.strip() and Path(datasheet).is_file():
        return Path(datasheet).read_bytes()
    return datasheet.encode("utf-8")


def _read_passages(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Passages (blank-line separated paragraphs) of a file, of a directory's ``.txt``
    files, or the given texts; a one-line string naming an existing path is that path."""
    if isinstance(source, str) and ("\n" in source or not Path(source).exists()):
        texts = [source]
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise AgoraError(f"{path} holds no .txt file", code="empty_texts")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        texts = list(source)
    passages: list[str] = []
    for text in texts:
        passages += [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return passages


def _sample_passages(passages: list[str]) -> list[str]:
    """At most NEAREST_MAX_TEXTS passages and NEAREST_MAX_BYTES, taken evenly across."""
    if not passages:
        return []
    average = max(1, sum(len(p.encode()) for p in passages) // len(passages))
    count = min(len(passages), NEAREST_MAX_TEXTS, max(1, NEAREST_MAX_BYTES // average))
    step = len(passages) / count
    picked = [passages[int(i * step)] for i in range(count)]
    out: list[str] = []
    budget = NEAREST_MAX_BYTES
    for passage in picked:
        data = passage.encode()[:budget].decode(errors="ignore")
        if not data:
            break
        out.append(data)
        budget -= len(data.encode())
    return out


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/1000"
    if not value or not value.startswith("bytes "):
        return None
    span = value[len("bytes ") :].split("/", 1)[0]
    start, _, _ = span.partition("-")
    return int(start) if start.strip().isdigit() else None
