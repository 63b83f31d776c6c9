"""Base pretraining, with an optional dense phase first (gradual modularization).

ModuleFormer (Shen et al. 2023) pretrains with top-k routing and the mutual-information
load-balancing loss ``H(e|x) - H(e)``: each token confident about its modules, all
modules used across the batch. Gradual modularization trains the first ``dense_steps``
with every module active (top-k = E, the layer is a dense mixture) and then switches to
sparse top-k, so the modules start from a shared, already useful function and
specialise from there instead of from noise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modelcore.train.loop import TrainResult, run_training
from modelcore.train.objectives import lm_with_aux


def set_dense(model: nn.Module, dense: bool) -> None:
    """Switch the MoE layers of ``model`` between dense (all modules) and top-k."""
    model.dense = dense


def pretrain(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    *,
    aux: str = "mi",
    aux_weight: float = 0.1,
    dense_steps: int = 0,
    seed: int = 0,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    clip: float = 1.0,
) -> TrainResult:
    """Train every parameter of ``model`` on ``batches`` ((B, T+1) token ids).

    ``aux``: ``"mi"`` (ModuleFormer), ``"switch"`` (Switch balance + z-loss baseline),
    ``"concentration"`` or ``"none"``. The model is left in sparse mode.
    """
    if not 0 <= dense_steps <= steps:
        raise ValueError(f"dense_steps must be in [0, steps={steps}], got {dense_steps}")

    def on_step(step: int) -> None:
        if step == 0:
            set_dense(model, dense_steps > 0)
        if step == dense_steps:
            set_dense(model, False)

    try:
        return run_training(
            model,
            batches,
            lm_with_aux(aux, aux_weight),
            steps=steps,
            lr=lr,
            warmup=warmup,
            weight_decay=weight_decay,
            clip=clip,
            seed=seed,
            progress=progress,
            description="pretrain" if dense_steps == 0 else "pretrain (dense, then sparse)",
            on_step=on_step,
        )
    finally:
        set_dense(model, False)
