"""Keeping inserted modules in their lane: router biases calibrated on general text.

Shape legend: T tokens, E modules of a layer, K top-k, R router hidden dim.

A module inserted into a MoE layer changes the layer's output for a token only when it
enters that token's top-k: gates are renormalised over the k chosen modules, so a module
outside the top-k leaves the output bit-identical to the base's. Its *margin* on a token
is its router logit minus the k-th best logit of the other active modules; it fires
where the margin is positive. The *routing share* of a text is the fraction of its
tokens where it fires.

An inserted module carries a scalar router bias (``MLPRouter.biases``). Calibrating it
on general text (text of the domains the base was trained on, not the expert's) sets it
so that the share there is at most ``max_share``: the bias moves down by the margin
that ``floor(max_share * n)`` of the n margins exceed, when that margin is positive, and
is left as it is otherwise (never raised: the module was trained with the tokens it had). The
layers are calibrated in order, each on the inputs the calibrated earlier layers give.
Next to the domain-informed router row (FlexOlmo, Shi et al. 2025, arXiv 2507.07024,
initialises router embeddings from the domain's data), the bias is the knob that bounds
how much of other text an expert can touch (docs/composition.md, "Do no harm").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["calibrate_router_bias", "layer_inputs", "routing_margins", "routing_share"]


def _pairs(model: Any, module_idx: Sequence[int]) -> list[tuple[int, int]]:
    if len(module_idx) != len(model.ffn_layers):
        raise ValueError(f"need one index per MoE layer ({len(model.ffn_layers)})")
    return [(i, int(j)) for i, j in enumerate(module_idx) if int(j) >= 0]


@torch.no_grad()
def layer_inputs(model: Any, layers: Sequence[int], batches: Sequence[torch.Tensor]) -> dict:
    """The FFN inputs (ln_ffn outputs) of ``layers`` over ``batches`` ((B, T+1) ids),
    as the model computes them now (every module active)."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    ffns = model.ffn_layers
    hooks = [
        ffns[i].register_forward_hook(lambda _m, inp, _o, i=i: captured[i].append(inp[0]))
        for i in layers
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch_BT1 in batches:
            model(batch_BT1[:, :-1].to(device), aux="none")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {i: torch.cat(chunks) for i, chunks in captured.items() if chunks}


def _margins(ffn: Any, j: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Module j's router logit minus the k-th best logit of the layer's other active
    modules, per token (float32)."""
    logits_TE = ffn.router(x_TD).float()
    others_E = ffn.active_E.clone()
    others_E[j] = False
    n_others = int(others_E.sum())
    if n_others == 0:
        return torch.full((x_TD.shape[0],), float("inf"))
    k = min(ffn.top_k, n_others)
    kth_T = logits_TE[:, others_E].topk(k, dim=-1).values[:, -1]
    return logits_TE[:, j] - kth_T


@torch.no_grad()
def routing_margins(
    model: Any, module_idx: Sequence[int], batches: Iterable[torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Per covered layer, the inserted module's margin on every token of ``batches``."""
    pairs = _pairs(model, module_idx)
    inputs = layer_inputs(model, [i for i, _ in pairs], list(batches))
    if not inputs:
        raise ValueError("no text to measure the routing on")
    return {i: _margins(model.ffn_layers[i], j, inputs[i]) for i, j in pairs}


@torch.no_grad()
def routing_share(
    model: Any, module_idx: Sequence[int], batches: Iterable[torch.Tensor]
) -> dict[int, float]:
    """Per covered layer, the fraction of the tokens of ``batches`` whose top-k
    includes the inserted module (as the model routes them now)."""
    return {
        i: float((m > 0).float().mean())
        for i, m in routing_margins(model, module_idx, batches).items()
    }


@torch.no_grad()
def calibrate_router_bias(
    model: Any,
    module_idx: Sequence[int],
    general: Iterable[torch.Tensor],
    *,
    max_share: float,
) -> dict[int, dict[str, float]]:
    """Lower each inserted module's router bias until it fires on at most ``max_share``
    of the tokens of ``general`` ((B, T+1) ids of general text); see the module docstring.

    Returns per layer ``{"share_before", "share_after", "bias"}``.
    """
    if not 0.0 <= max_share < 1.0:
        raise ValueError(f"max_share must be in [0, 1), got {max_share}")
    batches = list(general)
    if not batches:
        raise ValueError("no general text to calibrate the router bias on")
    report: dict[int, dict[str, float]] = {}
    for i, j in _pairs(model, module_idx):
        ffn = model.ffn_layers[i]
        block = ffn.block_of(j)
        bias = ffn.router.bias_of_block(block)
        x_TD = layer_inputs(model, [i], batches)[i]
        margin_T = _margins(ffn, j, x_TD)
        before = float((margin_T > 0).float().mean())
        # The smallest shift that leaves at most floor(max_share * n) margins positive:
        # the margin with that many above it (ties aside) is moved to zero.
        n = margin_T.numel()
        allowed = int(max_share * n)
        q = float(margin_T.double().sort().values[n - allowed - 1])
        if before > max_share and q > 0:
            # A little past it, so that after float32 rounding of the bias it is <= 0.
            shift = q + 1e-5 * max(1.0, abs(q))
            bias.data.sub_(shift)
            margin_T = margin_T - shift
        report[i] = {
            "share_before": before,
            "share_after": float((margin_T > 0).float().mean()),
            "bias": float(bias.detach().reshape(-1)[0]),
        }
    return report
