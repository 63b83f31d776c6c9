"""Evaluation: perplexity and bits per byte per domain, for a base or a base + experts.

Shape legend: B windows per batch, T tokens per window, V vocabulary, E modules,
K top-k.

Byte accounting is exact (``modelcore.data.batches.eval_batches``): a domain's held-out
texts form one stream, each text followed by ``<|endoftext|>`` and the stream opened by
one, cut into windows of T predictions where each window's first input is the previous
window's last target, so every text token is a target exactly once and the separators,
which stand for no bytes, are not scored. Each byte-level BPE token is a fixed byte
string, so

    bits_per_byte = sum(NLL nats over scored tokens) / ln 2 / sum(bytes of those tokens)

and the bytes scored are exactly ``len(text.encode("utf-8"))`` summed over the texts
(a test holds this). Context restarts every T tokens (no sliding overlap): cheaper, a
little pessimistic, and the same for every model compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.data.batches import eval_batches


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _seq_len(model: nn.Module, seq_len: int | None) -> int:
    return int(model.config.max_seq_len) if seq_len is None else seq_len


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    texts_by_domain: Mapping[str, Sequence[str]],
    *,
    seq_len: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float | int]]:
    """Held-out perplexity and bits per byte of ``model`` on each domain's texts.

    Returns ``{domain: {"bits_per_byte", "perplexity", "tokens", "bytes", "nll_nats"}}``.
    """
    window = _seq_len(model, seq_len)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float | int]] = {}
    try:
        for domain, texts in texts_by_domain.items():
            nll = 0.0
            tokens = 0
            n_bytes = 0
            for batch in eval_batches(
                tokenizer, list(texts), seq_len=window, batch_size=batch_size
            ):
                tokens_BT1 = batch.tokens.to(device)
                mask_BT = batch.mask.to(device)
                logits_BTV = model(tokens_BT1[:, :-1], aux="none").logits.float()
                nll_BT = F.cross_entropy(
                    logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten(), reduction="none"
                ).view_as(mask_BT)
                # float64 accumulation: 1e6 tokens of ~3 nats in float32 lose ~1e-4 relative.
                nll += float(nll_BT.double()[mask_BT].sum())
                tokens += batch.n_tokens
                n_bytes += batch.n_bytes
            if tokens == 0:
                raise ValueError(f"domain {domain!r} has no text to score")
            results[domain] = {
                "bits_per_byte": nll / math.log(2) / max(1, n_bytes),
                "perplexity": math.exp(nll / tokens),
                "tokens": tokens,
                "bytes": n_bytes,
                "nll_nats": nll,
            }
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def module_usage(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int | None = None,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """How often each FFN module is among a token's top-k, per MoE layer: list of (E,)
    int64 counts over the positions ``evaluate`` scores (one per text token)."""
    window = _seq_len(model, seq_len)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    counts: list[torch.Tensor] = []
    try:
        for batch in eval_batches(tokenizer, list(texts), seq_len=window, batch_size=batch_size):
            out = model(batch.tokens[:, :-1].to(device), aux="none")
            # Count the positions whose prediction is scored (as in ``evaluate``): no
            # padding, and not the positions predicting a separator.
            mask_N = batch.mask.to(device).flatten()
            for layer, routing in enumerate(out.routing):
                n_modules = routing.probs_TE.shape[-1]
                idx_NK = routing.topk_idx_TK.reshape(mask_N.numel(), -1)[mask_N]
                layer_counts = torch.bincount(idx_NK.flatten(), minlength=n_modules).cpu()
                if layer == len(counts):
                    counts.append(layer_counts)
                else:
                    counts[layer] += layer_counts
    finally:
        model.train(was_training)
    return counts


def usage_entropy(counts: Sequence[torch.Tensor], *, normalized: bool = True) -> float:
    """Mean over layers of the entropy of the marginal module-usage distribution.

    ``normalized`` divides each layer's entropy by ``log E`` (1.0 = perfectly uniform
    usage, 0.0 = one module takes every token)."""
    values = []
    for counts_E in counts:
        p_E = counts_E.double() / counts_E.sum().clamp_min(1)
        h = float(-(p_E * p_E.clamp_min(1e-300).log()).sum())
        values.append(h / math.log(counts_E.numel()) if normalized and counts_E.numel() > 1 else h)
    return sum(values) / len(values)


def evaluate_mixture(
    model: nn.Module,
    tokenizer,
    texts_by_domain: Mapping[str, Sequence[str]],
    experts: Sequence[Mapping[str, torch.Tensor]],
    **kwargs,
) -> dict[str, dict[str, float | int]]:
    """Evaluate ``model`` with every expert in ``experts`` inserted at once (their
    mixture: token-level top-k routing over old and new modules); the model is
    restored afterwards."""
    from modelcore import experts as expert_ops

    added: list[list[int]] = []
    try:
        for tensors in experts:
            added.append(expert_ops.add_modules(model, dict(tensors)))
        return evaluate(model, tokenizer, texts_by_domain, **kwargs)
    finally:
        # Remove in reverse so the indices recorded at insertion are still valid.
        for idx_per_layer in reversed(added):
            expert_ops.remove_modules(model, idx_per_layer)
