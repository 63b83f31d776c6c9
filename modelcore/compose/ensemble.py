"""Output ensembling of k experts on one base, as ONE batched computation.

Shape legend: P paths (one per expert, ``k``), B batch, T length, N = P*B*T tokens,
D model dim, V vocab, E base modules per layer, E2 = E + P stacked modules, R router
hidden, F module hidden, K top-k.

The ensemble is DEMix's (Gururangan et al. 2022, "DEMix Layers", section 4.2)::

    p(x_t | x_<t) = sum_j P(j | x_<t) p_j(x_t | x_<t)

where ``p_j`` is the base with expert j inserted. The weights are either the Bayesian
domain posterior ``P(j | x_<t) ∝ P(j) prod_{s<t} p_j(x_s | x_<s)`` over the prefix, with a
prior ``P(j)`` cached as an exponential moving average of the posterior at the end of a
few sequences of target text (``estimate_prior``); or static per-sequence weights such as
c-BTM's ``softmax(-d^2 / T)`` over the top-k experts nearest by embedding distance
(Gururangan et al. 2023, "Scaling Expert Language Models with Unsupervised Domain
Discovery", section 2.3; ``cbtm_log_weights``).

One computation, not k models: path j of token n is "the base with module E+j
appended", so every MoE layer stacks the base's E modules and the P experts' modules into
one ``(E2, D, F)`` tensor, masks the router so that path j may choose among the base's
active modules and module E+j only, and runs ONE routing plan and two grouped matmuls
(``backend.grouped_mm``) over all P*B*T tokens. Embeddings and the first block's
attention see identical inputs on every path, so they run once on B rows and are
broadcast to the P paths just before the first MoE layer; from there the paths differ.

Mixing happens in log space. Scoring a target needs only each path's log-likelihood of
that target (``logsumexp_j(log w_j + log p_j(x_t))``), so the lm head runs path by path
and no (P, B, T, V) logit tensor is ever held; ``log_mix`` builds the full mixed
distribution (a distillation teacher) by accumulating path by path into one output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.compose._threads import single_thread
from modelcore.experts import covered_layers, expert_schema
from modelcore.kernels import plan_routing

# Rows of the logit matrix per block in ``log_mix``: 8 rows x 32k vocab x 4 bytes = 1 MiB,
# about the L2 of a server core, so the passes over one block (softmax, weighted add,
# final log) read DRAM once per input (benchmarks/compose.py measures it).
_MIX_BLOCK_BYTES = 1 << 20


class ExpertEnsemble(nn.Module):
    """``P`` experts on one base, evaluated as one batched forward.

    The base model is shared (not copied); the stacked FFN weights are a snapshot taken
    here, so build the ensemble after the base and experts are final.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Mapping[str, torch.Tensor]],
        *,
        include_base: bool = False,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        self.model = model
        config = model.config
        self.n_experts = len(experts)
        # include_base: one more path, last, that is the base alone (no module added), so
        # text the experts do not cover can fall back on the base instead of on the
        # least bad expert.
        self.n_paths = len(experts) + int(include_base)
        device = next(model.parameters()).device
        self.w_in: list[torch.Tensor] = []
        self.w_out: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self.allowed: list[torch.Tensor] = []  # per layer (P, E2) bool
        for tensors in experts:
            layers = covered_layers(tensors)
            schema = expert_schema(config, layers=layers)
            expected = {t["name"]: t["shape"] for t in schema["tensors"]}
            if sorted(expected) != sorted(tensors) or any(
                list(tensors[n].shape) != shape for n, shape in expected.items()
            ):
                raise ValueError("expert tensors do not match the base's expert schema")
        for i, ffn in enumerate(model.ffn_layers):
            w_in_EDF, w_out_EFD = (w.detach() for w in ffn.weights())
            rows_ER = ffn.router.expert_rows().detach()
            E = w_in_EDF.shape[0]
            allowed_PE2 = torch.zeros(self.n_paths, E + self.n_experts, dtype=torch.bool)
            allowed_PE2[:, :E] = ffn.active_E.cpu()
            new_in, new_out, new_rows = [], [], []
            for j, tensors in enumerate(experts):
                pre = f"layers.{i}.modules.0."
                if pre + "w_in" in tensors:
                    allowed_PE2[j, E + j] = True
                    new_in.append(tensors[pre + "w_in"])
                    new_out.append(tensors[pre + "w_out"])
                    new_rows.append(tensors[pre + "router_row"])
                else:  # layer not covered: a placeholder the mask never routes to
                    new_in.append(torch.zeros_like(w_in_EDF[0]))
                    new_out.append(torch.zeros_like(w_out_EFD[0]))
                    new_rows.append(torch.zeros_like(rows_ER[0]))
            like = {"device": device, "dtype": w_in_EDF.dtype}
            self.w_in.append(torch.cat([w_in_EDF, torch.stack(new_in).to(**like)]))
            self.w_out.append(torch.cat([w_out_EFD, torch.stack(new_out).to(**like)]))
            self.rows.append(torch.cat([rows_ER, torch.stack(new_rows).to(**like)]))
            self.allowed.append(allowed_PE2.to(device))

    # -- the batched forward ------------------------------------------------------------
    def _ffn(self, i: int, x_PBTD: torch.Tensor) -> torch.Tensor:
        ffn = self.model.ffn_layers[i]
        P, B, T, D = x_PBTD.shape
        x_ND = x_PBTD.reshape(P * B * T, D)
        logits_NE2 = torch.tanh(ffn.router.proj(x_ND)) @ self.rows[i].t()
        # Path p's tokens may only use the base's active modules and expert p's module.
        allowed_PE2 = self.allowed[i]
        masked = (
            logits_NE2.float()
            .view(P, B * T, -1)
            .masked_fill(~allowed_PE2[:, None, :], float("-inf"))
        )
        probs_NE2 = F.softmax(masked, dim=-1).view(P * B * T, -1)
        k = min(ffn.top_k, int(allowed_PE2.sum(-1).min()))
        top_NK, idx_NK = probs_NE2.topk(k, dim=-1)
        gates_NK = (top_NK / top_NK.sum(-1, keepdim=True)).to(x_ND.dtype)
        plan = plan_routing(idx_NK, self.w_in[i].shape[0])
        h_AF = F.gelu(ffn.backend.grouped_mm(x_ND, self.w_in[i], plan, grouped_out=True))
        y_ND = ffn.backend.grouped_mm(h_AF, self.w_out[i], plan, gates_TK=gates_NK, grouped_in=True)
        return y_ND.view(P, B, T, D)

    def hidden(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Final (normalised) hidden states of every path: (P, B, T, D)."""
        model = self.model
        P = self.n_paths
        x_BTD = model.embed(input_ids_BT)
        x_PBTD: torch.Tensor | None = None
        for i, block in enumerate(model.layers):
            if x_PBTD is None:
                # Identical on every path until the first MoE layer: attention runs once.
                a_BTD, _ = block.attn(block.ln_att(x_BTD))
                x_BTD = x_BTD + a_BTD
                x_PBTD = x_BTD.unsqueeze(0).expand(P, *x_BTD.shape)
            else:
                B, T, D = x_PBTD.shape[1:]
                a, _ = block.attn(block.ln_att(x_PBTD.reshape(P * B, T, D)))
                x_PBTD = x_PBTD + a.view(P, B, T, D)
            x_PBTD = x_PBTD + self._ffn(i, block.ln_ffn(x_PBTD))
        assert x_PBTD is not None
        return model.ln_f(x_PBTD)

    def path_logits(self, h_PBTD: torch.Tensor) -> Iterable[torch.Tensor]:
        """Each path's logits (B, T, V), one at a time (never all P at once)."""
        for p in range(self.n_paths):
            yield self.model.lm_head(h_PBTD[p])

    def log_likelihoods(self, batch_BT1: torch.Tensor) -> torch.Tensor:
        """``log p_j(x_t | x_<t)`` of every target of a (B, T+1) batch: (P, B, T) float32."""
        inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
        h_PBTD = self.hidden(inputs_BT)
        out = []
        for path_logits_BTV in self.path_logits(h_PBTD):
            logits_BTV = path_logits_BTV.float()
            target_BT = logits_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
            out.append(target_BT - torch.logsumexp(logits_BTV, dim=-1))
        return torch.stack(out)

    def mixture_log_probs(
        self, inputs_BT: torch.Tensor, log_w_PBT: torch.Tensor, h_PBTD: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mixed next-token distribution ``log sum_j w_j p_j``: (B, T, V)."""
        h = self.hidden(inputs_BT) if h_PBTD is None else h_PBTD
        B, T = inputs_BT.shape
        chunks = (lg.float().reshape(B * T, -1) for lg in self.path_logits(h))
        return log_mix(chunks, log_w_PBT.reshape(self.n_paths, B * T)).view(B, T, -1)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.hidden(input_ids_BT)


# -- weights ------------------------------------------------------------------------------
def posterior_log_weights(ll_PBT: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """DEMix posterior over the prefix: ``log P(j | x_<t)`` for every position (P, B, T).

    ``log_prior``: (P,) or (P, B). Position t uses the likelihoods of targets 0..t-1 only
    (an exclusive cumulative sum), so position 0 gets the prior itself.
    """
    ll = ll_PBT.double()
    prefix_PBT = ll.cumsum(-1) - ll
    prior = log_prior.double()
    prior = prior.view(-1, 1, 1) if prior.dim() == 1 else prior.unsqueeze(-1)
    joint = prefix_PBT + prior
    return (joint - torch.logsumexp(joint, dim=0, keepdim=True)).float()


def mix_scores(ll_PBT: torch.Tensor, log_w_PBT: torch.Tensor) -> torch.Tensor:
    """log-likelihood of each target under the mixture: (B, T)."""
    return torch.logsumexp(ll_PBT.double() + log_w_PBT.double(), dim=0)


def cbtm_log_weights(
    distances: torch.Tensor, *, temperature: float, top_k: int | None = None
) -> torch.Tensor:
    """c-BTM ensemble weights ``softmax(-d^2 / T)`` over the ``top_k`` nearest experts.

    ``distances``: (..., P) distances of a context's embedding to each expert's cluster
    centre. Experts outside the top-k get weight 0 (log weight -inf) and the rest are
    renormalised, as c-BTM does to keep inference sparse. Returns log weights (..., P).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    P = distances.shape[-1]
    k = P if top_k is None else top_k
    if not 1 <= k <= P:
        raise ValueError(f"top_k must be in [1, {P}]")
    scores = -(distances.double() ** 2) / temperature
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scores, dim=-1).float()


@torch.no_grad()
def estimate_prior(
    ensemble: ExpertEnsemble,
    batches: Iterable[torch.Tensor],
    *,
    n_sequences: int = 16,
    ema: float = 0.3,
) -> torch.Tensor:
    """DEMix's cached prior: start uniform; after each sequence of target text, move the
    prior towards that sequence's final posterior, ``prior <- (1 - ema) prior + ema post``.

    ``batches``: (B, T+1) token ids of the target text. Returns log prior (P,).
    """
    if not 0 < ema <= 1:
        raise ValueError("ema must be in (0, 1]")
    P = ensemble.n_paths
    prior = torch.full((P,), 1.0 / P, dtype=torch.float64)
    seen = 0
    device = next(ensemble.model.parameters()).device
    for batch in batches:
        ll_PBT = ensemble.log_likelihoods(batch.to(device)).double().cpu()
        for b in range(ll_PBT.shape[1]):
            if seen >= n_sequences:
                break
            post = torch.softmax(prior.log() + ll_PBT[:, b].sum(-1), dim=0)
            prior = (1 - ema) * prior + ema * post
            seen += 1
        if seen >= n_sequences:
            break
    if seen == 0:
        raise ValueError("no target text to estimate the prior on")
    return prior.clamp_min(1e-12).log().float()


# -- mixing in log space ------------------------------------------------------------------
def log_mix(logits_chunks: Iterable[torch.Tensor], log_w_PN: torch.Tensor) -> torch.Tensor:
    """``log sum_j w_j softmax(logits_j)`` for P logit matrices (N, V), read one at a time.

    No (P, N, V) stack is built: each path is added into one (N, V) accumulator of
    probabilities, in row blocks small enough to stay in cache while the block's softmax
    (one fused kernel: one exp per element, the only transcendental besides the final
    log) is computed and added with its weight. ``w_j softmax(x_j) <= 1``, so the sum
    cannot overflow; a token whose mixed probability is below the smallest normal float32
    (1e-38, i.e. -87 nats) is clamped there instead of -inf.
    """
    w_PN = log_w_PN.float().exp()
    last = w_PN.shape[0] - 1
    tiny = torch.finfo(torch.float32).tiny
    with single_thread():
        out, p = _log_mix_blocks(logits_chunks, w_PN, last, tiny)
    if out is None or p != last:
        raise ValueError(f"expected {last + 1} logit matrices")
    return out


def _log_mix_blocks(
    logits_chunks: Iterable[torch.Tensor], w_PN: torch.Tensor, last: int, tiny: float
) -> tuple[torch.Tensor | None, int]:
    out: torch.Tensor | None = None
    p = -1
    buf: torch.Tensor | None = None
    for p, chunk_NV in enumerate(logits_chunks):
        if p > last:
            raise ValueError(f"more logit matrices than weights ({last + 1})")
        x_NV = chunk_NV.float()
        N, V = x_NV.shape
        # On a GPU one launch per op over the whole matrix (blocks would only add launches).
        rows = N if x_NV.is_cuda else max(1, _MIX_BLOCK_BYTES // (4 * V))
        if out is None:
            out = torch.empty_like(x_NV)
            buf = x_NV.new_empty(min(rows, N), V)
        assert buf is not None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            acc, probs = out[r0:r1], buf[: r1 - r0]
            torch.softmax(x_NV[r0:r1], dim=-1, out=probs)
            w = w_PN[p, r0:r1, None]
            if p == 0:
                torch.mul(probs, w, out=acc)
            else:
                acc.addcmul_(probs, w)
            if p == last:  # finish the block while it is still in cache
                acc.clamp_min_(tiny).log_()
    return out, p


def uniform_log_weights(n_paths: int) -> torch.Tensor:
    return torch.full((n_paths,), -math.log(n_paths))
