"""Expert training by insertion against a frozen base (ModuleFormer section 4.3).

One new FFN module is appended to every MoE layer (or to the ``layers`` asked for: an
expert may cover some layers only, docs/composition.md), with its router row (the module's
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
from dataclasses import dataclass, field

import torch
from torch import nn

from modelcore import experts, lanes, losses
from modelcore.train.loop import TrainResult, run_training
from modelcore.train.objectives import forward_lm, lm_with_aux


@dataclass
class ExpertTraining:
    tensors: dict[str, torch.Tensor]  # named as experts.expert_schema says, detached, CPU
    module_idx: list[int]  # the inserted module's index in each MoE layer
    result: TrainResult
    # per covered layer, the router-bias calibration on general text after training
    # (``lanes.calibrate_router_bias``: share_before, share_after, bias); {} without it
    lanes: dict[int, dict[str, float]] = field(default_factory=dict)
    # parameters (elements) the optimizer trained: the new modules' weights and router rows
    trainable_parameters: int = 0

    @property
    def layers(self) -> list[int]:
        """The MoE layers the expert covers."""
        return [i for i, j in enumerate(self.module_idx) if j >= 0]


@torch.no_grad()
def _router_features(
    model: nn.Module, layers: Sequence[int], batches: Sequence[torch.Tensor]
) -> dict[int, torch.Tensor]:
    """``tanh(W x + b)`` of every token of ``batches`` at each layer's router."""
    inputs = lanes.layer_inputs(model, layers, batches)
    ffns = list(model.ffn_layers)  # type: ignore[arg-type]
    return {i: torch.tanh(ffns[i].router.proj(x)) for i, x in inputs.items()}


@torch.no_grad()
def calibrate_new_rows(
    model: nn.Module,
    module_idx: Sequence[int],
    batches: Sequence[torch.Tensor],
    *,
    coverage: float = 0.5,
    copy_busiest: bool = True,
    general: Sequence[torch.Tensor] | None = None,
) -> None:
    """Set each new module's router row so it is in the top-k of ``coverage`` of the
    tokens of ``batches`` ((B, T+1) ids of the expert's domain); see the module docstring.

    A row ``c * u`` can only win tokens whose router feature points along ``u``
    (``h . u > 0``), so the share reached is at most theirs.

    ``general``: batches of general text (the base's domains). With them ``u`` is the
    direction from general text's mean router feature to the domain's (the domain's mean
    hidden state at that layer, FlexOlmo's router embedding, made contrastive: a row along
    the plain mean also points at every token the domain shares with general text)."""
    if not 0 < coverage < 1:
        raise ValueError("coverage must be in (0, 1)")
    layers = list(model.ffn_layers)  # type: ignore[arg-type]
    covered = [i for i, j in enumerate(module_idx) if j >= 0]
    # The new modules are switched off while the features are read: the base's view.
    saved = {i: layers[i].active_E.clone() for i in covered}
    for i in covered:
        off = saved[i].clone()
        off[module_idx[i]] = False
        layers[i].set_active(off)
    try:
        feats = _router_features(model, covered, list(batches))
        general_feats = _router_features(model, covered, list(general)) if general else {}
    finally:
        for i in covered:
            layers[i].set_active(saved[i])
    for i, h_TR in feats.items():
        ffn, j = layers[i], module_idx[i]
        old_E = ffn.active_E.clone()
        old_E[j] = False
        logits_TE = (h_TR @ ffn.router.expert_rows().t())[:, old_E]
        k = min(ffn.top_k, int(old_E.sum()))
        kth_T = logits_TE.topk(k, dim=-1).values[:, -1]
        u_R = h_TR.mean(0)
        if i in general_feats:
            u_R = u_R - general_feats[i].mean(0)
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
    layers: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    calibrate: int = 2,
    coverage: float = 0.5,
    general: Iterable[torch.Tensor] | None = None,
    max_general_share: float | None = None,
    general_weight: float = 1.0,
    calibration_batches: int = 8,
    recalibrate_every: int = 0,
) -> ExpertTraining:
    """Insert one module per MoE layer of ``layers`` into ``model``, train only those on
    ``batches``.

    ``layers``: the MoE layers the expert covers (docs/composition.md, "Experts in some
    layers only"); the others get no module and stay exactly the base. ``None``: every
    layer, or with ``init_from`` the layers that expert covers. With both, the new expert
    covers ``layers``: a layer ``init_from`` covers starts from its tensors, any other
    from a fresh (calibrated) module, and ``init_from``'s other layers are not used.

    The modules stay inserted (evaluate the model as base + this expert right away;
    ``experts.remove_modules(model, result.module_idx)`` restores the base). The
    ``requires_grad`` flags of the base's parameters are restored afterwards.
    ``calibrate``: how many of the batches calibrate a fresh module's router rows (they
    are trained on too; 0 keeps the rows ``experts.add_modules`` gives).

    ``general`` ((B, T+1) batches of general text: the base's domains, not this one) and
    ``max_general_share``: the new rows start contrastive (domain minus general, see
    ``calibrate_new_rows``), every step adds ``general_weight`` times the LM loss on a
    general batch, and after training (and every ``recalibrate_every`` steps, if > 0) the
    router bias is calibrated on the first ``calibration_batches`` general batches so that
    the module fires on at most that share of general text's tokens per layer
    (``lanes.calibrate_router_bias``; the result is in ``.lanes``).
    """
    if routing_reg < 0:
        raise ValueError(f"routing_reg must be >= 0, got {routing_reg}")
    if (general is None) != (max_general_share is None):
        raise ValueError("give general text and max_general_share together")
    if general_weight < 0:
        raise ValueError(f"general_weight must be >= 0, got {general_weight}")
    general_stream = iter(general) if general is not None else None
    calib: list[torch.Tensor] | None = None
    if general_stream is not None:
        calib = list(itertools.islice(general_stream, calibration_batches))
        if not calib:
            raise ValueError("general must hold at least one batch")
    before = {id(p): p.requires_grad for p in model.parameters()}
    # The fresh module's initial weights are drawn here: seed them too.
    generator = torch.Generator().manual_seed(seed)
    init = dict(init_from) if init_from is not None else None
    if layers is not None:
        layers = experts.check_layers(layers, len(model.ffn_layers))  # type: ignore[arg-type]
    module_idx = experts.add_modules(model, init, generator=generator, layers=layers)
    try:
        # Fresh modules (every one without init_from, else those of layers it lacks).
        inherited = set(experts.covered_layers(init)) if init is not None else set()
        fresh_idx = [-1 if i in inherited else j for i, j in enumerate(module_idx)]
        if calibrate > 0 and any(j >= 0 for j in fresh_idx):
            iterator = iter(batches)
            first = list(itertools.islice(iterator, calibrate))
            calibrate_new_rows(model, fresh_idx, first, coverage=coverage, general=calib)
            batches = itertools.chain(first, iterator)
        on_step = None
        if recalibrate_every > 0 and calib is not None and max_general_share is not None:
            share = max_general_share

            def on_step(step: int) -> None:
                # Train in the lane the module will have: the bias is set before the
                # first step and again every `recalibrate_every` steps.
                if step % recalibrate_every == 0:
                    lanes.calibrate_router_bias(model, module_idx, calib, max_share=share)

        trainable = experts.freeze_for_insertion(model, module_idx)
        device = next(model.parameters()).device
        # More general text for the general LM term; the calibration sample once it ends.
        replay = itertools.chain(general_stream, itertools.cycle(calib)) if calib else None

        def reg_term() -> tuple[str, torch.Tensor]:
            reg = losses.routing_reg(experts.router_rows(model, module_idx))
            if replay is None or general_weight == 0.0:
                return "routing_reg", routing_reg * reg
            # The LM loss on general text: the base is frozen, so its gradient reaches only
            # the new module and row, which learn to stay out of general text's way.
            _, lm_general = forward_lm(model, next(replay).to(device))
            return "routing_reg+general_lm", routing_reg * reg + general_weight * lm_general

        result = run_training(
            model,
            batches,
            lm_with_aux("none", 0.0, extra=reg_term, extra_weight=1.0),
            steps=steps,
            lr=lr,
            params=trainable,
            warmup=warmup,
            weight_decay=weight_decay,
            clip=clip,
            seed=seed,
            progress=progress,
            description="expert",
            on_step=on_step,
        )
    except BaseException:
        experts.remove_modules(model, module_idx)
        raise
    finally:
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), True))
    report: dict[int, dict[str, float]] = {}
    if calib is not None and max_general_share is not None:
        # Training moved the rows; the bias is set for the rows as they are now.
        report = lanes.calibrate_router_bias(model, module_idx, calib, max_share=max_general_share)
    tensors = {
        name: t.detach().to("cpu").clone()
        for name, t in experts.extract_expert(model, module_idx).items()
    }
    return ExpertTraining(
        tensors=tensors,
        module_idx=module_idx,
        result=result,
        lanes=report,
        trainable_parameters=sum(p.numel() for p in trainable),
    )
