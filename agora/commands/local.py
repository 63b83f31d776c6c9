"""``agora local eval|merge|distill|matrix``: compositions computed on this machine, from a
base bundle directory and expert files (the registry's twins are ``agora compose`` and
``agora evaluate``, computed by a worker).

The method choices are views of the one spec table (agora/methods.py) intersected with
what modelcore computes. A method with a caution (a parameter average) prints the
registry's caution to stderr, the same text the API and the SDK show; stdout keeps its
JSON or table.

Until the next release the old names run these commands too, with a deprecation line:
``agora eval`` and ``agora expert merge|distill|matrix`` (and ``--base DIR`` for
``--base-dir DIR``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agora import modeling
from agora.common import LOCAL_PANEL, WeightsOption, echo_err, parse_weights, require_extra
from agora.methods import (
    BASE_PATH_METHODS,
    DEFAULT_LOCAL_METHOD,
    DISTILL_METHOD,
    LOCAL_EVAL_METHODS,
    MERGE_METHOD,
    MERGE_PARAM,
    METHOD_SPECS,
    WEIGHTED,
)
from agora.modeling import (
    DEFAULT_BYTES,
    BaseDirOption,
    DataCommand,
    Device,
    ExpertPaths,
    LegacyBaseOption,
    MaxBytes,
    Seed,
    ShowProgress,
)

if TYPE_CHECKING:
    from modelcore.artifacts import BaseBundle


def _warn_cautions(method: str) -> None:
    caution = METHOD_SPECS[method].caution
    if caution is not None:
        echo_err(f"warning: [{caution.code}] {caution.detail}")


def _check_method(method: str, known: tuple[str, ...] | list[str]) -> None:
    if method not in known:
        raise typer.BadParameter(f"must be one of {', '.join(known)}", param_hint="--method")


def eval_command(
    *,
    base_dir: BaseDirOption = None,
    experts: ExpertPaths = None,
    method: Annotated[
        str,
        typer.Option("--method", help=f"{' | '.join(LOCAL_EVAL_METHODS)} (with experts)."),
    ] = DEFAULT_LOCAL_METHOD,
    weights: WeightsOption = None,
    merge: Annotated[
        str,
        typer.Option(
            "--merge", help=f"a parameter average only: {' | '.join(MERGE_PARAM.choices)}."
        ),
    ] = str(MERGE_PARAM.default),
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
    data: modeling.DataPaths = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="--data: heldout (default: what `expert train --data` held out) or all.",
            show_default=False,
        ),
    ] = None,
    heldout_share: Annotated[
        float | None,
        typer.Option(
            "--heldout-share",
            help="--data: the share held out, as given to `expert train` (default 0.1).",
            show_default=False,
        ),
    ] = None,
    text_field: modeling.TextField = "text",
    strict_utf8: modeling.StrictUtf8 = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Held-out bits per byte and perplexity per domain, of a base or a composition.

    The text: the corpus domains, or your own (--data PATH...)."""
    _check_method(method, LOCAL_EVAL_METHODS)
    _check_data_options(data, domains, split, heldout_share)
    bundle_dir = modeling.base_dir_of(base_dir, legacy_base)
    require_extra("model", "local eval")
    from modelcore.compose.evaluate import METHODS, evaluate_composition
    from modelcore.train import recipes

    _check_method(method, METHODS)
    expert_paths = list(experts or [])
    bundle = modeling.load_base(bundle_dir, modeling.device(device))
    loaded = modeling.load_experts(expert_paths, bundle, at_least=0)
    ensemble = method in BASE_PATH_METHODS
    if with_base is not None and not ensemble:
        flag = "--with-base" if with_base else "--without-base"
        raise typer.BadParameter(
            f"only with --method {' or '.join(m for m in BASE_PATH_METHODS if m in METHODS)}",
            param_hint=flag,
        )
    base_path = ensemble and with_base is not False
    given = parse_weights(weights)
    if given is not None and not METHOD_SPECS[method].takes_weights:
        takers = [m for m in METHODS if METHOD_SPECS[m].takes_weights]
        raise typer.BadParameter(f"weights apply to {' and '.join(takers)}", param_hint="--weights")
    if given is not None:
        given = _path_weights(given, len(loaded), base_path)
    if loaded:
        _warn_cautions(method)
    data_report: dict[str, Any] | None = None
    if data:
        share = modeling.DEFAULT_HELDOUT_SHARE if heldout_share is None else heldout_share
        texts, data_report = _data_texts(
            data,
            split=split or DATA_SPLITS[0],
            heldout_share=share,
            text_field=text_field,
            strict_utf8=strict_utf8,
        )
    else:
        corpus = modeling.corpus(max_bytes_per_domain)
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
            weights=given,
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
    if data_report is not None:
        report["data"] = data_report
    if ensemble and loaded:
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


# `--split` of `local eval --data`: held out by default, so that evaluating an expert on the
# text it was trained from never scores its own training documents (docs/data.md).
DATA_SPLITS = ("heldout", "all")


def _check_data_options(
    data: list[Path] | None,
    domains: list[str] | None,
    split: str | None,
    heldout_share: float | None,
) -> None:
    if data and domains:
        raise typer.BadParameter("give --domain or --data, not both", param_hint="--data")
    if not data:
        for given, flag in ((split, "--split"), (heldout_share, "--heldout-share")):
            if given is not None:
                raise typer.BadParameter("only with --data PATH...", param_hint=flag)
        return
    if split is not None and split not in DATA_SPLITS:
        raise typer.BadParameter(f"must be {' or '.join(DATA_SPLITS)}", param_hint="--split")
    if heldout_share is not None:
        if split == "all":
            raise typer.BadParameter("only with --split heldout", param_hint="--heldout-share")
        modeling.check_heldout_share(heldout_share)


def _data_texts(
    paths: list[Path], *, split: str, heldout_share: float, text_field: str, strict_utf8: bool
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """``--data``'s documents (the held-out ones, or all) as one text set, ``data``."""
    docs, read, parts = modeling.read_data(
        paths,
        text_field=text_field,
        strict_utf8=strict_utf8,
        heldout_share=heldout_share if split == "heldout" else None,
    )
    chosen = parts.heldout if parts is not None else docs
    about: dict[str, Any] = {
        "paths": [str(p) for p in paths],
        "split": split,
        "heldout_share": heldout_share if split == "heldout" else None,
        "text_field": text_field,
        "strict_utf8": strict_utf8,
        "evaluated_documents": len(chosen),
        **read.to_dict(),
    }
    return {modeling.DATA_TEXT_SET: [d.text for d in chosen]}, about


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
    bundle: BaseBundle, loaded: list[Any], texts: list[str], seq_len: int
) -> list[float]:
    from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
    from modelcore.data.batches import eval_batches

    # The experts' shares of the posterior only: the base is no parameter set to average.
    ens = ExpertEnsemble(bundle.model, loaded, include_base=False)
    batches = (
        b.tokens for b in eval_batches(bundle.tokenizer, texts, seq_len=seq_len, batch_size=8)
    )
    weights: list[float] = estimate_prior(ens, batches, n_sequences=16).exp().tolist()
    return weights


def merge_command(
    *,
    base_dir: BaseDirOption = None,
    out: Annotated[Path, typer.Option("--out", help="Merged expert file to write.")],
    experts: ExpertPaths = None,
    method: Annotated[str, typer.Option("--method", help=" | ".join(MERGE_PARAM.choices))] = (
        str(MERGE_PARAM.default)
    ),
    weights: WeightsOption = None,
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
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Average experts into one expert file (streamed tensor by tensor); print JSON.

    Measured, an average of independent experts harms (the caution goes to stderr)."""
    bundle_dir = modeling.base_dir_of(base_dir, legacy_base)
    require_extra("model", "local merge")
    from modelcore.compose import merge as merging
    from modelcore.experts import load_expert

    _check_method(method, list(merging.METHODS))
    bundle = modeling.load_base(bundle_dir, modeling.device("cpu"))
    paths = list(experts or [])
    loaded = modeling.load_experts(paths, bundle, at_least=2)
    if reference is not None:
        modeling.load_expert_for(reference, bundle, "--reference")
    given = parse_weights(weights)
    if posterior_domain is not None:
        if given is not None:
            raise typer.BadParameter("give --weights or --posterior-domain, not both")
        corpus = modeling.corpus(max_bytes_per_domain)
        texts = modeling.domain_texts(corpus, posterior_domain, "train")
        given = _posterior_weights(bundle, loaded, texts, min(128, bundle.config.max_seq_len))
        method = WEIGHTED if method == MERGE_PARAM.default else method
    del loaded  # the merge itself streams from the files
    _warn_cautions(MERGE_METHOD)  # a merged file is a parameter average
    params: dict[str, Any] = {"density": density} if method == "ties" else {}
    started = time.perf_counter()
    try:
        metadata = merging.merge_files(
            paths, out, method, weights=given, reference=reference, dtype=dtype, **params
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


def distill_command(
    *,
    base_dir: BaseDirOption = None,
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
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Train one student on the experts' ensemble (KL) over a domain; print JSON.

    The JSON holds the loss curve. The teacher has the base as one more path unless
    --without-base."""
    bundle_dir = modeling.base_dir_of(base_dir, legacy_base)
    require_extra("model", "local distill")
    from modelcore.compose.distill import STUDENTS, DistillSettings, describe, distill
    from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
    from modelcore.train import recipes
    from modelcore.train.loop import progress_bar

    if student not in STUDENTS:
        raise typer.BadParameter(f"must be one of {', '.join(STUDENTS)}", param_hint="--student")
    if resume is not None and not (resume / "state.json").is_file():
        raise typer.BadParameter(f"{resume} holds no checkpoint", param_hint="--resume")
    bundle = modeling.load_base(bundle_dir, modeling.device(device))
    loaded = modeling.load_experts(experts, bundle)
    corpus = modeling.corpus(max_bytes_per_domain)
    texts = modeling.domain_texts(corpus, domain, "train")
    seq = min(seq_len, bundle.config.max_seq_len)

    def make_batches() -> Any:
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
    with progress_bar(DISTILL_METHOD, steps, progress) as bar:
        task = bar.add_task(DISTILL_METHOD, total=steps, info="")
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
        from modelcore.model import ModularLM

        assert isinstance(result.student, ModularLM)  # a dense student is a whole model
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


def matrix_command(
    *,
    base_dir: BaseDirOption = None,
    experts: ExpertPaths = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help=f"Compositions to add (repeatable; default all: {', '.join(LOCAL_EVAL_METHODS)}).",
        ),
    ] = None,
    domains: Annotated[list[str] | None, typer.Option("--domain")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Bits per byte of the base, each expert and each composition on every domain (JSON)."""
    bundle_dir = modeling.base_dir_of(base_dir, legacy_base)
    require_extra("model", "local matrix")
    from modelcore.compose.evaluate import METHODS
    from modelcore.compose.matrix import evaluation_matrix
    from modelcore.train import recipes

    chosen = list(methods or METHODS)
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise typer.BadParameter(
            f"unknown {bad}; known: {', '.join(METHODS)}", param_hint="--method"
        )
    bundle = modeling.load_base(bundle_dir, modeling.device(device))
    paths = list(experts or [])
    loaded = modeling.load_experts(paths, bundle)
    corpus = modeling.corpus(max_bytes_per_domain)
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


COMMANDS: dict[str, Callable[..., None]] = {
    "eval": eval_command,
    "merge": merge_command,
    DISTILL_METHOD: distill_command,
    "matrix": matrix_command,
}


def group() -> typer.Typer:
    app = typer.Typer(
        name="local",
        help="Compositions computed on this machine from a base directory and expert files.",
        no_args_is_help=True,
    )
    for name, command in COMMANDS.items():
        # DataCommand: `--data A B` is `--data A --data B` (agora/modeling.py)
        cls = DataCommand if command is eval_command else None
        app.command(name, rich_help_panel=LOCAL_PANEL, cls=cls)(command)
    return app
