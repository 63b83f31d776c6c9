"""``agora base init|train`` and ``agora expert train``: training on this machine.

Training shows progress bars on stderr; results go to stdout (``base`` commands end with
the revision on its own line, ``expert train`` prints JSON), so scripts can parse them:
``REV=$(agora base train --preset tiny --out bases/tiny | tail -n1)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agora import modeling
from agora.common import echo_err, require_extra
from agora.modeling import (
    DEFAULT_BYTES,
    BaseDirOption,
    BatchSize,
    Device,
    LegacyBaseOption,
    Lr,
    MaxBytes,
    OutDir,
    Overwrite,
    Preset,
    Seed,
    SeqLen,
    ShowProgress,
    base_dir_of,
)

AUX_LOSSES = ("mi", "switch", "none")
EXPERT_DTYPES = ("float32", "bfloat16", "float16")


def _build_base(
    preset_name: str,
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
    device_name: str | None,
    progress: bool,
) -> None:
    config = modeling.preset(preset_name)
    modeling.check_out_dir(out, overwrite)
    if not 0 <= dense_steps <= steps:
        raise typer.BadParameter("must be between 0 and --steps", param_hint="--dense-steps")
    from modelcore.artifacts import save_base
    from modelcore.train import pretrain, recipes

    defaults = recipes.settings_for(config)
    dev = modeling.device(device_name)
    loaded = modeling.corpus(max_bytes_per_domain)
    tokenizer = recipes.corpus_tokenizer(loaded, config.vocab_size, seed=seed)
    model = recipes.new_base(config, tokenizer, seed=seed, device=dev)
    if steps > 0:
        texts, _ = loaded.texts("train")
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
        echo_err(
            f"trained {steps} steps in {time.perf_counter() - started:.1f}s; "
            f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}"
        )
    revision = save_base(out, model, tokenizer)
    typer.echo(revision)


def base_init(
    *,
    preset: Preset,
    out: OutDir,
    seed: Seed = 0,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    overwrite: Overwrite = False,
) -> None:
    """Create an untrained base (with a tokenizer trained on the corpus); print its revision."""
    require_extra("model", "base init")
    _build_base(
        preset,
        out,
        steps=0,
        dense_steps=0,
        seed=seed,
        lr=None,
        batch_size=None,
        seq_len=None,
        aux=AUX_LOSSES[0],
        aux_weight=0.0,
        max_bytes_per_domain=max_bytes_per_domain,
        overwrite=overwrite,
        device_name="cpu",
        progress=False,
    )


def base_train(
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
    aux: Annotated[str, typer.Option("--aux", help=" | ".join(AUX_LOSSES))] = AUX_LOSSES[0],
    aux_weight: Annotated[
        float, typer.Option("--aux-weight", min=0.0, help="Weight of the aux loss.")
    ] = 1.0,
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    overwrite: Overwrite = False,
    device: Device = None,
    progress: ShowProgress = True,
) -> None:
    """Train tokenizer + model on the multi-domain corpus; print the revision last."""
    if aux not in AUX_LOSSES:
        raise typer.BadParameter("must be mi, switch or none", param_hint="--aux")
    require_extra("model", "base train")
    from modelcore.train import recipes

    config = modeling.preset(preset)
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
        device_name=device,
        progress=progress,
    )


def expert_train(
    *,
    base_dir: BaseDirOption = None,
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
    dtype: Annotated[str, typer.Option("--dtype", help=" | ".join(EXPERT_DTYPES))] = (
        EXPERT_DTYPES[0]
    ),
    max_bytes_per_domain: MaxBytes = DEFAULT_BYTES,
    device: Device = None,
    progress: ShowProgress = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Train one expert against a frozen base by insertion; print a JSON summary."""
    if dtype not in EXPERT_DTYPES:
        raise typer.BadParameter("must be float32, bfloat16 or float16", param_hint="--dtype")
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory, not an expert file", param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{out} exists (pass --overwrite to replace it)", param_hint="--out"
        )
    bundle_dir = base_dir_of(base_dir, legacy_base)
    require_extra("model", "expert train")
    from modelcore.experts import save_expert
    from modelcore.train import recipes, train_expert

    bundle = modeling.load_base(bundle_dir, modeling.device(device))
    init = modeling.load_expert_for(init_from, bundle, "--init-from") if init_from else None
    loaded = modeling.corpus(max_bytes_per_domain)
    if domain not in loaded.domains:
        raise typer.BadParameter(
            f"unknown domain {domain!r}; known: {', '.join(sorted(loaded.domains))}",
            param_hint="--domain",
        )
    defaults = recipes.settings_for(bundle.config)
    seq = min(seq_len or defaults.seq_len, bundle.config.max_seq_len)
    data = recipes.batches(
        bundle.tokenizer,
        loaded.domains[domain].train,
        seq_len=seq,
        batch_size=batch_size or defaults.batch_size,
        seed=seed,
    )
    n_steps = steps or defaults.expert_steps
    opts = recipes.expert_options(
        bundle.tokenizer,
        loaded,
        domain,
        seq_len=seq,
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
