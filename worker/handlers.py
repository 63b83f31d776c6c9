"""What a worker computes for each job kind: payload + local files in, result (+ file) out.

One function per kind (``HANDLERS``), each ``handler(payload, inputs, ctx) -> Outcome``,
one per method spec of ``registry.protocol`` (``METHOD_SPECS``; a check at import holds
the two tables together) and one for ``evaluate``:

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
  ``delta_vs_base``; for a forgetting measurement (``ForgettingSubject``) also the model
  without the disabled expert (``without_bits_per_byte``, docs/governance.md); when the
  payload asks (``continuations``, a monitoring run), the repetition rate of the
  subject's and the base's greedy continuations (``modelcore.repetition``;
  docs/governance.md, "Monitoring").

Payloads are parsed with the protocol's models (``ComposePayload``, ``EvaluatePayload``)
and params with the method's spec (``MethodSpec.check_params``: the bounds and defaults
the registry checked the request against); results are its ``ComposeResult`` and
``EvaluationResult``, the shapes the registry validates.

Experts may cover different MoE layers; every kind takes them as they are (a layer an
expert does not cover is the base there for that expert; the merged and the distilled
expert cover the union of the inputs' layers: docs/composition.md, "Experts in some
layers only").

``metrics`` of every compose job is base vs composition bits per byte on the payload
texts (``ComposedModel.bits_per_byte``, ``modelcore.eval`` accounting), or None when
there are no texts.

Errors: a payload that can never work (unknown kind or method, malformed refs, params of
the wrong type, an expert file that does not fit the base) raises ``PermanentJobError``
naming the field, and the worker fails the job for good; anything else is treated as
transient (retried by the registry with backoff). ``JobCancelled`` is raised from inside
long loops when the context says to stop (lease lost, worker shutting down).

Content addressing: outputs depend only on the payload (fixed seeds, canonical merge
order, ``modelcore.experts.save_expert``'s canonical file), so a job re-run after a crash
uploads the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from modelcore.artifacts import BaseBundle, load_base
from modelcore.compose.composed import ComposedModel, normalise_prior
from modelcore.compose.distill import DistillSettings, describe, distill
from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
from modelcore.compose.merge import merge_files
from modelcore.data.batches import eval_batches, token_batches, token_stream
from modelcore.data.tokenizer import decode
from modelcore.eval import evaluate
from modelcore.experts import DTYPES, covered_layers, load_expert, save_expert
from modelcore.repetition import LogProbs, continuations, pooled_repetition, prompts_of
from registry.protocol import (
    AVERAGE,
    BASE_WEIGHT,
    DISTILL,
    ENSEMBLE,
    EVALUATE_KIND,
    JOB_KINDS,
    METHOD_SPECS,
    MIXTURE,
    UNIFORM,
    WEIGHTED,
    ComposePayload,
    ComposeResult,
    ContinuationRequest,
    ContinuationScore,
    EvaluatePayload,
    EvaluationResult,
    ExpertRef,
    ExpertSubject,
    ForgettingSubject,
    Manifest,
    MethodSpec,
    ParamError,
    ParamValue,
    TextSetScore,
    WithoutExpert,
    spec_for_kind,
)


class PermanentJobError(Exception):
    """The job cannot succeed as given: the worker fails it with ``retryable: false``."""


class JobCancelled(Exception):
    """Stop working on the job now (its lease was lost, or the worker is releasing it)."""


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
Payload = TypeVar("Payload", bound=BaseModel)


def _field(loc: Sequence[int | str]) -> str:
    return "payload" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _problems(exc: ValidationError) -> str:
    """Every error of a payload, each naming its field: ``payload.experts[0].digest: ...``."""
    out = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(str(error.get("ctx", {}).get("discriminator", "kind")).strip("'"))
        elif loc[:1] == ["subject"] and len(loc) > 1:
            del loc[1]  # the subject's kind, which pydantic puts in the path
        if not loc:  # a check across fields: its message starts with the field's name
            out.append(f"payload.{message}")
        else:
            out.append(f"{_field(loc)}: {message}")
    return "; ".join(out)


def _parse(model: type[Payload], payload: Any) -> Payload:
    if not isinstance(payload, Mapping):
        raise PermanentJobError("the job payload must be an object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise PermanentJobError(_problems(exc)) from None


@dataclass(frozen=True)
class ComposeJob:
    """A ``compose.*`` payload parsed: its method's spec, and params checked against it
    (defaults filled in). ``with_base``/``base_weight``: the base as one more path, for a
    method that has one (``MethodSpec.has_base_path``)."""

    spec: MethodSpec
    payload: ComposePayload
    params: dict[str, ParamValue]
    with_base: bool
    base_weight: float | None

    @property
    def refs(self) -> list[ExpertRef]:
        return list(self.payload.experts)

    @property
    def texts(self) -> list[str]:
        return [t for t in self.payload.texts if t]

    @property
    def weights(self) -> list[float] | None:
        return None if self.payload.weights is None else list(self.payload.weights)


def parse_compose(kind: str, payload: Any) -> ComposeJob:
    """A ``compose.<method>`` job's payload, checked; ``PermanentJobError`` naming the
    field that does not fit."""
    spec = spec_for_kind(kind)
    if spec is None:
        raise PermanentJobError(f"unknown job kind {kind!r}; this worker runs {list(KINDS)}")
    parsed = _parse(ComposePayload, payload)
    if parsed.method != spec.name:
        raise PermanentJobError(
            f"payload.method {parsed.method!r} does not match job kind {kind!r}"
        )
    try:
        params = spec.check_params(parsed.params)
    except ParamError as exc:
        raise PermanentJobError(str(exc)) from None
    with_base = spec.with_base(params)
    base_weight = params.get(BASE_WEIGHT.name) if spec.has_base_path else None
    if base_weight is not None and parsed.weights is None:
        raise PermanentJobError(f"params.{BASE_WEIGHT.name} needs payload.weights (the experts')")
    return ComposeJob(
        spec=spec,
        payload=parsed,
        params=params,
        with_base=with_base,
        base_weight=None if base_weight is None else float(base_weight),
    )


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


def required_inputs(kind: str, payload: Mapping[str, Any]) -> tuple[str, list[ExpertRef]]:
    """The base revision and the expert versions a job needs downloaded."""
    if kind not in KINDS:
        raise PermanentJobError(f"unknown job kind {kind!r}; this worker runs {list(KINDS)}")
    if kind == EVALUATE_KIND:
        evaluation = _parse(EvaluatePayload, payload)
        return evaluation.base_revision, evaluation.refs()
    job = parse_compose(kind, payload)
    return job.payload.base_revision, job.refs


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


def _path_prior(
    job: ComposeJob,
    bundle: BaseBundle,
    paths: ExpertEnsemble | Callable[[], ExpertEnsemble],
    ctx: JobContext,
    **estimate: Any,
) -> tuple[torch.Tensor, str]:
    """The log prior over an ensemble's paths (the experts, and the base with
    ``with_base``) and where it came from: the payload's weights (``given``), else
    estimated on the texts over ``paths`` (built only then) (``estimated``), else
    ``uniform``."""
    n_paths = len(job.refs) + int(job.with_base)
    if job.weights is not None:
        prior = normalise_prior(
            job.weights, n_paths, with_base=job.with_base, base_weight=job.base_weight
        )
        return prior, "given"
    if not job.texts:
        return normalise_prior(None, n_paths, with_base=job.with_base), UNIFORM
    ctx.check()
    ensemble = paths if isinstance(paths, ExpertEnsemble) else paths()
    return estimate_prior(ensemble, _prior_batches(bundle, job.texts), **estimate), "estimated"


def _setup(
    job: ComposeJob, inputs: JobInputs, ctx: JobContext
) -> tuple[BaseBundle, list[dict[str, torch.Tensor]]]:
    bundle = ctx.bases.get(inputs.base_dir, job.payload.base_revision)
    return bundle, _load_experts(job.refs, inputs, bundle, ctx)  # each checked against the base


def _ensemble_model(
    bundle: BaseBundle,
    experts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    base_weight: float | None,
    *,
    with_base: bool,
) -> ComposedModel:
    return ComposedModel(
        bundle,
        ENSEMBLE.name,
        experts,
        weights=weights,
        with_base=with_base,
        base_weight=base_weight,
    )


# -- handlers -----------------------------------------------------------------------------
def compose_mixture(job: ComposeJob, inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, experts = _setup(job, inputs, ctx)
    ctx.progress(0, 1, job.spec.name)
    metrics = _metrics(
        bundle, lambda: ComposedModel(bundle, job.spec.name, experts), job.texts, ctx
    )
    ctx.progress(1, 1, job.spec.name)
    return Outcome(_result(metrics=metrics, details={"experts": len(job.refs)}))


def compose_ensemble(job: ComposeJob, inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, experts = _setup(job, inputs, ctx)
    n = len(job.refs)
    prior_windows = int(job.params["prior_windows"])
    ctx.progress(0, 2, "prior")
    log_prior, source = _path_prior(
        job,
        bundle,
        lambda: ExpertEnsemble(bundle.model, experts, include_base=job.with_base),
        ctx,
        n_sequences=prior_windows,
    )
    expert_shares, base_share = _shares(log_prior, n, job.with_base)
    ctx.progress(1, 2, "bits per byte")
    metrics = _metrics(
        bundle,
        lambda: _ensemble_model(
            bundle, experts, expert_shares, base_share, with_base=job.with_base
        ),
        job.texts,
        ctx,
    )
    ctx.progress(2, 2, "done")
    details = {
        "prior": source,
        "prior_windows": prior_windows,
        "experts": n,
        "with_base": job.with_base,
    }
    return Outcome(
        _result(
            weights=expert_shares,
            base_weight=base_share,
            with_base=job.with_base,
            metrics=metrics,
            details=details,
        )
    )


def compose_average(job: ComposeJob, inputs: JobInputs, ctx: JobContext) -> Outcome:
    bundle, experts = _setup(job, inputs, ctx)
    texts = job.texts
    merge = str(job.params["merge"])
    weights = job.weights
    source = "given"
    if merge == UNIFORM:
        weights, source = None, UNIFORM
    elif merge == WEIGHTED and weights is None:
        if not texts:
            raise PermanentJobError(
                f"a {WEIGHTED} {job.spec.name} needs weights or texts to estimate them"
            )
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
        extra["density"] = float(job.params["density"])
    ctx.progress(0, 2, "merge")
    ctx.check()
    out = ctx.work_dir / f"{job.spec.name}.safetensors"
    paths = [inputs.expert_files[r.digest] for r in job.refs]
    meta = merge_files(paths, out, merge, weights=weights, **extra)
    ctx.progress(1, 2, "bits per byte")
    merged, _ = load_expert(out, config=bundle.config)
    metrics = _metrics(bundle, lambda: ComposedModel(bundle, job.spec.name, [merged]), texts, ctx)
    ctx.progress(2, 2, "done")
    total = sum(weights) if weights is not None else 1.0
    result_weights = None if weights is None else [w / total for w in weights]
    details = {"merge": merge, "params": extra, "weights_source": source, "metadata": meta}
    return Outcome(_result(weights=result_weights, metrics=metrics, details=details), out)


def compose_distill(job: ComposeJob, inputs: JobInputs, ctx: JobContext) -> Outcome:
    texts = job.texts
    if not texts:
        raise PermanentJobError(f"{job.spec.name} needs texts (the payload has none)")
    bundle, experts = _setup(job, inputs, ctx)
    steps = int(job.params["steps"])
    seq_len = int(job.params["seq_len"])
    batch_size = int(job.params["batch_size"])
    seed = int(job.params["seed"])
    lr = float(job.params["lr"])
    tok = bundle.tokenizer
    n_tokens = int(token_stream(tok, texts).numel())
    if n_tokens < 3:
        raise PermanentJobError(f"the texts are too short to {job.spec.name} on")
    # Short texts: windows shrink to fit (the stream must hold one window of seq_len + 1).
    used_len = min(seq_len, n_tokens - 1, int(bundle.model.config.max_seq_len))
    n = len(job.refs)
    # The teacher is the ensemble a compose.ensemble job would build: the base one path.
    teacher = ExpertEnsemble(bundle.model, experts, include_base=job.with_base)
    ctx.check()
    log_prior, _ = _path_prior(job, bundle, teacher, ctx)
    expert_shares, base_share = _shares(log_prior, n, job.with_base)

    def make_batches() -> Any:
        return token_batches(tok, texts, seq_len=used_len, batch_size=batch_size, seed=seed)

    def on_step(step: int, kl: float) -> None:
        ctx.progress(step + 1, steps, job.spec.name)
        ctx.check()

    settings = DistillSettings(student="expert", steps=steps, lr=lr, seed=seed)
    ctx.progress(0, steps, job.spec.name)
    result = distill(bundle.model, teacher, make_batches, log_prior, settings, on_step=on_step)
    del teacher
    tensors = result.expert_tensors()
    out = ctx.work_dir / f"{job.spec.name}.safetensors"
    save_expert(out, tensors, base_revision=bundle.revision, dtype=_dtype_name(tensors))
    load_expert(out, config=bundle.config)  # what the registry will check, checked here first
    metrics = _metrics(bundle, lambda: ComposedModel(bundle, job.spec.name, [tensors]), texts, ctx)
    ctx.check()
    with _ensemble_model(
        bundle, experts, expert_shares, base_share, with_base=job.with_base
    ) as teacher_model:
        teacher_bits = teacher_model.bits_per_byte(texts)["bits_per_byte"]
    details = {
        **describe(result),
        "layers": covered_layers(tensors),
        "seq_len": used_len,
        "teacher_bits_per_byte": teacher_bits,
        "teacher_prior": expert_shares + ([] if base_share is None else [base_share]),
        "with_base": job.with_base,
    }
    return Outcome(
        _result(
            weights=expert_shares,
            base_weight=base_share,
            with_base=job.with_base,
            metrics=metrics,
            details=details,
        ),
        out,
    )


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    """The expert file dtype of tensors that share one (``modelcore.experts.DTYPES``)."""
    names = {name for name, dtype in DTYPES.items() for t in tensors.values() if t.dtype == dtype}
    if len(names) != 1 or len({t.dtype for t in tensors.values()}) != 1:
        raise ValueError(f"expert tensors must share one of {', '.join(DTYPES)}")
    return names.pop()


def evaluate_job(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
    job = _parse(EvaluatePayload, payload)
    sets = {name: [t for t in texts if t] for name, texts in job.text_sets.items()}
    bundle = ctx.bases.get(inputs.base_dir, job.base_revision)
    if isinstance(job.subject, ForgettingSubject):
        return _forgetting(job.subject, sets, bundle, inputs, ctx)
    experts = _load_experts(job.refs(), inputs, bundle, ctx)
    subject = job.subject
    # An expert alone is the base with it inserted; a composition is built as its
    # manifest says: one served as an ensemble with its weights and base path (a manifest
    # without with_base predates the base as a path and was computed without it).
    method, manifest = MIXTURE.name, None
    weights: list[float] | None = None
    with_base, base_weight = False, None
    if not isinstance(subject, ExpertSubject):
        method, manifest = subject.manifest.method, subject.manifest.as_json()
        if subject.manifest.spec.serves_ensemble:
            weights = subject.manifest.weights()
            with_base, base_weight = subject.manifest.base_path()
    total = 2 * len(sets)
    base: dict[str, dict[str, Any]] = {}
    for i, (name, texts) in enumerate(sets.items()):
        ctx.progress(i, total, f"base on {name}")
        ctx.check()
        base[name] = _base_bits(bundle, texts)
    results: dict[str, TextSetScore] = {}
    # Greedy continuations, for the repetition check of monitoring (docs/governance.md,
    # "Monitoring"): the base's before the subject's experts are inserted.
    asked = job.continuations
    prompts = (
        prompts_of(
            bundle.tokenizer,
            sets[asked.text_set],
            prompts=asked.prompts,
            prompt_tokens=asked.prompt_tokens,
        )
        if asked is not None
        else []
    )
    base_runs = _continue(bundle, _base_log_probs(bundle), prompts, asked, ctx)
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
        runs = _continue(bundle, composed.log_probs, prompts, asked, ctx)
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
    scored = None
    if asked is not None:
        scored = ContinuationScore(
            repetition=pooled_repetition(runs, asked.ngram),
            base_repetition=pooled_repetition(base_runs, asked.ngram),
            ngram=asked.ngram,
            prompts=len(prompts),
            tokens=sum(map(len, runs)),
            base_tokens=sum(map(len, base_runs)),
            sample=decode(bundle.tokenizer, runs[0])[:1000] if runs else "",
        )
    result = EvaluationResult(results=results, continuations=scored).model_dump(mode="json")
    if scored is None:
        del result["continuations"]  # as before continuations existed
    return Outcome(result)


def _base_log_probs(bundle: BaseBundle) -> LogProbs:
    def log_probs(ids_BT: torch.Tensor) -> torch.Tensor:
        device = next(bundle.model.parameters()).device
        logits = bundle.model(ids_BT.to(device), aux="none").logits
        return torch.log_softmax(logits.float(), dim=-1)

    return log_probs


def _continue(
    bundle: BaseBundle,
    log_probs: LogProbs,
    prompts: list[list[int]],
    asked: ContinuationRequest | None,
    ctx: JobContext,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (none when the payload asks for none)."""
    if asked is None:
        return []
    ctx.check()
    bundle.model.eval()
    window = int(bundle.config.max_seq_len)
    return continuations(
        log_probs, bundle.tokenizer, prompts, new_tokens=asked.new_tokens, window=window
    )


def _manifest_model(
    bundle: BaseBundle, manifest: Manifest, experts: Sequence[Mapping[str, torch.Tensor]]
) -> ComposedModel:
    """A composition built as its manifest says (as ``evaluate_job`` builds one)."""
    weights: list[float] | None = None
    with_base, base_weight = False, None
    if manifest.spec.serves_ensemble:
        weights = manifest.weights()
        with_base, base_weight = manifest.base_path()
    return ComposedModel(
        bundle,
        manifest.method,
        experts,
        weights=weights,
        manifest=manifest.as_json(),
        with_base=with_base,
        base_weight=base_weight,
    )


def _without_model(
    without: WithoutExpert, bundle: BaseBundle, inputs: JobInputs, ctx: JobContext
) -> ComposedModel | None:
    """The model without the disabled expert (``WithoutExpert``); None: the base alone."""
    if without.method == "base":
        return None
    experts = _load_experts(without.experts, inputs, bundle, ctx)
    if without.method == AVERAGE.name:
        merge = str(without.params.get("merge", UNIFORM))
        extra: dict[str, Any] = {}
        if merge == "ties":
            extra["density"] = float(without.params["density"])
        out = ctx.work_dir / "without.safetensors"
        paths = [inputs.expert_files[r.digest] for r in without.experts]
        weights = None if merge == UNIFORM else without.weights
        merge_files(paths, out, merge, weights=weights, **extra)
        merged, _ = load_expert(out, config=bundle.config)
        return ComposedModel(bundle, AVERAGE.name, [merged])
    return ComposedModel(
        bundle,
        without.method,
        experts,
        weights=without.weights,
        with_base=without.with_base,
        base_weight=without.base_weight,
    )


def _forgetting(
    subject: ForgettingSubject,
    sets: Mapping[str, Sequence[str]],
    bundle: BaseBundle,
    inputs: JobInputs,
    ctx: JobContext,
) -> Outcome:
    """A forgetting measurement (docs/governance.md, "Proof of forgetting"): on each text
    set the base, the model with the disabled expert and the model without it, on the same
    windows; the model with it is ``bits_per_byte``, without it ``without_bits_per_byte``."""
    total = 3 * len(sets)
    base: dict[str, dict[str, Any]] = {}
    for i, (name, texts) in enumerate(sets.items()):
        ctx.progress(i, total, f"base on {name}")
        ctx.check()
        base[name] = _base_bits(bundle, texts)
    with_experts = _load_experts(subject.with_refs(), inputs, bundle, ctx)
    scores: dict[str, dict[str, Any]] = {}
    try:
        if subject.manifest is None:
            composed = ComposedModel(bundle, MIXTURE.name, with_experts)
        else:
            composed = _manifest_model(bundle, subject.manifest, with_experts)
    except ValueError as exc:
        raise PermanentJobError(f"the composition cannot be built: {exc}") from None
    with composed:
        for i, (name, texts) in enumerate(sets.items()):
            ctx.progress(len(sets) + i, total, f"with the expert on {name}")
            ctx.check()
            scores[name] = dict(composed.bits_per_byte(texts))
    try:
        without = _without_model(subject.without, bundle, inputs, ctx)
    except ValueError as exc:
        raise PermanentJobError(f"the model without the expert cannot be built: {exc}") from None
    without_bits = {name: float(b["bits_per_byte"]) for name, b in base.items()}
    if without is not None:
        with without:
            for i, (name, texts) in enumerate(sets.items()):
                ctx.progress(2 * len(sets) + i, total, f"without the expert on {name}")
                ctx.check()
                without_bits[name] = float(without.bits_per_byte(texts)["bits_per_byte"])
    results = {
        name: TextSetScore.model_validate(
            {
                **TextSetScore.of(
                    bits_per_byte=r["bits_per_byte"],
                    base_bits_per_byte=base[name]["bits_per_byte"],
                    tokens=int(r["tokens"]),
                    bytes=int(r["bytes"]),
                ).model_dump(),
                "without_bits_per_byte": without_bits[name],
            }
        )
        for name, r in scores.items()
    }
    ctx.progress(total, total, "done")
    return Outcome(EvaluationResult(results=results).model_dump(mode="json"))


# -- the kinds ----------------------------------------------------------------------------
ComposeHandler = Callable[[ComposeJob, JobInputs, JobContext], Outcome]

# One handler per method spec (docs/architecture.md, "Adding a composition method").
COMPOSE_HANDLERS: dict[str, ComposeHandler] = {
    MIXTURE.name: compose_mixture,
    ENSEMBLE.name: compose_ensemble,
    AVERAGE.name: compose_average,
    DISTILL.name: compose_distill,
}
if set(COMPOSE_HANDLERS) != set(METHOD_SPECS):
    raise RuntimeError(
        "worker.handlers needs one handler per method spec: "
        f"specs {sorted(METHOD_SPECS)}, handlers {sorted(COMPOSE_HANDLERS)}"
    )


def _compose(spec: MethodSpec, handler: ComposeHandler) -> Handler:
    def run(payload: Mapping[str, Any], inputs: JobInputs, ctx: JobContext) -> Outcome:
        return handler(parse_compose(spec.job_kind, payload), inputs, ctx)

    run.__name__ = run.__qualname__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


HANDLERS: dict[str, Handler] = {
    **{
        spec.job_kind: _compose(spec, COMPOSE_HANDLERS[spec.name]) for spec in METHOD_SPECS.values()
    },
    EVALUATE_KIND: evaluate_job,
}
KINDS: tuple[str, ...] = tuple(HANDLERS)
if KINDS != JOB_KINDS:
    raise RuntimeError(f"worker kinds {KINDS} are not the protocol's {JOB_KINDS}")


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
