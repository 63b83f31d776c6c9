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

Router calibration (fresh experts). Gates are renormalised over the top-k modules, so a
module outside a token's top-k gets no gradient at all, router row included: a new module
that starts outside every top-k never learns. ``experts.add_modules`` gives it the mean
of the old rows (an average logit), which on the tiny base left it selected for almost no
token: after 100 steps the domain's bits per byte had moved by 0.001. So before training
the new row is set, per layer, to ``c * u``: ``u`` the unit mean router feature of the
domain's tokens, ``c`` the smallest scale that puts the module into the top-k of
``coverage`` (half) of them. Training then decides where it is really useful, and the
routing regularization pulls the row back where it is not.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
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


@torch.no_grad()
def calibrate_new_rows(
    model: nn.Module,
    module_idx: Sequence[int],
    batches: Sequence[torch.Tensor],
    *,
    coverage: float = 0.5,
    copy_busiest: bool = True,
) -> None:
    """Set each new module's router row so it is in the top-k of ``coverage`` of the
    tokens of ``batches`` ((B, T+1) ids of the expert's domain); see the module docstring.

    A row ``c * u`` can only win tokens whose router feature points along ``u``
    (``h . u > 0``), so the share reached is at most theirs."""
    if not 0 < coverage < 1:
        raise ValueError("coverage must be in (0, 1)")
    layers = list(model.ffn_layers)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i, j in enumerate(module_idx) if j >= 0}
    hooks = [
        layers[i].register_forward_hook(lambda _m, inp, _o, i=i: captured[i].append(inp[0]))
        for i in captured
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
    for i, chunks in captured.items():
        ffn, j = layers[i], module_idx[i]
        h_TR = torch.tanh(ffn.router.proj(torch.cat(chunks)))
        old_E = ffn.active_E.clone()
        old_E[j] = False
        logits_TE = (h_TR @ ffn.router.expert_rows().t())[:, old_E]
        k = min(ffn.top_k, int(old_E.sum()))
        kth_T = logits_TE.topk(k, dim=-1).values[:, -1]
        u_R = h_TR.mean(0)
        u_R = u_R / u_R.norm().clamp_min(1e-6)
        along_T = h_TR @ u_R
        aligned = along_T > 1e-6
        if not bool(aligned.any()):
            continue
        # Scale at which the new logit c * (h . u) reaches each token's k-th best logit.
        needed_T = kth_T[aligned] / along_T[aligned]
        # `coverage` of *all* tokens: the non-aligned ones can never be reached.
        q = min(1.0, coverage * aligned.numel() / int(aligned.sum()))
        scale = torch.quantile(needed_T.float(), q).clamp_min(0.0)
        b = ffn.block_of(j)
        block = ffn.router.rows[b]
        block.copy_((scale * u_R).view_as(block).to(block.dtype))
        if copy_busiest:
            # Start from the old module the domain uses most: where the new module takes
            # its place in a token's top-k the layer computes the same function as before.
            counts_E = torch.bincount(logits_TE.topk(k, dim=-1).indices.flatten(), minlength=k)
            busiest = int(old_E.nonzero().flatten()[int(counts_E.argmax())])
            w_in_EDF, w_out_EFD = ffn.weights()
            ffn.w_in[b].copy_(w_in_EDF[busiest].view_as(ffn.w_in[b]))
            ffn.w_out[b].copy_(w_out_EFD[busiest].view_as(ffn.w_out[b]))


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
    calibrate: int = 2,
    coverage: float = 0.5,
) -> ExpertTraining:
    """Insert one module per MoE layer into ``model``, train only those on ``batches``.

    The modules stay inserted (evaluate the model as base + this expert right away;
    ``experts.remove_modules(model, result.module_idx)`` restores the base). The
    ``requires_grad`` flags of the base's parameters are restored afterwards.
    ``calibrate``: how many of the batches calibrate a fresh module's router rows (they
    are trained on too; 0 keeps the rows ``experts.add_modules`` gives).
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
        if init_from is None and calibrate > 0:
            iterator = iter(batches)
            first = list(itertools.islice(iterator, calibrate))
            calibrate_new_rows(model, module_idx, first, coverage=coverage)
            batches = itertools.chain(first, iterator)
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
