"""Finetuning the whole base: load concentration (before pruning), and plain domain
finetuning (the forgetting baseline that expert insertion is compared against).

Load concentration (ModuleFormer section 4.2) minimises the marginal entropy of module
usage ``H(e)`` on top of the LM loss, so the tokens of the finetuning text concentrate
on few modules; the rarely used modules can then be pruned (``modelcore.prune``) with
little loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modelcore.train.loop import TrainResult, run_training
from modelcore.train.objectives import lm_with_aux


def finetune_concentration(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    *,
    weight: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    clip: float = 1.0,
) -> TrainResult:
    """Finetune every parameter with LM loss + ``weight`` * H(e) (per layer, averaged)."""
    return run_training(
        model,
        batches,
        lm_with_aux("concentration", weight),
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        seed=seed,
        progress=progress,
        description="concentrate",
    )


def finetune_full(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    *,
    aux: str = "mi",
    aux_weight: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    clip: float = 1.0,
) -> TrainResult:
    """Finetune every parameter of the base on one domain (same aux as pretraining)."""
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
        description="finetune",
    )
