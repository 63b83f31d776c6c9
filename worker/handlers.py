"""What a worker computes for each job kind: payload + local files in, result (+ file) out.

One function per kind (``HANDLERS``), each ``handler(payload, inputs, ctx) -> Outcome``:

* ``compose.mixture``: the experts inserted into the base; ``metrics`` only.
* ``compose.ensemble``: DEMix ensemble with the unmodified base as one more path, last
  (``params.with_base``, default true: the null expert the posterior falls back on); the
  prior is the payload's weights (and ``params.base_weight``) or, without them, estimated
  on the payload texts (``estimate_prior``, over every path); ``weights`` = the experts'
  shares of that prior, ``base_weight`` the base's (together they sum to 1).
* ``compose.average``: uniform / weighted / TIES merge of the expert files, streamed
  (``merge_files``); the merged expert is the output file. Weights estimated on the texts
  are the posterior over the experts alone: the base cannot be averaged in.
* ``compose.distill``: an expert student trained on the ensemble's distributions over the
  payload texts (``compose.distill``); the teacher has the base as a path as an ensemble
  does (``params.with_base``); the student is the output file.
* ``evaluate``: bits per byte of an expert (base + it) or of a composition (its
  manifest) and of the base on each named text set, with the relative change
  ``delta_vs_base``.

Results are ``registry.contracts``' ``ComposeResult`` and ``EvaluationResult``, the shapes
the registry validates.

``metrics`` of every compose job is base vs composition bits per byte on the payload
texts (``ComposedModel.bits_per_byte``, ``modelcore.eval`` accounting), or None when
there are no texts.

Errors: a payload that can never work (unknown kind or method, malformed refs, params of
the wrong type, an expert file that does not fit the base) raises ``PermanentJobError``
and the worker fails the job for good; anything else is treated as transient (retried by
the registry with backoff). ``JobCancelled`` is raised from inside long loops when the
context says to stop (lease lost, worker shutting down).

Content addressing: outputs depend only on the payload (fixed seeds, canonical merge
order), so a job re-run after a crash uploads the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelcore.artifacts import BaseBundle, load_base
from modelcore.compose.composed import (
    ComposedModel,
    manifest_inputs,
    manifest_weights,
    manifest_with_base,
    normalise_prior,
)
from modelcore.compose.distill import DistillSettings, describe, distill
from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
from modelcore.compose.merge import merge_files
from modelcore.data.batches import eval_batches, token_batches, token_stream
from modelcore.eval import evaluate
from modelcore.experts import EXPERT_FORMAT, covered_layers, load_expert
from registry.contracts import (
    METHOD_SPECS,
    ComposeResult,
    EvaluationResult,
    ParamError,
    TextSetScore,
)

COMPOSE_KINDS = ("compose.mixture", "compose.ensemble", "compose.average", "compose.distill")
KINDS = (*COMPOSE_KINDS, "evaluate")
# From the method specs the registry checks requests against (registry.contracts).
MERGE_METHODS = METHOD_SPECS["average"].param("merge").choices
DISTILL_DEFAULTS = METHOD_SPECS["distill"].defaults()
PRIOR_WINDOWS = int(METHOD_SPECS["ensemble"].defaults()["prior_windows"])


class PermanentJobError(Exception):
    """The job cannot succeed as given: the worker fails it with ``retryable: false``."""


class JobCancelled(Exception):
    """Stop working on the job now (its lease was lost, or the worker is releasing it)."""


@dataclass(frozen=True)
class ExpertRef:
    id: str
    version: int
    digest: str
    size: int | None = None


@dataclass
class Outcome:
    """What a handler returns: the JSON result and, for average/distill, the new expert."""

    result: dict[str, Any]
    weights: Path | None = None


class BaseCache:
    """Keeps the last loaded base in memory: consecutive jobs on one base skip the load.

    Handlers leave the base as they found it (experts removed after use); ``verify``
    drops the cached one if something did not, so the next job loads a clean copy.
    """

    def __init__(self, device: str = "cpu", kernels: str = "auto") -> None:
        self.device = device
        self.kernels = kernels
        self._bundle: BaseBundle | None = None
        self._modules: list[int] = []

    def get(self, base_dir: str | os.PathLike[str], revision: str) -> BaseBundle:
        if self._bundle is not None and self._bundle.revision == revision:
            return self._bundle
        self._bundle = None  # free the old one before loading the next
        bundle = load_base(base_dir, device=self.device, kernels=self.kernels)
        if bundle.revision != revision:
            raise PermanentJobError(
                f"the base files downloaded for {revision} are revision {bundle.revision}"
            )
        bundle.model.eval()
        self._bundle = bundle
        self._modules = list(bundle.model.n_modules)
        return bundle

    def holds(self, revision: str) -> bool:
        return self._bundle is not None and self._bundle.revision == revision

    def verify(self) -> None:
        if self._bundle is not None and list(self._bundle.model.n_modules) != self._modules:
            self._bundle = None


@dataclass
class JobContext:
    """How a handler talks to the worker: progress, cancellation, scratch space, bases."""

    work_dir: Path
    bases: BaseCache = field(default_factory=BaseCache)
    progress: Callable[[int, int, str], None] = lambda done, total, message: None
    cancelled: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.cancelled():
            raise JobCancelled("job cancelled")


@dataclass
class JobInputs:
    """The local files of a job: the base bundle directory and the expert files."""

    base_dir: Path
    expert_files: Mapping[str, Path]  # "sha256:<hex>" -> file


Handler = Callable[[Mapping[str, Any], JobInputs, JobContext], Outcome]


# -- payload parsing ----------------------------------------------------------------------
def _ref(value: Any, where: str) -> ExpertRef:
    if not isinstance(value, Mapping):
        raise PermanentJobError(f"{where} must be an expert reference object")
    expert_id, version, digest = value.get("id"), value.get("version"), value.get("digest")
    if not isinstance(expert_id, str) or not expert_id:
        raise PermanentJobError(f"{where}.id must be a non-empty string")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PermanentJobError(f"{where}.version must be a positive integer")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise PermanentJobError(f"{where}.digest must be 'sha256:<64 hex>'")
    size = value.get("size")
    return ExpertRef(expert_id, version, digest, size if isinstance(size, int) else None)


def _base_revision(payload: Mapping[str, Any]) -> str:
    rev = payload.get("base_revision")
    if not isinstance(rev, str) or len(rev) != 64:
        raise PermanentJobError("payload.base_revision must be a 64-hex revision")
    return rev


def _compose_refs(payload: Mapping[str, Any]) -> list[ExpertRef]:
    experts = payload.get("experts")
    if not isinstance(experts, list) or not experts:
        raise PermanentJobError("payload.experts must be a non-empty list")
    return [_ref(e, f"payload.experts[{i}]") for i, e in enumerate(experts)]


def _texts(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise PermanentJobError(f"{where} must be a list of strings")
    return [t for t in value if t]


def _weights(payload: Mapping[str, Any], n: int) -> list[float] | None:
    weights = payload.get("weights")
    if weights is None:
        return None
    if not isinstance(weights, list) or len(weights) != n:
        raise PermanentJobError(f"payload.weights must be a list of {n} numbers or null")
    try:
        values = [float(w) for w in weights]
        normalise_prior(values, n)
    except (TypeError, ValueError) as exc:
        raise PermanentJobError(f"payload.weights: {exc}") from None
    return values


def _params(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    params = payload.get("params") or {}
    if not isinstance(params, Mapping):
        raise PermanentJobError("payload.params must be an object")
    return params


def _base_path(
    payload: Mapping[str, Any], method: str, weights: Sequence[float] | None
) -> tuple[bool, float | None]:
    """``(with_base, base_weight)`` of an ensemble or distill payload's params, checked
    as the registry checks them (the registry fills ``with_base`` in; absent = true)."""
    params = _params(payload)
    spec = METHOD_SPECS[method]
    try:
        with_base = spec.param("with_base").check(params.get("with_base", True))
        base_weight = spec.param("base_weight").check(params.get("base_weight"))
    except ParamError as exc:
        raise PermanentJobError(str(exc)) from None
    assert isinstance(with_base, bool)
    assert base_weight is None or isinstance(base_weight, float)
    if base_weight is not None and not with_base:
        raise PermanentJobError("params.base_weight needs params.with_base")
    if base_weight is not None and weights is None:
        raise PermanentJobError("params.base_weight needs payload.weights (the experts')")
    return with_base, base_weight


def _shares(
    log_prior: torch.Tensor, n_experts: int, with_base: bool
) -> tuple[list[float], float | None]:
    """A prior over the paths as (the experts' shares, the base's share or None), summing
    to 1 together."""
    p = log_prior.double().exp()
    p = p / p.sum()
    shares = [float(x) for x in p]
    if len(shares) != n_experts + int(with_base):
        raise RuntimeError(f"a prior of {len(shares)} paths for {n_experts} experts")
    return shares[:n_experts], shares[n_experts] if with_base else None


def _result(**fields: Any) -> dict[str, Any]:
    return ComposeResult(**fields).model_dump(mode="json", exclude_none=True)


def _evaluate_subject(
    payload: Mapping[str, Any],
) -> tuple[str, list[ExpertRef], Mapping[str, Any] | None]:
    """(method, refs the subject needs files for, manifest or None)."""
    subject = payload.get("subject")
    if not isinstance(subject, Mapping):
        raise PermanentJobError("payload.subject must be an object")
    if subject.get("kind") == "expert":
        return "mixture", [_ref(subject.get("expert"), "payload.subject.expert")], None
    if subject.get("kind") == "composition":
        manifest = subject.get("manifest")
        if not isinstance(manifest, Mapping):
            raise PermanentJobError("payload.subject.manifest must be an object")
        try:
            method, refs = manifest_inputs(manifest)
        except ValueError as exc:
            raise PermanentJobError(f"payload.subject.manifest: {exc}") from None
        if manifest.get("base_revision") not in (None, payload.get("base_revision")):
            raise PermanentJobError("the composition's base is not the payload's base_revision")
        return method, [_ref(r, "payload.subject.manifest expert") for r in refs], manifest
    raise PermanentJobError("payload.subject.kind must be 'expert' or 'composition'")


def required_inputs(kind: str, payload: Mapping[str, Any]) -> tuple[str, list[ExpertRef]]:
    """The base revision and the expert versions a job needs downloaded."""
    if kind not in KINDS:
        raise PermanentJobError(f"unknown job kind {kind!r}; this worker runs {list(KINDS)}")
    if not isinstance(payload, Mapping):
        raise PermanentJobError("the job payload must be an object")
    revision = _base_revision(payload)
    if kind == "evaluate":
        return revision, _evaluate_subject(payload)[1]
    method = payload.get("method")
    if method is not None and f"compose.{method}" != kind:
        raise PermanentJobError(f"payload.method {method!r} does not match job kind {kind!r}")
    return revision, _compose_refs(payload)


# -- output files -------------------------------------------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_expert_file(
    path: Path, tensors: Mapping[str, torch.Tensor], *, base_revision: str
) -> None:
    """An agora.expert/1 file with a canonical header (sorted keys, fixed metadata order).

    ``safetensors.save_file`` orders the metadata differently from one call to the next,
    so the same tensors could give different bytes (and digests); outputs must be content
    addressed, so a re-run of a job uploads the very same file.
    """
    names = sorted(tensors)
    dtypes = {tensors[n].dtype for n in names}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ST_DTYPES:
        raise ValueError("expert tensors must share one of float32, bfloat16, float16")
    dtype = next(iter(dtypes))
    metadata = {
        "base_revision": base_revision,
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float16"),
        "format": EXPERT_FORMAT,
        "layers": json.dumps(covered_layers(tensors)),
        "n_modules": "1",
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        raw = (t.view(torch.int16) if t.element_size() == 2 else t).numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


# -- shared steps -------------------------------------------------------------------------
def _load_experts(
    refs: Sequence[ExpertRef], inputs: JobInputs, bundle: BaseBundle, ctx: JobContext
) -> list[dict[str, torch.Tensor]]:
    out = []
    for ref in refs:
        ctx.check()
        path = inputs.expert_files.get(ref.digest)
        if path is None:
            raise RuntimeError(f"no local file for {ref.id} v{ref.version} ({ref.digest})")
        try:
            tensors, meta = load_expert(path, config=bundle.config)
        except ValueError as exc:
            raise PermanentJobError(f"expert {ref.id} v{ref.version} does not fit: {exc}") from None
        if meta["base_revision"] != bundle.revision:
            raise PermanentJobError(
                f"expert {ref.id} v{ref.version} was made for base {meta['base_revision']}"
            )
        out.append(tensors)
    return out


def _base_bits(bundle: BaseBundle, texts: Sequence[str]) -> dict[str, Any]:
    return dict(evaluate(bundle.model, bundle.tokenizer, {"texts": texts})["texts"])


def _metrics(
    bundle: BaseBundle, make: Callable[[], ComposedModel], texts: Sequence[str], ctx: JobContext
) -> dict[str, Any] | None:
    """Base vs composition bits per byte on ``texts`` (None without texts). The base is
    scored first, before ``make`` may insert experts into it."""
    if not texts:
        return None
    ctx.check()
    base = _base_bits(bundle, texts)
    ctx.check()
    with make() as composed:
        comp = composed.bits_per_byte(texts)
    return {
        "base_bits_per_byte": base["bits_per_byte"],
        "bits_per_byte": comp["bits_per_byte"],
        "bytes": comp["bytes"],
    }


def _prior_batches(bundle: BaseBundle, texts: Sequence[str]) -> list[torch.Tensor]:
    window = int(bundle.model.config.max_seq_len)
    return [
        b.tokens for b in eval_batches(bundle.tokenizer, list(texts), seq_len=window, batch_size=8)
    ]


def _int_param(params: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PermanentJobError(f"params.{key} must be an integer >= {low}")
    return value


def _float_param(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise PermanentJobError(f"params.{key} must be a number")
    return float(value)


def _setup(
    payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext
) -> tuple[BaseBundle, list[ExpertRef], list[dict[str, torch.Tensor]], list[str]]:
    revision = _base_revision(payload)
    refs = _compose_refs(payload)
    texts = _texts(payload.get("texts"), "payload.texts")
    bundle = ctx.bases.get(inputs.base_dir, revision)
    return bundle, refs, _load_experts(refs, inputs, bundle, ctx), texts


# -- handlers -----------------------------------------------------------------------------
def compose_mixture(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, refs, experts, texts = _setup(payload, inputs, ctx)
    ctx.progress(0, 1, "mixture")
    metrics = _metrics(bundle, lambda: ComposedModel(bundle, "mixture", experts), texts, ctx)
    ctx.progress(1, 1, "mixture")
    return Outcome(_result(metrics=metrics, details={"experts": len(refs)}))


def compose_ensemble(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, refs, experts, texts = _setup(payload, inputs, ctx)
    n = len(refs)
    weights = _weights(payload, n)
    with_base, base_weight = _base_path(payload, "ensemble", weights)
    prior_windows = _int_param(_params(payload), "prior_windows", PRIOR_WINDOWS, 1)
    ctx.progress(0, 2, "prior")
    with ComposedModel(
        bundle, "ensemble", experts, weights=weights, with_base=with_base, base_weight=base_weight
    ) as composed:
        assert composed.ensemble is not None
        assert composed.log_prior is not None
        if weights is not None:
            source = "given"
            log_prior = composed.log_prior
        elif texts:
            ctx.check()
            log_prior = estimate_prior(
                composed.ensemble, _prior_batches(bundle, texts), n_sequences=prior_windows
            )
            source = "estimated"
        else:
            log_prior = composed.log_prior  # uniform over the paths
            source = "uniform"
        expert_shares, base_share = _shares(log_prior, n, with_base)
        composed.log_prior = normalise_prior(
            expert_shares, composed.ensemble.n_paths, with_base=with_base, base_weight=base_share
        ).to(composed.device)
        ctx.progress(1, 2, "bits per byte")
        metrics = None
        if texts:
            ctx.check()
            base = _base_bits(bundle, texts)
            ctx.check()
            comp = composed.bits_per_byte(texts)
            metrics = {
                "base_bits_per_byte": base["bits_per_byte"],
                "bits_per_byte": comp["bits_per_byte"],
                "bytes": comp["bytes"],
            }
    ctx.progress(2, 2, "done")
    details = {
        "prior": source,
        "prior_windows": prior_windows,
        "experts": n,
        "with_base": with_base,
    }
    return Outcome(
        _result(
            weights=expert_shares,
            base_weight=base_share,
            with_base=with_base,
            metrics=metrics,
            details=details,
        )
    )


def compose_average(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    revision = _base_revision(payload)
    refs = _compose_refs(payload)
    texts = _texts(payload.get("texts"), "payload.texts")
    params = _params(payload)
    merge = params.get("merge", "uniform")
    if merge not in MERGE_METHODS:
        raise PermanentJobError(f"params.merge must be one of {list(MERGE_METHODS)}")
    bundle = ctx.bases.get(inputs.base_dir, revision)
    experts = _load_experts(refs, inputs, bundle, ctx)  # checks every file against the base
    weights = _weights(payload, len(refs))
    source = "given"
    if merge == "uniform":
        weights, source = None, "uniform"
    elif merge == "weighted" and weights is None:
        if not texts:
            raise PermanentJobError("weighted averaging needs weights or texts to estimate them")
        # DEMix's posterior prior on the target text as the merge weights.
        ctx.check()
        # Over the experts only: the base is what every expert is added to, not a
        # parameter set that could take a share of the average.
        ensemble = ExpertEnsemble(bundle.model, experts, include_base=False)
        log_prior = estimate_prior(ensemble, _prior_batches(bundle, texts))
        weights = [float(w) for w in log_prior.double().exp()]
        source = "estimated"
        del ensemble
    extra: dict[str, Any] = {}
    if merge == "ties":
        extra["density"] = _float_param(params, "density", 0.2)
        if not 0 < extra["density"] <= 1:
            raise PermanentJobError("params.density must be in (0, 1]")
    ctx.progress(0, 2, "merge")
    ctx.check()
    out = ctx.work_dir / "average.safetensors"
    paths = [inputs.expert_files[r.digest] for r in refs]
    meta = merge_files(paths, out, merge, weights=weights, **extra)
    ctx.progress(1, 2, "bits per byte")
    merged, _ = load_expert(out, config=bundle.config)
    metrics = _metrics(bundle, lambda: ComposedModel(bundle, "average", [merged]), texts, ctx)
    ctx.progress(2, 2, "done")
    total = sum(weights) if weights is not None else 1.0
    result_weights = None if weights is None else [w / total for w in weights]
    details = {"merge": merge, "params": extra, "weights_source": source, "metadata": meta}
    return Outcome(_result(weights=result_weights, metrics=metrics, details=details), out)


def compose_distill(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, refs, experts, texts = _setup(payload, inputs, ctx)
    params = _params(payload)
    steps = _int_param(params, "steps", int(DISTILL_DEFAULTS["steps"]), 1)
    seq_len = _int_param(params, "seq_len", int(DISTILL_DEFAULTS["seq_len"]), 2)
    batch_size = _int_param(params, "batch_size", int(DISTILL_DEFAULTS["batch_size"]), 1)
    seed = _int_param(params, "seed", int(DISTILL_DEFAULTS["seed"]), 0)
    lr = _float_param(params, "lr", float(DISTILL_DEFAULTS["lr"]))
    if lr <= 0:
        raise PermanentJobError("params.lr must be positive")
    if not texts:
        raise PermanentJobError("distillation needs texts (the payload has none)")
    tok = bundle.tokenizer
    n_tokens = int(token_stream(tok, texts).numel())
    if n_tokens < 3:
        raise PermanentJobError("the texts are too short to distill on")
    # Short texts: windows shrink to fit (the stream must hold one window of seq_len + 1).
    used_len = min(seq_len, n_tokens - 1, int(bundle.model.config.max_seq_len))
    n = len(refs)
    weights = _weights(payload, n)
    with_base, base_weight = _base_path(payload, "distill", weights)
    # The teacher is the ensemble a compose.ensemble job would build: the base one path.
    teacher = ExpertEnsemble(bundle.model, experts, include_base=with_base)
    ctx.check()
    if weights is None:
        log_prior = estimate_prior(teacher, _prior_batches(bundle, texts))
    else:
        log_prior = normalise_prior(
            weights, teacher.n_paths, with_base=with_base, base_weight=base_weight
        )
    expert_shares, base_share = _shares(log_prior, n, with_base)

    def make_batches() -> Any:
        return token_batches(tok, texts, seq_len=used_len, batch_size=batch_size, seed=seed)

    def on_step(step: int, kl: float) -> None:
        ctx.progress(step + 1, steps, "distill")
        ctx.check()

    settings = DistillSettings(student="expert", steps=steps, lr=lr, seed=seed)
    ctx.progress(0, steps, "distill")
    result = distill(bundle.model, teacher, make_batches, log_prior, settings, on_step=on_step)
    del teacher
    tensors = result.expert_tensors()
    out = ctx.work_dir / "distill.safetensors"
    write_expert_file(out, tensors, base_revision=bundle.revision)
    load_expert(out, config=bundle.config)  # what the registry will check, checked here first
    metrics = _metrics(bundle, lambda: ComposedModel(bundle, "distill", [tensors]), texts, ctx)
    ctx.check()
    with ComposedModel(
        bundle,
        "ensemble",
        experts,
        weights=expert_shares,
        with_base=with_base,
        base_weight=base_share,
    ) as teacher_model:
        teacher_bits = teacher_model.bits_per_byte(texts)["bits_per_byte"]
    details = {
        **describe(result),
        "seq_len": used_len,
        "teacher_bits_per_byte": teacher_bits,
        "teacher_prior": expert_shares + ([] if base_share is None else [base_share]),
        "with_base": with_base,
    }
    return Outcome(
        _result(
            weights=expert_shares,
            base_weight=base_share,
            with_base=with_base,
            metrics=metrics,
            details=details,
        ),
        out,
    )


def evaluate_job(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    revision = _base_revision(payload)
    method, refs, manifest = _evaluate_subject(payload)
    text_sets = payload.get("text_sets")
    if not isinstance(text_sets, Mapping) or not text_sets:
        raise PermanentJobError("payload.text_sets must be a non-empty object")
    sets = {}
    for name, texts in text_sets.items():
        cleaned = _texts(texts, f"payload.text_sets.{name}")
        if not cleaned:
            raise PermanentJobError(f"text set {name!r} has no text")
        sets[str(name)] = cleaned
    bundle = ctx.bases.get(inputs.base_dir, revision)
    experts = _load_experts(refs, inputs, bundle, ctx)
    weights = manifest_weights(manifest) if manifest is not None and method == "ensemble" else None
    # An ensemble is built as its manifest says: a manifest without with_base predates the
    # base as a path and was computed without it.
    with_base, base_weight = False, None
    if manifest is not None and method == "ensemble":
        try:
            with_base, base_weight = manifest_with_base(manifest)
        except ValueError as exc:
            raise PermanentJobError(f"payload.subject.manifest: {exc}") from None
    total = 2 * len(sets)
    base: dict[str, dict[str, Any]] = {}
    for i, (name, texts) in enumerate(sets.items()):
        ctx.progress(i, total, f"base on {name}")
        ctx.check()
        base[name] = _base_bits(bundle, texts)
    results: dict[str, TextSetScore] = {}
    try:
        composed = ComposedModel(
            bundle,
            method,
            experts,
            weights=weights,
            manifest=manifest,
            with_base=with_base,
            base_weight=base_weight,
        )
    except ValueError as exc:
        raise PermanentJobError(f"the subject cannot be composed: {exc}") from None
    with composed:
        for i, (name, texts) in enumerate(sets.items()):
            ctx.progress(len(sets) + i, total, f"subject on {name}")
            ctx.check()
            r = composed.bits_per_byte(texts)
            # Scored on the same texts, cut into the same windows, as the base above.
            results[name] = TextSetScore.of(
                bits_per_byte=r["bits_per_byte"],
                base_bits_per_byte=base[name]["bits_per_byte"],
                tokens=int(r["tokens"]),
                bytes=int(r["bytes"]),
            )
    ctx.progress(total, total, "done")
    return Outcome(EvaluationResult(results=results).model_dump(mode="json"))


HANDLERS: dict[str, Handler] = {
    "compose.mixture": compose_mixture,
    "compose.ensemble": compose_ensemble,
    "compose.average": compose_average,
    "compose.distill": compose_distill,
    "evaluate": evaluate_job,
}


def run_job(kind: str, payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    """Run one job; ``PermanentJobError`` for a job that can never succeed."""
    handler = HANDLERS.get(kind)
    if handler is None:
        raise PermanentJobError(f"unknown job kind {kind!r}; this worker runs {list(KINDS)}")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return handler(payload, inputs, ctx)
    finally:
        ctx.bases.verify()
