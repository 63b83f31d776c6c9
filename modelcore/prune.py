"""Pruning FFN modules by activation frequency (ModuleFormer sections 4.2 and 5.3).

Shape legend: B batch, T length, E modules of one MoE layer.

After load-concentration finetuning a task uses few modules. ``activation_frequency``
counts, per MoE layer, the fraction of tokens that route to each module over some
batches; ``prune`` divides each layer's frequencies by that layer's maximum (so the
busiest module of every layer scores 1 and the threshold means the same thing in every
layer, whatever its load) and disables the modules under the threshold, or removes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from modelcore.model import ModularLM


@dataclass(frozen=True)
class PruneReport:
    kept_per_layer: list[int]  # active modules left in each layer
    pruned_per_layer: list[list[int]]  # module ids disabled (or removed) in each layer
    normalized: list[torch.Tensor]  # (E,) frequency / layer max, as used for the cut

    @property
    def kept_fraction(self) -> float:
        total = sum(self.kept_per_layer) + sum(len(p) for p in self.pruned_per_layer)
        return sum(self.kept_per_layer) / total


@torch.no_grad()
def activation_frequency(
    model: ModularLM, batches: Iterable[torch.Tensor], *, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Per MoE layer, the fraction of tokens routed to each module, shape (E,).

    Each batch is a LongTensor of token ids (B, T); every token of it is routed. A token
    counts once for each of its top-k modules, so a layer's fractions sum to k.
    """
    was_training = model.training
    model.eval()
    counts = [torch.zeros(n, dtype=torch.float64) for n in model.n_modules]
    tokens = 0
    try:
        for b, ids_BT in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            ids = ids_BT.to(next(model.parameters()).device)
            out = model(ids, aux="none")
            tokens += ids.numel()
            for count_E, r in zip(counts, out.routing, strict=True):
                idx = r.topk_idx_TK.reshape(-1).cpu()
                count_E.add_(torch.bincount(idx, minlength=count_E.numel()).double())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no batches to measure activation frequency on")
    return [c / tokens for c in counts]


def _normalize(freq_E: torch.Tensor) -> torch.Tensor:
    top = freq_E.max()
    return freq_E / top if top > 0 else torch.zeros_like(freq_E)


def threshold_for_fraction(freq: list[torch.Tensor], keep_fraction: float) -> float:
    """The smallest threshold that keeps at most ``keep_fraction`` of all modules."""
    if not 0 < keep_fraction <= 1:
        raise ValueError("keep_fraction must be in (0, 1]")
    scores = torch.cat([_normalize(f.double()) for f in freq]).sort(descending=True).values
    budget = max(int(keep_fraction * scores.numel()), len(freq))
    if budget >= scores.numel():
        return 0.0
    # Keep strictly more than the (budget+1)-th score: nudge just above it.
    above = torch.nextafter(scores[budget], torch.tensor(2.0, dtype=torch.float64))
    return min(float(above), 1.0)


def prune(
    model: ModularLM, freq: list[torch.Tensor], threshold: float, *, remove: bool = False
) -> PruneReport:
    """Disable (or, with ``remove``, delete) modules whose normalised frequency < threshold.

    The busiest module of a layer scores 1, so a threshold in (0, 1] never empties a layer.
    """
    if not 0 <= threshold <= 1:
        raise ValueError("threshold must be in [0, 1] (frequencies are normalised to max 1)")
    if [f.numel() for f in freq] != model.n_modules:
        raise ValueError("frequencies do not match the model's module counts")
    kept: list[int] = []
    pruned: list[list[int]] = []
    normalized: list[torch.Tensor] = []
    for ffn, freq_E in zip(model.ffn_layers, freq, strict=True):
        norm_E = _normalize(freq_E.double())
        keep_E = (norm_E >= threshold).to(ffn.active_E.device) & ffn.active_E
        if not bool(keep_E.any()):  # only possible with threshold 0 on a silent layer
            keep_E = ffn.active_E.clone()
        drop = [int(j) for j in (ffn.active_E & ~keep_E).nonzero().flatten()]
        if remove:
            for j in sorted(drop, reverse=True):  # high ids first keeps low ids valid
                ffn.remove_module(j)
        else:
            ffn.set_active(keep_E)
        kept.append(int(keep_E.sum()))
        pruned.append(drop)
        normalized.append(norm_E)
    return PruneReport(kept, pruned, normalized)
