"""Training objectives: the LM loss plus the routing terms each training mode adds.

Shape legend: B batch, T tokens per row, V vocabulary.

The aux terms are the ones the forward pass makes (``ModularLM.forward(..., aux=KIND)``
returns them in ``aux_losses``; nothing is kept in globals). Which one a run uses is the
caller's choice, not the config's: the same base is pretrained with MI, finetuned with
load concentration, and compared against no aux loss at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modelcore import losses
from modelcore.train.loop import Objective

AUX_CHOICES = ("mi", "switch", "concentration", "none")

# Relative weights inside one aux kind. ST-MoE trains with balance weight 1e-2 and z-loss
# weight 1e-3, so the z-loss counts a tenth of the balance loss.
AUX_PARTS = {"switch": 1.0, "z": 0.1, "mi": 1.0, "concentration": 1.0}


def forward_lm(model: nn.Module, batch_BT1: torch.Tensor, *, aux: str = "none"):
    """Run the model on a (B, T+1) batch; return (output, mean next-token NLL)."""
    inputs_BT = batch_BT1[:, :-1]
    targets_BT = batch_BT1[:, 1:]
    out = model(inputs_BT, aux=aux)
    return out, losses.lm_loss(out.logits, targets_BT)


def lm_with_aux(
    aux: str,
    aux_weight: float,
    *,
    extra: Callable[[], tuple[str, torch.Tensor]] | None = None,
    extra_weight: float = 0.0,
) -> Objective:
    """LM loss + ``aux_weight`` * the model's aux loss (+ ``extra_weight`` * an extra term)."""
    if aux not in AUX_CHOICES:
        raise ValueError(f"aux must be one of {AUX_CHOICES}, got {aux!r}")
    kind = aux if aux_weight != 0.0 else "none"

    def objective(model: nn.Module, batch_BT1: torch.Tensor):
        out, lm = forward_lm(model, batch_BT1, aux=kind)
        loss = lm
        metrics = {"lm": float(lm.detach())}
        for name, term in out.aux_losses.items():
            loss = loss + aux_weight * AUX_PARTS.get(name, 1.0) * term
            metrics[name] = float(term.detach())
        if extra is not None and extra_weight != 0.0:
            name, term = extra()
            loss = loss + extra_weight * term
            metrics[name] = float(term.detach())
        return loss, metrics

    return objective
