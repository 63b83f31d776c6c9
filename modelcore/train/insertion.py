"""Expert training by insertion against a frozen base (ModuleFormer section 4.3).

One new FFN module is appended to every MoE layer, with its router row (the module's
"expert embedding"); everything else, including the router's input projection and all
old modules, is frozen, so the base is bit-identical afterwards and the expert is only
the new tensors. An optional routing regularization ``w * ||rows of the new modules||``
keeps the new modules from pulling in tokens of other domains: the router's logit for a
module is ``h_R . row_R``, so a small row means the module wins only where it is much
better aligned than the old ones (ModuleFormer 5.2: less forgetting on other tasks).

A new expert can start from an existing expert's tensors (``init_from``: c-BTM and
DEMix initialise a new domain's expert from the nearest existing one) instead of fresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from modelcore import experts, losses
from modelcore.train.loop import TrainResult, run_training
from modelcore.train.objectives import lm_with_aux


@dataclass
class ExpertTraining:
    tensors: dict[str, torch.Tensor]  # named as experts.expert_schema says, detached, CPU
    module_idx: list[int]  # the inserted module's index in each MoE layer
    result: TrainResult


def train_expert(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    *,
    routing_reg: float = 0.0,
    init_from: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    clip: float = 1.0,
) -> ExpertTraining:
    """Insert one module per MoE layer into ``model``, train only those on ``batches``.

    The modules stay inserted (evaluate the model as base + this expert right away;
    ``experts.remove_modules(model, result.module_idx)`` restores the base). The
    ``requires_grad`` flags of the base's parameters are restored afterwards.
    """
    if routing_reg < 0:
        raise ValueError(f"routing_reg must be >= 0, got {routing_reg}")
    before = {id(p): p.requires_grad for p in model.parameters()}
    # The fresh module's initial weights are drawn here: seed them too.
    generator = torch.Generator().manual_seed(seed)
    module_idx = experts.add_modules(
        model, dict(init_from) if init_from is not None else None, generator=generator
    )
    try:
        trainable = experts.freeze_for_insertion(model, module_idx)

        def reg_term() -> tuple[str, torch.Tensor]:
            return "routing_reg", losses.routing_reg(experts.router_rows(model, module_idx))

        result = run_training(
            model,
            batches,
            lm_with_aux("none", 0.0, extra=reg_term, extra_weight=routing_reg),
            steps=steps,
            lr=lr,
            params=trainable,
            warmup=warmup,
            weight_decay=weight_decay,
            clip=clip,
            seed=seed,
            progress=progress,
            description="expert",
        )
    except BaseException:
        experts.remove_modules(model, module_idx)
        raise
    finally:
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), True))
    tensors = {
        name: t.detach().to("cpu").clone()
        for name, t in experts.extract_expert(model, module_idx).items()
    }
    return ExpertTraining(tensors=tensors, module_idx=module_idx, result=result)
