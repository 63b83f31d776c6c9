"""Composition commands: ``agora eval --method``, ``agora expert merge|distill|matrix``.

Cheap to import (torch and modelcore load inside the commands). ``agora eval`` here is a
superset of modelcore's plain one (agora/model_cli.py): the same options, the same JSON,
plus ``--method mixture|ensemble|average``; with the default method it evaluates the
same mixture. It replaces that command when both are registered (this module is listed
after agora.model_cli in agora/cli.py), so there is one ``agora eval``.

``agora eval --method average`` and ``agora expert merge`` print the registry's caution
about averages to stderr (``registry.contracts.AVERAGE_CAUTION``, the one text the API and
the SDK show too): measured, a parameter average of independent experts harms.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agora.model_cli import (
    DEFAULT_BYTES,
    BaseDir,
    Device,
    MaxBytes,
    Seed,
    ShowProgress,
    _corpus,
    _device,
    _err,
    _load_base,
    _load_expert_for,
)
from registry.contracts import AVERAGE_CAUTION

ExpertPaths = Annotated[
    list[Path] | None,
    typer.Option("--experts", help="Expert file; repeat for several (order = weights order)."),
]
Weights = Annotated[
    list[float] | None,
    typer.Option("--weights", help="One weight per expert, repeated (normalised to sum 1)."),
]


def _experts(paths: list[Path] | None, bundle: Any, *, at_least: int = 1) -> list[Any]:
    chosen = list(paths or [])
    if len(chosen) < at_least:
        raise typer.BadParameter(f"give at least {at_least} expert file(s)", param_hint="--experts")
    return [_load_expert_for(p, bundle, "--experts") for p in chosen]


def _warn_average() -> None:
    """The caution the registry answers an ``average`` request with, on stderr."""
    _err(f"warning: [{AVERAGE_CAUTION.code}] {AVERAGE_CAUTION.detail}")


def _domain_texts(corpus: Any, domain: str, split: str) -> list[str]:
    if domain not in corpus.domains:
        raise typer.BadParameter(
            f"unknown domain {domain!r}; known: {', '.join(sorted(corpus.domains))}",
            param_hint="--domain",
        )
    texts = getattr(corpus.domains[domain], split)
    if not texts:
        raise typer.BadParameter(f"domain {domain!r} has no {split} text", param_hint="--domain")
    return list(texts)


def _eval(
    *,
    base_dir: BaseDir,
    experts: ExpertPaths = None,
    method: Annotated[
        str, typer.Option("--method", help="mixture | ensemble | average (with experts).")
    ] = "mixture",
    weights: Weights = None,
    merge: Annotated[
        str, typer.Option("--merge", help="average only: uniform | weighted | ties.")
    ] = "uniform",
    prior_windows: Annotated[
        int, typer.Option("--prior-windows", min=1, help="ensemble: windows for the prior.")
    ] = 8,
    with_base: Annotated[
        bool | None,
        typer.Option(
            "--with-base/--without-base",
            help="ensemble: the unmodified base is one more path, the null expert the "
            "posterior falls back on (default: with; --weights may then end with its weight).",
            show_default=False,
        ),
    ] = None,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Only these domains (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
) -> None:
    """Held-out bits per byte and perplexity per domain, of a base or a composition."""
    from modelcore.compose.evaluate import METHODS, evaluate_composition
    from modelcore.train import recipes

    if method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    expert_paths = list(experts or [])
    bundle = _load_base(base_dir, _device(device))
    loaded = _experts(expert_paths, bundle, at_least=0)
    if with_base is not None and method != "ensemble":
        flag = "--with-base" if with_base else "--without-base"
        raise typer.BadParameter("only with --method ensemble", param_hint=flag)
    base_path = method == "ensemble" and with_base is not False
    if weights is not None and method == "mixture":
        raise typer.BadParameter("weights apply to ensemble and average", param_hint="--weights")
    if weights is not None:
        weights = _path_weights(weights, len(loaded), base_path)
    if method == "average" and loaded:
        _warn_average()
    corpus = _corpus(max_bytes_per_domain)
    try:
        texts = recipes.heldout_by_domain(corpus, domains or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--domain") from exc
    try:
        results = evaluate_composition(
            bundle.model,
            bundle.tokenizer,
            texts,
            loaded,
            method,
            weights=weights,
            merge=merge,
            prior_windows=prior_windows,
            include_base=base_path,
            batch_size=batch_size,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    report: dict[str, Any] = {
        "base_revision": bundle.revision,
        "experts": [str(p) for p in expert_paths],
        "method": method if loaded else "base",
        "domains": {
            name: {k: r[k] for k in ("bits_per_byte", "perplexity", "tokens", "bytes")}
            for name, r in results.items()
        },
    }
    if method == "ensemble" and loaded:
        report["with_base"] = base_path
        # One per expert, then (with the base) the base path's: the posterior's mean.
        report["mean_weights"] = {n: r["mean_weights"] for n, r in results.items()}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"base {bundle.revision[:12]} + {len(expert_paths)} expert(s)"
    shown = f"{method}, with the base as a path" if loaded and base_path else method
    table = Table(title=title + (f" ({shown})" if loaded else ""))
    for column in ("domain", "bits/byte", "perplexity", "tokens"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, r in report["domains"].items():
        table.add_row(name, f"{r['bits_per_byte']:.4f}", f"{r['perplexity']:.2f}", str(r["tokens"]))
    Console(file=sys.stdout).print(table)


def _path_weights(weights: list[float], n_experts: int, base_path: bool) -> list[float]:
    """One weight per path: the experts' and, with the base as a path, the base's, last
    (given, or the mean of the experts')."""
    if len(weights) == n_experts:
        if base_path and n_experts:
            return [*weights, sum(weights) / n_experts]
        return weights
    if base_path and len(weights) == n_experts + 1:
        return weights
    also = " (and optionally one more, last, for the base)" if base_path else ""
    raise typer.BadParameter(
        f"{len(weights)} weights for {n_experts} experts{also}", param_hint="--weights"
    )


def _posterior_weights(
    bundle: Any, loaded: list[Any], texts: list[str], seq_len: int
) -> list[float]:
    from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
    from modelcore.data.batches import eval_batches

    # The experts' shares of the posterior only: the base is no parameter set to average.
    ens = ExpertEnsemble(bundle.model, loaded, include_base=False)
    batches = (
        b.tokens for b in eval_batches(bundle.tokenizer, texts, seq_len=seq_len, batch_size=8)
    )
    return estimate_prior(ens, batches, n_sequences=16).exp().tolist()


def _merge(
    *,
    base_dir: BaseDir,
    out: Annotated[Path, typer.Option("--out", help="Merged expert file to write.")],
    experts: ExpertPaths = None,
    method: Annotated[str, typer.Option("--method", help="uniform | weighted | ties")] = "uniform",
    weights: Weights = None,
    posterior_domain: Annotated[
        str | None,
        typer.Option(
            "--posterior-domain",
            help="weighted: weights = the ensemble's cached domain posterior on this domain.",
        ),
    ] = None,
    density: Annotated[
        float, typer.Option("--density", min=0.0, max=1.0, help="ties: fraction kept.")
    ] = 0.2,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="ties: the experts' common ancestor (default: zero)."),
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Default: the inputs'.")] = None,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
) -> None:
    """Average experts into one expert file (streamed tensor by tensor); print JSON.

    Measured, an average of independent experts harms (the caution goes to stderr)."""
    from modelcore.compose import merge as merging
    from modelcore.experts import load_expert

    if method not in merging.METHODS:
        raise typer.BadParameter(
            f"must be one of {', '.join(merging.METHODS)}", param_hint="--method"
        )
    bundle = _load_base(base_dir, _device("cpu"))
    paths = list(experts or [])
    loaded = _experts(paths, bundle, at_least=2)
    if reference is not None:
        _load_expert_for(reference, bundle, "--reference")
    if posterior_domain is not None:
        if weights is not None:
            raise typer.BadParameter("give --weights or --posterior-domain, not both")
        corpus = _corpus(max_bytes_per_domain)
        texts = _domain_texts(corpus, posterior_domain, "train")
        weights = _posterior_weights(bundle, loaded, texts, min(128, bundle.config.max_seq_len))
        method = "weighted" if method == "uniform" else method
    del loaded  # the merge itself streams from the files
    _warn_average()
    params = {"density": density} if method == "ties" else {}
    started = time.perf_counter()
    try:
        metadata = merging.merge_files(
            paths, out, method, weights=weights, reference=reference, dtype=dtype, **params
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    load_expert(out, config=bundle.config)  # the written file is a valid expert of the base
    typer.echo(
        json.dumps(
            {
                "path": str(out),
                "base_revision": bundle.revision,
                "method": method,
                "experts": [str(p) for p in paths],
                "merge": json.loads(metadata["merge"]),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    )


def _distill(
    *,
    base_dir: BaseDir,
    domain: Annotated[str, typer.Option("--domain", help="Corpus domain to distill on.")],
    out: Annotated[
        Path, typer.Option("--out", help="Expert file (student expert) or directory (dense).")
    ],
    experts: ExpertPaths = None,
    student: Annotated[str, typer.Option("--student", help="expert | dense")] = "expert",
    steps: Annotated[int, typer.Option("--steps", min=1)] = 100,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-2,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint dir (default: OUT.ckpt).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 50,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue from this checkpoint dir.")
    ] = None,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2)] = 128,
    with_base: Annotated[
        bool,
        typer.Option(
            "--with-base/--without-base",
            help="The teacher ensemble has the unmodified base as one more path.",
        ),
    ] = True,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
    progress: ShowProgress = True,
) -> None:
    """Train one student on the experts' ensemble (KL) over a domain; print JSON with the
    loss curve. The teacher has the base as one more path unless --without-base."""
    from modelcore.compose.distill import STUDENTS, DistillSettings, describe, distill
    from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
    from modelcore.train import recipes

    if student not in STUDENTS:
        raise typer.BadParameter(f"must be one of {', '.join(STUDENTS)}", param_hint="--student")
    if resume is not None and not (resume / "state.json").is_file():
        raise typer.BadParameter(f"{resume} holds no checkpoint", param_hint="--resume")
    bundle = _load_base(base_dir, _device(device))
    loaded = _experts(experts, bundle)
    corpus = _corpus(max_bytes_per_domain)
    texts = _domain_texts(corpus, domain, "train")
    seq = min(seq_len, bundle.config.max_seq_len)

    def make_batches():
        return recipes.batches(
            bundle.tokenizer, texts, seq_len=seq, batch_size=batch_size, seed=seed
        )

    teacher = ExpertEnsemble(bundle.model, loaded, include_base=with_base)
    prior = estimate_prior(teacher, make_batches(), n_sequences=16)  # over every path
    settings = DistillSettings(
        student=student, steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every
    )
    ckpt = checkpoint or out.with_name(out.name + ".ckpt")
    started = time.perf_counter()
    from modelcore.train.loop import progress_bar

    with progress_bar("distill", steps, progress) as bar:
        task = bar.add_task("distill", total=steps, info="")
        try:
            result = distill(
                bundle.model,
                teacher,
                make_batches,
                prior,
                settings,
                checkpoint_dir=ckpt,
                resume=resume,
                on_step=lambda step, kl: bar.update(task, completed=step + 1, info=f"KL {kl:.3f}"),
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    if student == "expert":
        from modelcore.experts import save_expert

        save_expert(out, result.expert_tensors(), base_revision=bundle.revision)
        written = bundle.revision
    else:
        from modelcore.artifacts import save_base

        written = save_base(out, result.student, bundle.tokenizer)
    summary = {
        "path": str(out),
        "student": student,
        "base_revision": bundle.revision,
        "revision": written,
        "domain": domain,
        "experts": [str(p) for p in experts or []],
        "with_base": with_base,
        "teacher_prior": prior.exp().tolist(),  # one per expert, then the base's
        "checkpoint": str(ckpt),
        "seconds": round(time.perf_counter() - started, 2),
        **describe(result),
    }
    typer.echo(json.dumps(summary))


def _matrix(
    *,
    base_dir: BaseDir,
    experts: ExpertPaths = None,
    methods: Annotated[
        list[str] | None, typer.Option("--method", help="Compositions to add (repeatable).")
    ] = None,
    domains: Annotated[list[str] | None, typer.Option("--domain")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
) -> None:
    """Bits per byte of the base, each expert and each composition on every domain (JSON)."""
    from modelcore.compose.evaluate import METHODS
    from modelcore.compose.matrix import evaluation_matrix
    from modelcore.train import recipes

    chosen = list(methods or METHODS)
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise typer.BadParameter(
            f"unknown {bad}; known: {', '.join(METHODS)}", param_hint="--method"
        )
    bundle = _load_base(base_dir, _device(device))
    paths = list(experts or [])
    loaded = _experts(paths, bundle)
    corpus = _corpus(max_bytes_per_domain)
    try:
        texts = recipes.heldout_by_domain(corpus, domains or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--domain") from exc
    named = {p.stem: t for p, t in zip(paths, loaded, strict=True)}
    if len(named) != len(paths):
        raise typer.BadParameter("expert file names must differ", param_hint="--experts")
    matrix = evaluation_matrix(
        bundle.model, bundle.tokenizer, named, texts, methods=chosen, batch_size=batch_size
    )
    typer.echo(json.dumps({"base_revision": bundle.revision, **matrix}, indent=2))


def register(root: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add the composition commands (see agora/cli.py); ``eval`` replaces the plain one."""
    root.registered_commands = [c for c in root.registered_commands if c.name != "eval"]
    root.command("eval")(_eval)
    groups["expert"].command("merge")(_merge)
    groups["expert"].command("distill")(_distill)
    groups["expert"].command("matrix")(_matrix)
