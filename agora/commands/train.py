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
from agora.methods import DEFAULT_LOCAL_METHOD
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


# agora local eval's batch size: the held-out numbers of `expert train --data` are exactly
# what `agora local eval --data ... --split heldout` prints (tested).
EVAL_BATCH_SIZE = 16


def parse_layers(value: str | None) -> list[int] | None:
    """``--layers 2,3`` as sorted distinct layer numbers (``None``: every layer)."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() for part in parts):
        raise typer.BadParameter(
            f"must be MoE layer numbers separated by commas, like 0,1; got {value!r}",
            param_hint="--layers",
        )
    return sorted({int(part) for part in parts})


def check_layers(layers: list[int] | None, n_layers: int) -> None:
    outside = [i for i in layers or () if i >= n_layers]
    if outside:
        raise typer.BadParameter(
            f"layer {outside[0]} does not exist: this base has MoE layers 0..{n_layers - 1}",
            param_hint="--layers",
        )


def _too_little_text(where: str, tokens: int, n_bytes: int, batch: int, seq: int) -> str:
    need = batch * (seq + 1)
    return (
        f"{where} holds {tokens} tokens ({n_bytes} bytes); one training batch needs "
        f"--batch-size x (--seq-len + 1) = {batch} x {seq + 1} = {need} tokens: add text "
        "or lower --batch-size / --seq-len"
    )


def expert_train(
    *,
    base_dir: BaseDirOption = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="Train on this built-in corpus domain.")
    ] = None,
    data: modeling.DataPaths = None,
    out: Annotated[Path, typer.Option("--out", help="Expert file to write (.safetensors).")],
    text_field: modeling.TextField = "text",
    heldout_share: modeling.HeldoutShare = modeling.DEFAULT_HELDOUT_SHARE,
    strict_utf8: modeling.StrictUtf8 = False,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Cover only these MoE layers, e.g. 0,1 (default: every layer)."
        ),
    ] = None,
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
            help="Weight of the LM loss on general text (the other corpus domains; with "
            "--data, every one) that teaches the expert to stay out of their way.",
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
    recalibrate_every: Annotated[
        int,
        typer.Option(
            "--recalibrate-every",
            min=0,
            help="Also set the router bias every N steps while training, so the expert "
            "learns in the lane it will have (0: once, after training only).",
        ),
    ] = 5,
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
    """Train one expert against a frozen base by insertion; print a JSON summary.

    The text: a corpus domain (--domain) or your own (--data PATH...)."""
    if domain is not None and data:
        raise typer.BadParameter("give --domain or --data, not both", param_hint="--data")
    if domain is None and not data:
        raise typer.BadParameter(
            "give --domain NAME (a built-in corpus domain) or --data PATH... (your own text)",
            param_hint="--data",
        )
    if dtype not in EXPERT_DTYPES:
        raise typer.BadParameter("must be float32, bfloat16 or float16", param_hint="--dtype")
    wanted_layers = parse_layers(layers)
    if data:
        modeling.check_heldout_share(heldout_share)
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory, not an expert file", param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{out} exists (pass --overwrite to replace it)", param_hint="--out"
        )
    bundle_dir = base_dir_of(base_dir, legacy_base)
    require_extra("model", "expert train")
    from modelcore.data.batches import stream_batches, token_stream
    from modelcore.experts import covered_layers, remove_modules, save_expert
    from modelcore.train import recipes, train_expert

    bundle = modeling.load_base(bundle_dir, modeling.device(device))
    check_layers(wanted_layers, bundle.config.n_layers)
    init = modeling.load_expert_for(init_from, bundle, "--init-from") if init_from else None
    defaults = recipes.settings_for(bundle.config)
    seq = min(seq_len or defaults.seq_len, bundle.config.max_seq_len)
    batch = batch_size or defaults.batch_size
    loaded = None
    if data:
        _, report, split = modeling.read_data(
            data, text_field=text_field, strict_utf8=strict_utf8, heldout_share=heldout_share
        )
        assert split is not None  # a held-out share was given
        train_texts = [d.text for d in split.train]
        where = f"the training split of --data ({len(train_texts)} document(s))"
    else:
        assert domain is not None
        loaded = modeling.corpus(max_bytes_per_domain)
        train_texts = modeling.domain_texts(loaded, domain, "train")
        where = f"domain {domain!r}"
    stream = token_stream(bundle.tokenizer, train_texts)
    # The stream ends every text with <|endoftext|>: those are no tokens of the text.
    train_tokens = stream.numel() - len(train_texts)
    if stream.numel() < batch * (seq + 1):
        n_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
        raise typer.BadParameter(
            _too_little_text(where, train_tokens, n_bytes, batch, seq),
            param_hint="--data" if data else "--domain",
        )
    batches = stream_batches(stream, seq_len=seq, batch_size=batch, seed=seed)
    if general_batches > 0 and loaded is None:
        loaded = modeling.corpus(max_bytes_per_domain)
    n_steps = steps or defaults.expert_steps
    opts = recipes.expert_options(
        bundle.tokenizer,
        loaded,  # type: ignore[arg-type]  # unused without general batches
        domain,  # None (--data): the general text is every corpus domain's
        seq_len=seq,
        batch_size=batch,
        seed=seed,
        routing_reg=routing_reg,
        max_general_share=max_general_share,
        general_batches=general_batches,
        general_weight=general_weight,
    )
    base_eval = _heldout_eval(bundle, split, []) if data else None
    started = time.perf_counter()
    trained = train_expert(
        bundle.model,
        batches,
        n_steps,
        lr or defaults.expert_lr,
        init_from=init,
        layers=wanted_layers,
        seed=seed,
        progress=progress,
        recalibrate_every=recalibrate_every,
        **opts,
    )
    seconds = round(time.perf_counter() - started, 2)
    save_expert(out, trained.tensors, base_revision=bundle.revision, dtype=dtype)
    summary: dict[str, Any] = {
        "path": str(out),
        "base_revision": bundle.revision,
        "domain": domain,
        "steps": n_steps,
        "layers": covered_layers(trained.tensors),
        "file_bytes": out.stat().st_size,
        # the trained weights (router biases are set by calibration, not by gradients)
        "trainable_parameters": sum(
            t.numel() for n, t in trained.tensors.items() if not n.endswith("router_bias")
        ),
        "train_tokens": train_tokens,
        "routing_reg": routing_reg,
        "max_general_share": max_general_share if general_batches > 0 else None,
        "general_weight": general_weight if general_batches > 0 else 0.0,
        "recalibrate_every": recalibrate_every if general_batches > 0 else 0,
        # per layer: the share of general text's tokens the expert fires on, and its bias
        "general_share": {str(i): r["share_after"] for i, r in trained.lanes.items()},
        "router_bias": {str(i): r["bias"] for i, r in trained.lanes.items()},
        "init_from": str(init_from) if init_from else None,
        "first_loss": trained.result.losses[0],
        "final_loss": trained.result.final_loss,
    }
    if data:
        assert base_eval is not None
        # Evaluated as `agora local eval` does: the base alone, then the written file.
        remove_modules(bundle.model, trained.module_idx)
        expert = modeling.load_expert_for(out, bundle, "--out")
        expert_eval = _heldout_eval(bundle, split, [expert])
        base_bpb, expert_bpb = base_eval["bits_per_byte"], expert_eval["bits_per_byte"]
        summary["data"] = {
            "paths": [str(p) for p in data],
            "text_field": text_field,
            "strict_utf8": strict_utf8,
            "heldout_share": heldout_share,
            **report.to_dict(),
        }
        summary["split"] = {
            **split.sizes(),
            "train_tokens": train_tokens,
            "heldout_tokens": base_eval["tokens"],
            "by_passage": split.by_passage,
        }
        summary["heldout_bits_per_byte"] = {
            "base": base_bpb,
            "expert": expert_bpb,
            "delta": expert_bpb - base_bpb,
            "relative": (expert_bpb - base_bpb) / base_bpb,
        }
        echo_err(
            f"held-out bits/byte: base {base_bpb:.2f} -> expert {expert_bpb:.2f} "
            f"({(expert_bpb - base_bpb) / base_bpb:+.1%})"
        )
    summary["seconds"] = seconds  # training only
    typer.echo(json.dumps(summary))


def _heldout_eval(bundle: Any, split: Any, experts: list[Any]) -> dict[str, Any]:
    """Bits per byte of the base (with ``experts``) on the held-out documents, computed
    as `agora local eval --data ... --split heldout` computes it."""
    from modelcore.compose.evaluate import evaluate_composition

    texts = {modeling.DATA_TEXT_SET: [d.text for d in split.heldout]}
    results = evaluate_composition(
        bundle.model,
        bundle.tokenizer,
        texts,
        experts,
        DEFAULT_LOCAL_METHOD,
        batch_size=EVAL_BATCH_SIZE,
    )
    return dict(results[modeling.DATA_TEXT_SET])
