"""``agora base init|train``, ``agora expert train`` and ``agora eval``: modelcore's CLI.

Cheap to import: torch and modelcore are imported inside the commands. Training shows
progress bars on stderr; results go to stdout (``base`` commands end with the revision
on its own line, ``expert train`` and ``eval --json`` print JSON), so scripts can parse
them: ``REV=$(agora base train --preset tiny --out bases/tiny | tail -n1)``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

PRESET_HELP = "Model preset: tiny (tests), small (CPU demo) or molm_4b_k2 (GPU shapes)."
CORPUS_HELP = "Bytes of text per corpus domain (train + held-out)."


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc


def _preset(name: str):
    from modelcore.config import ModelConfig

    try:
        return ModelConfig.from_name(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from exc


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise typer.BadParameter(
            f"{out} is not empty (a base revision is immutable; pass --overwrite to replace it)",
            param_hint="--out",
        )


def _corpus(max_bytes: int, seed: int = 0):
    from modelcore.train import recipes

    started = time.perf_counter()
    corpus = recipes.load_corpus(max_bytes, seed=seed, cache_dir=recipes.default_cache_dir())
    sizes = {n: d.sizes()["train_bytes"] for n, d in corpus.domains.items()}
    _err(f"corpus: {sizes} train bytes ({time.perf_counter() - started:.1f}s)")
    return corpus


def _load_base(path: Path, device):
    from modelcore.artifacts import load_base

    try:
        return load_base(path, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--base") from exc


def _load_expert_for(path: Path, bundle, option: str):
    from modelcore.experts import load_expert

    try:
        tensors, metadata = load_expert(path, config=bundle.config)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint=option) from exc
    if metadata["base_revision"] != bundle.revision:
        raise typer.BadParameter(
            f"{path} was trained against base {metadata['base_revision'][:12]}, "
            f"not {bundle.revision[:12]}",
            param_hint=option,
        )
    return tensors


def _build_base(
    preset: str,
    out: Path,
    *,
    steps: int,
    dense_steps: int,
    seed: int,
    lr: float | None,
    batch_size: int | None,
    seq_len: int | None,
    aux: str,
    aux_weight: float,
    max_bytes_per_domain: int,
    overwrite: bool,
    device: str | None,
    progress: bool,
) -> None:
    config = _preset(preset)
    _check_out_dir(out, overwrite)
    if not 0 <= dense_steps <= steps:
        raise typer.BadParameter("must be between 0 and --steps", param_hint="--dense-steps")
    from modelcore.artifacts import save_base
    from modelcore.train import pretrain, recipes

    defaults = recipes.settings_for(config)
    dev = _device(device)
    corpus = _corpus(max_bytes_per_domain)
    tokenizer = recipes.corpus_tokenizer(corpus, config.vocab_size, seed=seed)
    model = recipes.new_base(config, tokenizer, seed=seed, device=dev)
    if steps > 0:
        texts, _ = corpus.texts("train")
        seq = min(seq_len or defaults.seq_len, model.config.max_seq_len)
        data = recipes.batches(
            tokenizer, texts, seq_len=seq, batch_size=batch_size or defaults.batch_size, seed=seed
        )
        started = time.perf_counter()
        result = pretrain(
            model,
            data,
            steps,
            lr or defaults.lr,
            aux=aux,
            aux_weight=aux_weight,
            dense_steps=dense_steps,
            seed=seed,
            progress=progress,
        )
        _err(
            f"trained {steps} steps in {time.perf_counter() - started:.1f}s; "
            f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}"
        )
    revision = save_base(out, model, tokenizer)
    typer.echo(revision)


Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP)]
OutDir = Annotated[Path, typer.Option("--out", help="Directory for the base bundle.")]
BaseDir = Annotated[Path, typer.Option("--base", help="Base bundle directory.")]
Seed = Annotated[int, typer.Option("--seed")]
MaxBytes = Annotated[int, typer.Option("--max-bytes-per-domain", min=1024, help=CORPUS_HELP)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, ... (default: auto)")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress")]
Lr = Annotated[float | None, typer.Option("--lr", min=0.0, help="Default: per preset.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1)]
SeqLen = Annotated[int | None, typer.Option("--seq-len", min=2)]
DEFAULT_BYTES = 256 * 1024


def _base_init(
    *,
    preset: Preset,
    out: OutDir,
    seed: Seed = 0,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    overwrite: Overwrite = False,
) -> None:
    """Create an untrained base (with a tokenizer trained on the corpus); print its revision."""
    _build_base(
        preset,
        out,
        steps=0,
        dense_steps=0,
        seed=seed,
        lr=None,
        batch_size=None,
        seq_len=None,
        aux="mi",
        aux_weight=0.0,
        max_bytes_per_domain=max_bytes_per_domain,
        overwrite=overwrite,
        device="cpu",
        progress=False,
    )


def _base_train(
    *,
    preset: Preset,
    out: OutDir,
    steps: Annotated[
        int | None, typer.Option("--steps", min=0, help="Default: per preset.")
    ] = None,
    dense_steps: Annotated[
        int,
        typer.Option("--dense-steps", min=0, help="Dense-phase steps (gradual modularization)."),
    ] = 0,
    seed: Seed = 0,
    lr: Lr = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    aux: Annotated[str, typer.Option("--aux", help="mi | switch | none")] = "mi",
    aux_weight: Annotated[
        float, typer.Option("--aux-weight", min=0.0, help="Weight of the aux loss.")
    ] = 1.0,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    overwrite: Overwrite = False,
    device: Device = None,
    progress: ShowProgress = True,
) -> None:
    """Train tokenizer + model on the multi-domain corpus; print the revision last."""
    if aux not in {"mi", "switch", "none"}:
        raise typer.BadParameter("must be mi, switch or none", param_hint="--aux")
    from modelcore.train import recipes

    config = _preset(preset)
    _build_base(
        preset,
        out,
        steps=recipes.settings_for(config).steps if steps is None else steps,
        dense_steps=dense_steps,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        aux=aux,
        aux_weight=aux_weight,
        max_bytes_per_domain=max_bytes_per_domain,
        overwrite=overwrite,
        device=device,
        progress=progress,
    )


def _expert_train(
    *,
    base_dir: BaseDir,
    domain: Annotated[str, typer.Option("--domain", help="Corpus domain to train on.")],
    out: Annotated[Path, typer.Option("--out", help="Expert file to write (.safetensors).")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Default: per preset.")
    ] = None,
    routing_reg: Annotated[
        float,
        typer.Option("--routing-reg", min=0.0, help="Weight of ||new router rows|| (4.3)."),
    ] = 0.01,
    max_general_share: Annotated[
        float,
        typer.Option(
            "--max-general-share",
            min=0.0,
            max=0.999,
            help="Router bias calibrated so the expert fires on at most this share of "
            "general text's tokens per layer.",
        ),
    ] = 0.25,
    general_weight: Annotated[
        float,
        typer.Option(
            "--general-weight",
            min=0.0,
            help="Weight of the LM loss on general text (the other corpus domains) that "
            "teaches the expert to stay out of their way.",
        ),
    ] = 1.0,
    general_batches: Annotated[
        int,
        typer.Option(
            "--general-batches",
            min=0,
            help="Batches of general text the router is calibrated on; 0 turns the "
            "calibration and the general loss off.",
        ),
    ] = 8,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", help="Start from this expert's tensors, not fresh ones."),
    ] = None,
    seed: Seed = 0,
    lr: Lr = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = (
        "float32"
    ),
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
    progress: ShowProgress = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
) -> None:
    """Train one expert against a frozen base by insertion; print a JSON summary."""
    if dtype not in {"float32", "bfloat16", "float16"}:
        raise typer.BadParameter("must be float32, bfloat16 or float16", param_hint="--dtype")
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory, not an expert file", param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{out} exists (pass --overwrite to replace it)", param_hint="--out"
        )
    from modelcore.experts import save_expert
    from modelcore.train import recipes, train_expert

    dev = _device(device)
    bundle = _load_base(base_dir, dev)
    init = _load_expert_for(init_from, bundle, "--init-from") if init_from else None
    corpus = _corpus(max_bytes_per_domain)
    if domain not in corpus.domains:
        raise typer.BadParameter(
            f"unknown domain {domain!r}; known: {', '.join(sorted(corpus.domains))}",
            param_hint="--domain",
        )
    defaults = recipes.settings_for(bundle.config)
    data = recipes.batches(
        bundle.tokenizer,
        corpus.domains[domain].train,
        seq_len=min(seq_len or defaults.seq_len, bundle.config.max_seq_len),
        batch_size=batch_size or defaults.batch_size,
        seed=seed,
    )
    n_steps = steps or defaults.expert_steps
    opts = recipes.expert_options(
        bundle.tokenizer,
        corpus,
        domain,
        seq_len=min(seq_len or defaults.seq_len, bundle.config.max_seq_len),
        batch_size=batch_size or defaults.batch_size,
        seed=seed,
        routing_reg=routing_reg,
        max_general_share=max_general_share,
        general_batches=general_batches,
        general_weight=general_weight,
    )
    started = time.perf_counter()
    trained = train_expert(
        bundle.model,
        data,
        n_steps,
        lr or defaults.expert_lr,
        init_from=init,
        seed=seed,
        progress=progress,
        **opts,
    )
    save_expert(out, trained.tensors, base_revision=bundle.revision, dtype=dtype)
    summary: dict[str, Any] = {
        "path": str(out),
        "base_revision": bundle.revision,
        "domain": domain,
        "steps": n_steps,
        "routing_reg": routing_reg,
        "max_general_share": max_general_share if general_batches > 0 else None,
        "general_weight": general_weight if general_batches > 0 else 0.0,
        # per layer: the share of general text's tokens the expert fires on, and its bias
        "general_share": {str(i): r["share_after"] for i, r in trained.lanes.items()},
        "router_bias": {str(i): r["bias"] for i, r in trained.lanes.items()},
        "init_from": str(init_from) if init_from else None,
        "first_loss": trained.result.losses[0],
        "final_loss": trained.result.final_loss,
        "seconds": round(time.perf_counter() - started, 2),
    }
    typer.echo(json.dumps(summary))


def _eval(
    *,
    base_dir: BaseDir,
    experts: Annotated[
        list[Path] | None,
        typer.Option("--experts", help="Expert file; repeat to evaluate several as a mixture."),
    ] = None,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Only these domains (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
) -> None:
    """Held-out bits per byte and perplexity per domain, of a base or base + experts."""
    from modelcore.eval import evaluate_mixture
    from modelcore.train import recipes

    expert_paths = list(experts or [])
    bundle = _load_base(base_dir, _device(device))
    loaded = [_load_expert_for(p, bundle, "--experts") for p in expert_paths]
    corpus = _corpus(max_bytes_per_domain)
    try:
        texts = recipes.heldout_by_domain(corpus, domains or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--domain") from exc
    results = evaluate_mixture(bundle.model, bundle.tokenizer, texts, loaded, batch_size=batch_size)
    report = {
        "base_revision": bundle.revision,
        "experts": [str(p) for p in expert_paths],
        "domains": {
            name: {k: r[k] for k in ("bits_per_byte", "perplexity", "tokens", "bytes")}
            for name, r in results.items()
        },
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"base {bundle.revision[:12]} + {len(expert_paths)} expert(s)")
    for column in ("domain", "bits/byte", "perplexity", "tokens"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, r in report["domains"].items():
        table.add_row(name, f"{r['bits_per_byte']:.4f}", f"{r['perplexity']:.2f}", str(r["tokens"]))
    Console(file=sys.stdout).print(table)


def register(root: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add modelcore's commands to the ``agora`` CLI (see agora/cli.py)."""
    groups["base"].command("init")(_base_init)
    groups["base"].command("train")(_base_train)
    groups["expert"].command("train")(_expert_train)
    root.command("eval")(_eval)
