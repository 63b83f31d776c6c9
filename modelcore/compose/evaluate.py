"""Evaluating compositions: bits per byte of base + experts under each method.

Shape legend: P experts, B windows per batch, T tokens per window.

Every method is scored exactly like ``modelcore.eval.evaluate`` (same windows, same byte
accounting, same result keys), so a composition's numbers sit next to the base's and a
single expert's in one table:

* ``mixture``: all experts inserted at once, token-level top-k routing;
* ``ensemble``: DEMix output ensembling, posterior weights with a cached prior estimated
  on the first ``prior_windows`` windows of the text being scored (DEMix estimates it on
  a few development sequences of the target domain), or fixed ``weights``; optionally
  with the base alone as one more path (``include_base``, the default);
* ``average``: the experts merged into one (``merge``: uniform, weighted by ``weights``,
  or TIES) and inserted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelcore.compose.ensemble import (
    ExpertEnsemble,
    estimate_prior,
    mix_scores,
    posterior_log_weights,
)
from modelcore.compose.merge import merge_tensors
from modelcore.compose.mixture import mixture
from modelcore.data.batches import eval_batches
from modelcore.eval import evaluate

METHODS = ("mixture", "ensemble", "average")


def _window(model: nn.Module, seq_len: int | None) -> int:
    return int(model.config.max_seq_len) if seq_len is None else seq_len


@torch.no_grad()
def evaluate_ensemble(
    ensemble: ExpertEnsemble,
    tokenizer: Any,
    texts_by_domain: Mapping[str, Sequence[str]],
    *,
    weights: Sequence[float] | None = None,
    prior_windows: int = 8,
    ema: float = 0.3,
    seq_len: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Held-out bits per byte of the ensemble per domain (``evaluate``'s keys, plus
    ``mean_weights``: the mean weight of each expert over the scored positions)."""
    model = ensemble.model
    window = _window(model, seq_len)
    device = next(model.parameters()).device
    P = ensemble.n_paths
    static = None
    if weights is not None:
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        if w.numel() != P or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"need {P} non-negative weights, not all zero")
        static = (w / w.sum()).log().float()
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for domain, texts in texts_by_domain.items():
            batches = list(
                eval_batches(tokenizer, list(texts), seq_len=window, batch_size=batch_size)
            )
            if static is None:
                prior = estimate_prior(
                    ensemble, (b.tokens for b in batches), n_sequences=prior_windows, ema=ema
                )
            nll, tokens, n_bytes = 0.0, 0, 0
            weight_sum = torch.zeros(P, dtype=torch.float64)
            for batch in batches:
                tokens_BT1 = batch.tokens.to(device)
                mask_BT = batch.mask.to(device)
                ll_PBT = ensemble.log_likelihoods(tokens_BT1)
                if static is None:
                    log_w_PBT = posterior_log_weights(ll_PBT, prior.to(device))
                else:
                    log_w_PBT = static.to(device).view(P, 1, 1).expand_as(ll_PBT)
                score_BT = mix_scores(ll_PBT, log_w_PBT)
                nll -= float(score_BT[mask_BT].sum())
                weight_sum += log_w_PBT.double().exp()[:, mask_BT].sum(-1).cpu()
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
                "mean_weights": (weight_sum / tokens).tolist(),
            }
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def posterior_by_position(
    ensemble: ExpertEnsemble,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    log_prior: torch.Tensor | None = None,
    reduce: str = "mean",
    seq_len: int | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Posterior ``P(j | x_<t)`` at each position t of a window, over all full windows of
    ``texts``: their ``mean`` or ``median`` (P, T), or every window (``none``: (P, W, T)).
    With no prior given, the prior is uniform, so this shows how fast the posterior alone
    finds the text's expert."""
    if reduce not in ("mean", "median", "none"):
        raise ValueError("reduce must be mean, median or none")
    model = ensemble.model
    window = _window(model, seq_len)
    device = next(model.parameters()).device
    P = ensemble.n_paths
    prior = torch.full((P,), -math.log(P)) if log_prior is None else log_prior
    traces: list[torch.Tensor] = []
    for batch in eval_batches(tokenizer, list(texts), seq_len=window, batch_size=batch_size):
        full = batch.mask.all(-1)  # windows without padding (every position is real text)
        if not bool(full.any()):
            continue
        ll_PBT = ensemble.log_likelihoods(batch.tokens[full].to(device))
        traces.append(posterior_log_weights(ll_PBT, prior.to(device)).double().exp().cpu())
    if not traces:
        raise ValueError("no full window of text to measure the posterior on")
    all_PWT = torch.cat(traces, dim=1)
    if reduce == "none":
        return all_PWT
    return all_PWT.mean(1) if reduce == "mean" else all_PWT.median(1).values


def evaluate_composition(
    model: nn.Module,
    tokenizer: Any,
    texts_by_domain: Mapping[str, Sequence[str]],
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str = "mixture",
    *,
    weights: Sequence[float] | None = None,
    merge: str = "uniform",
    merge_params: Mapping[str, Any] | None = None,
    prior_windows: int = 8,
    include_base: bool = True,
    seq_len: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Bits per byte per domain of ``model`` composed with ``experts`` by ``method``.

    ``include_base`` (ensemble only, on by default): the base alone is one more path
    (weights: one more, last; the estimated prior keeps at least ``MIN_BASE_PRIOR`` on
    it)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not experts:
        return evaluate(model, tokenizer, texts_by_domain, seq_len=seq_len, batch_size=batch_size)
    if method == "ensemble":
        ens = ExpertEnsemble(model, experts, include_base=include_base)
        return evaluate_ensemble(
            ens,
            tokenizer,
            texts_by_domain,
            weights=weights,
            prior_windows=prior_windows,
            seq_len=seq_len,
            batch_size=batch_size,
        )
    if method == "average":
        merge_method = "weighted" if merge == "uniform" and weights is not None else merge
        merged = merge_tensors(experts, merge_method, weights=weights, **dict(merge_params or {}))
        experts = [merged]
    with mixture(model, experts):
        return evaluate(model, tokenizer, texts_by_domain, seq_len=seq_len, batch_size=batch_size)
