"""Compositions: request one, wait for it, fetch its files (verified) and run it locally."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from registry.client.cache import parse_digest, place
from registry.client.composed import (
    ComposedModel,
    LocalComposition,
    expert_filename,
    model_loader,
)
from registry.client.errors import AgoraError, CompositionWarning, Conflict, warn_at_caller
from registry.client.jobs import CompositionHandle
from registry.client.models import (
    Composition,
    Expert,
    ExpertRef,
    JobAccepted,
    SearchResult,
    SubmittedExpert,
)
from registry.client.resources.bases import Bases
from registry.client.resources.jobs import Jobs
from registry.client.transport import ProgressCallback, Transport, parse, seg
from registry.protocol import METHOD_SPECS

ExpertSpec: TypeAlias = str | SubmittedExpert | SearchResult | ExpertRef | Expert
"""An expert named for a composition: an id (``"ex_..."``, ``"ex_...@3"``) or an SDK object."""


class Compositions:
    def __init__(self, transport: Transport, bases: Bases, jobs: Jobs) -> None:
        self._t = transport
        self._bases = bases
        self._jobs = jobs

    def create(
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
        ``registry.protocol.METHOD_SPECS`` for every method's parameters).

        ``experts`` are ids (latest version), ``"ex_...@3"``, or what the SDK returned for
        them (``SubmittedExpert``, ``SearchResult``: that exact version; ``Expert``: its
        latest); with ``texts`` and no experts, the registry picks the top ``k`` by
        retrieval and their c-BTM weights. ``temperature`` is retrieval's T in
        softmax(-d^2/T) (default: the registry's). ``base_revision`` defaults to the
        registry's only base model. Returns at once with a handle; ``handle.wait()``
        blocks until a worker has computed it. The same ``idempotency_key`` always gives
        the same job.

        The registry's cautions about the method are ``handle.warnings`` and are also
        warned as ``CompositionWarning``: ``average_may_harm`` for ``average`` (measured, a
        parameter average of independent experts harms; prefer ensemble or distill).
        """
        if experts is None and texts is None:
            raise ValueError("compose needs experts, texts, or both")
        params = _base_params(method, params, with_base=with_base, base_weight=base_weight)
        body: dict[str, Any] = {
            "method": method,
            "base_revision": base_revision or self._bases.only_revision(),
            "experts": [_expert_spec(e) for e in experts] if experts is not None else None,
            "texts": [texts] if isinstance(texts, str) else list(texts) if texts else None,
            "k": k,
            "weights": list(weights) if weights is not None else None,
            "params": params,
        }
        if temperature is not None:
            body["temperature"] = temperature
        response = self._t.request(
            "POST", "/v1/compositions", json=body, idempotency_key=idempotency_key
        )
        accepted = parse(JobAccepted, response)
        if accepted.composition_id is None:
            raise AgoraError(
                "the registry accepted the composition without a composition_id",
                status=response.status_code,
                code="bad_response",
            )
        for caution in accepted.warnings:
            warn_at_caller(CompositionWarning(caution.detail, code=caution.code))
        return CompositionHandle(
            self._jobs, self, accepted.job_id, accepted.composition_id, warnings=accepted.warnings
        )

    def get(self, composition_id: str) -> Composition:
        """The composition: ``status`` pending, verifying (an untrusted worker's output awaits
        a second worker's check), ready (``manifest`` set) or failed."""
        return self._t.get(Composition, f"/v1/compositions/{seg(composition_id)}")

    def handle(self, composition_id: str) -> CompositionHandle:
        """A handle on an existing composition, to ``wait()`` for it."""
        composition = self.get(composition_id)
        if composition.job_id is None:
            raise AgoraError(f"composition {composition_id} names no job", code="bad_response")
        return CompositionHandle(
            self._jobs, self, composition.job_id, composition.id, warnings=composition.warnings
        )

    def download(
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
        current = self.get(composition_id)
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
            else self._t.cache.root / "bases" / parse_digest(manifest.base_revision)
        )
        self._bases.download(manifest.base_revision, base_dir, progress=progress)
        refs = list(manifest.experts) + ([manifest.output] if manifest.output else [])
        files: dict[str, Path] = {}
        for ref in refs:
            path = self._t.cached_or_fetch(
                f"/v1/experts/{seg(ref.id)}/weights",
                params={"version": ref.version},
                digest=ref.digest,
                size=ref.size,
                progress=progress,
            )
            if target is not None:
                path = place(
                    path,
                    target / "experts" / expert_filename(ref.id, ref.version),
                    parse_digest(ref.digest),
                )
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

    def load(
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
        loader = model_loader()  # before downloading anything
        local = self.download(composition, progress=progress)
        return loader.build_composed_model(
            local.manifest, local.base_dir, local.expert_files, device=device
        )


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
