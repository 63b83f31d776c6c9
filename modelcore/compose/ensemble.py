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
(``backend.grouped_mm``) over all P*B*T tokens. In a layer expert j does not cover, path
j may choose the base's modules only: there it is the base (docs/composition.md,
"Experts in some layers only"). Embeddings and the first block's
attention see identical inputs on every path, so they run once on B rows and are
broadcast to the P paths just before the first MoE layer; from there the paths differ.

Mixing happens in log space. Scoring a target needs only each path's log-likelihood of
that target (``logsumexp_j(log w_j + log p_j(x_t))``), so the lm head runs path by path
and no (P, B, T, V) logit tensor is ever held; ``log_mix`` builds the full mixed
distribution (a distillation teacher) by accumulating path by path into one output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from modelcore import native
from modelcore.decode import KVCache, decoding_threads
from modelcore.experts import check_expert
from modelcore.kernels import plan_routing
from modelcore.router import topk_keeping_base
from modelcore.threads import default_workers, run_blocks, single_thread

# Bytes of exp'd logits per block in ``log_mix`` (rows x paths x vocab x 4; with 4 paths
# and a 32k vocab, 2 rows): well inside a server core's L2 next to the output rows, so the
# passes over one block (exp, row sums, weighted sum, log) read DRAM once per input
# (benchmarks/compose.py measures it).
_MIX_BLOCK_BYTES = 1 << 20
# rows per block handed to a thread by the native kernel (it works row by row; blocks only
# amortise the call and balance the threads)
_NATIVE_BLOCK_ROWS = 16
_FLOAT32_MAX = torch.finfo(torch.float32).max
# The base path's least share of an estimated prior (``estimate_prior``).
MIN_BASE_PRIOR = 0.5


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
        include_base: bool = True,
        expert_bias: bool = False,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        self.model = model
        config = model.config
        self.n_experts = len(experts)
        # include_base (the default): one more path, last, that is the base alone (no
        # module added), the "null expert", so text the experts do not cover falls back on
        # the base instead of on the least bad expert, and removing an expert returns its
        # domain to the base (docs/composition.md, "Do no harm").
        self.n_paths = len(experts) + int(include_base)
        self.include_base = include_base
        # The router bias keeps an inserted module out of other text in a token-level
        # mixture (modelcore.lanes). A path's text is chosen per sequence by the posterior,
        # with the base as a path, so by default each path inserts the module as trained,
        # without that bias: on domains the base never saw this is worth about twice the
        # gain (docs/composition.md, "Do no harm").
        self.expert_bias = expert_bias
        device = next(model.parameters()).device
        self.w_in: list[torch.Tensor] = []
        self.w_out: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []  # per layer (E2,): router bias of every module
        self.allowed: list[torch.Tensor] = []  # per layer (P, E2) bool
        covered: set[int] = set()
        for tensors in experts:
            try:
                covered.update(check_expert(tensors, config))
            except ValueError as exc:
                raise ValueError(
                    f"expert tensors do not match the base's expert schema: {exc}"
                ) from exc
        # The MoE layers some expert covers (a distilled student covers these).
        self.layers: list[int] = sorted(covered)
        for i, ffn in enumerate(model.ffn_layers):
            w_in_EDF, w_out_EFD = (w.detach() for w in ffn.weights())
            rows_ER = ffn.router.expert_rows().detach()
            E = w_in_EDF.shape[0]
            base_bias = ffn.router.expert_biases()
            bias_E = rows_ER.new_zeros(E) if base_bias is None else base_bias.detach()
            new_bias = []
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
                    # expert_bias False (the default): the module without its lane bias;
                    # files from before router biases existed have none (bias 0).
                    bias = tensors.get(pre + "router_bias") if expert_bias else None
                    new_bias.append(torch.zeros(1) if bias is None else bias.reshape(1))
                else:  # layer not covered: a placeholder the mask never routes to
                    new_in.append(torch.zeros_like(w_in_EDF[0]))
                    new_out.append(torch.zeros_like(w_out_EFD[0]))
                    new_rows.append(torch.zeros_like(rows_ER[0]))
                    new_bias.append(torch.zeros(1))
            like = {"device": device, "dtype": w_in_EDF.dtype}
            self.w_in.append(torch.cat([w_in_EDF, torch.stack(new_in).to(**like)]))
            self.w_out.append(torch.cat([w_out_EFD, torch.stack(new_out).to(**like)]))
            self.rows.append(torch.cat([rows_ER, torch.stack(new_rows).to(**like)]))
            self.biases.append(torch.cat([bias_E.to(**like), torch.cat(new_bias).to(**like)]))
            self.allowed.append(allowed_PE2.to(device))

    # -- the batched forward ------------------------------------------------------------
    def _ffn(self, i: int, x_PBTD: torch.Tensor) -> torch.Tensor:
        ffn = self.model.ffn_layers[i]
        P, B, T, D = x_PBTD.shape
        x_ND = x_PBTD.reshape(P * B * T, D)
        logits_NE2 = torch.tanh(ffn.router.proj(x_ND)) @ self.rows[i].t() + self.biases[i]
        # Path p's tokens may only use the base's active modules and expert p's module.
        allowed_PE2 = self.allowed[i]
        masked = (
            logits_NE2.float()
            .view(P, B * T, -1)
            .masked_fill(~allowed_PE2[:, None, :], float("-inf"))
        )
        probs_NE2 = F.softmax(masked, dim=-1).view(P * B * T, -1)
        k = min(ffn.top_k, int(allowed_PE2.sum(-1).min()))
        E = self.w_in[i].shape[0] - self.n_experts
        top_NK, idx_NK = topk_keeping_base(probs_NE2, k, E)
        gates_NK = (top_NK / top_NK.sum(-1, keepdim=True)).to(x_ND.dtype)
        plan = plan_routing(idx_NK, self.w_in[i].shape[0])
        h_AF = F.gelu(ffn.backend.grouped_mm(x_ND, self.w_in[i], plan, grouped_out=True))
        y_ND = ffn.backend.grouped_mm(h_AF, self.w_out[i], plan, gates_TK=gates_NK, grouped_in=True)
        return y_ND.view(P, B, T, D)

    def hidden(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final (normalised) hidden states of every path: (P, B, T, D).

        ``cache``: incremental decoding (modelcore.decode): ``input_ids_BT`` follow the
        cached tokens; the first layer's keys/values are cached once for B rows, every
        later layer's per path (P*B rows, path-major)."""
        model = self.model
        P = self.n_paths
        x_BTD = model.embed(input_ids_BT)
        x_PBTD: torch.Tensor | None = None
        threads = nullcontext() if cache is None else decoding_threads(input_ids_BT.numel())
        with threads:
            for i, block in enumerate(model.layers):
                layer_cache = None if cache is None else cache.layer(i)
                if x_PBTD is None:
                    # Identical on every path until the first MoE layer: attention runs once.
                    a_BTD, _ = block.attn(block.ln_att(x_BTD), layer_cache)
                    x_BTD = x_BTD + a_BTD
                    x_PBTD = x_BTD.unsqueeze(0).expand(P, *x_BTD.shape)
                else:
                    B, T, D = x_PBTD.shape[1:]
                    a, _ = block.attn(block.ln_att(x_PBTD.reshape(P * B, T, D)), layer_cache)
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
    min_base_prior: float = MIN_BASE_PRIOR,
) -> torch.Tensor:
    """DEMix's cached prior: start uniform; after each sequence of target text, move the
    prior towards that sequence's final posterior, ``prior <- (1 - ema) prior + ema post``.

    With the base as a path, its prior is raised to ``min_base_prior`` if it ended below
    (the experts' shares scaled down to make room). A Bayesian mixture scores a window at
    most ``-log2 P(base)`` bits worse than the base alone, so at 0.5 no text can cost more
    than one bit per window over the base, whatever the few sequences the prior was
    estimated on said; an expert's own domain pays at most ``-log2 P(expert)`` the same
    way, and the posterior moves to it within the window.

    ``batches``: (B, T+1) token ids of the target text. Returns log prior (P,).
    """
    if not 0 < ema <= 1:
        raise ValueError("ema must be in (0, 1]")
    if not 0 <= min_base_prior < 1:
        raise ValueError("min_base_prior must be in [0, 1)")
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
    if ensemble.include_base and P > 1 and float(prior[-1]) < min_base_prior:
        prior[:-1] *= (1 - min_base_prior) / float(prior[:-1].sum())
        prior[-1] = min_base_prior
    return prior.clamp_min(1e-12).log().float()


# -- mixing in log space ------------------------------------------------------------------
def log_mix(
    logits_chunks: Iterable[torch.Tensor],
    log_w_PN: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log sum_j w_j softmax(logits_j)`` for P logit matrices (N, V); no (P, N, V) stack.

    One exp per input element and one log per output element: ``softmax(x) = e / s`` with
    ``e = exp(x)`` kept in a cache-sized block and ``s`` its row sums, so the weighted sum
    is ``sum_j (w_j / s_j) e_j`` (a per-row scale folded into one multiply-add), then one
    log. The exp is taken unshifted where that is exact enough: a row whose ``s`` is finite
    (nothing overflowed) and ``>= 1`` (an element that underflowed had a probability below
    the smallest normal float, where the result is clamped anyway); any other row block is
    redone with the usual max shift, ``exp(x - max)``.

    Given a list or tuple (all P matrices at hand), each row block of the output is built
    from the P inputs while they are in cache and written once: one read of the inputs,
    one write of the output. Given any other iterable (paths computed one at a time, as
    ``ExpertEnsemble.mixture_log_probs`` does), each path is added into one (N, V)
    accumulator as it comes. On the CPU, row blocks run on a few threads
    (``modelcore.threads.run_blocks``), each row in one call to the fused C kernel of
    ``modelcore.native`` when it is available and the logits are contiguous float32 (else
    with torch ops on cache-sized blocks). ``w_j softmax(x_j) <= 1``, so the sum cannot overflow; a
    token whose mixed probability is below the smallest normal float32 (1e-38, i.e.
    -87 nats) is clamped there instead of -inf.

    ``out``: an (N, V) float32 tensor to write the result into (contiguous, on the
    inputs' device), e.g. reused across the batches of a distillation run; a fresh
    268 MB matrix costs its page faults and zero-filling on every call.
    """
    w_PN = log_w_PN.float().exp()
    last = w_PN.shape[0] - 1
    tiny = torch.finfo(torch.float32).tiny
    with single_thread():
        if isinstance(logits_chunks, (list, tuple)):
            xs = list(logits_chunks)
            if len(xs) != last + 1:
                raise ValueError(f"expected {last + 1} logit matrices, got {len(xs)}")
            if xs and not xs[0].is_cuda:
                return _log_mix_all(xs, w_PN, tiny, out)
        result, p = _log_mix_blocks(logits_chunks, w_PN, last, tiny, out)
    if result is None or p != last:
        raise ValueError(f"expected {last + 1} logit matrices")
    return result


def _output(out: torch.Tensor | None, N: int, V: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(N, V, dtype=torch.float32, device=device)
    if out.shape != (N, V) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({N}, {V})")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, the logits on {device}")
    return out


def _block_rows(V: int, group: int) -> int:
    return max(1, _MIX_BLOCK_BYTES // (4 * V * group))


def _log_mix_all(
    xs: list[torch.Tensor], w_PN: torch.Tensor, tiny: float, out: torch.Tensor | None
) -> torch.Tensor:
    """All P inputs at hand (CPU): each output row block from the P inputs' blocks."""
    N, V = xs[0].shape
    if any(x.shape != (N, V) for x in xs) or w_PN.shape[1] != N:
        raise ValueError("logit matrices and weights must agree on (N, V)")
    out = _output(out, N, V, xs[0].device)
    _mix_group(xs, w_PN.t().contiguous(), out, accumulate=False, finish=True, tiny=tiny)
    return out


def _mix_group(
    xs: Sequence[torch.Tensor],
    w_NG: torch.Tensor,
    out: torch.Tensor,
    *,
    accumulate: bool,
    finish: bool,
    tiny: float,
) -> None:
    """``_mix_rows`` over every row block of a group of paths, on ``default_workers()``
    threads (each with its own scratch buffers); with the native kernel
    (``modelcore.native``) when the inputs are contiguous float32 rows."""
    N, V = xs[0].shape
    kernel = native.logmix()
    if kernel is not None and all(kernel.accepts(x) for x in xs) and kernel.accepts(out):
        mixer = kernel.bind(
            list(xs), w_NG.float().contiguous(), out, accumulate=accumulate, finish=finish
        )
        rows = _NATIVE_BLOCK_ROWS

        def native_work(i: int, scratch: torch.Tensor) -> None:
            mixer.run(i * rows, min(N, (i + 1) * rows), scratch)

        run_blocks(-(-N // rows), native_work, mixer.scratch, default_workers())
        return
    rows = _block_rows(V, len(xs))

    def work(i: int, scratch: tuple[torch.Tensor, torch.Tensor]) -> None:
        r0 = i * rows
        block = (r0, min(N, r0 + rows))
        _mix_rows(xs, w_NG, out, block, scratch, accumulate=accumulate, finish=finish, tiny=tiny)

    run_blocks(-(-N // rows), work, lambda: _scratch(rows, len(xs), V), default_workers())


def _mix_rows(
    xs: Sequence[torch.Tensor],
    w_NG: torch.Tensor,
    out: torch.Tensor,
    block: tuple[int, int],
    scratch: tuple[torch.Tensor, torch.Tensor],
    *,
    accumulate: bool,
    finish: bool,
    tiny: float,
) -> None:
    """``out[r0:r1] (+)= sum_g (w_g / s_g) exp(x_g)`` over a group of G paths' row blocks
    (``w_NG``: their weights, rows by path), then (``finish``) clamp and log.

    ``scratch``: this thread's (rows, G, V) buffer for the exps and (rows, V) buffer for
    the weighted sum, so that only the final log writes the output's (DRAM) rows.
    """
    r0, r1 = block
    e_RGV = scratch[0][: r1 - r0]
    o_RV = out[r0:r1]
    sum_RV = scratch[1][: r1 - r0] if finish and not accumulate else o_RV
    blocks = [x[r0:r1] if x.dtype == torch.float32 else x[r0:r1].float() for x in xs]
    for g, x in enumerate(blocks):
        torch.exp(x, out=e_RGV[:, g])
    s_RG = e_RGV.sum(-1)
    lo, hi = torch.aminmax(s_RG)
    # NaN fails both comparisons, so it too takes the shifted path (and stays NaN there).
    if not (float(lo) >= 1.0 and float(hi) <= _FLOAT32_MAX):
        for g, x in enumerate(blocks):
            torch.sub(x, x.amax(-1, keepdim=True), out=e_RGV[:, g])
        e_RGV.exp_()
        s_RG = e_RGV.sum(-1)
    scale_RG = w_NG[r0:r1] / s_RG
    if e_RGV.shape[1] == 1:
        if accumulate:
            sum_RV.addcmul_(e_RGV[:, 0], scale_RG)
        else:
            torch.mul(e_RGV[:, 0], scale_RG, out=sum_RV)
    elif accumulate:
        sum_RV.unsqueeze(1).baddbmm_(scale_RG.unsqueeze(1), e_RGV)
    else:
        torch.bmm(scale_RG.unsqueeze(1), e_RGV, out=sum_RV.unsqueeze(1))
    if finish:
        torch.log(sum_RV.clamp_min_(tiny), out=o_RV)


def _scratch(rows: int, group: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(rows, group, V), torch.empty(rows, V)


def _log_mix_blocks(
    logits_chunks: Iterable[torch.Tensor],
    w_PN: torch.Tensor,
    last: int,
    tiny: float,
    given: torch.Tensor | None,
) -> tuple[torch.Tensor | None, int]:
    """Paths one at a time, each added into one (N, V) accumulator (finished at the last)."""
    out: torch.Tensor | None = None
    p = -1
    for p, chunk_NV in enumerate(logits_chunks):
        if p > last:
            raise ValueError(f"more logit matrices than weights ({last + 1})")
        N, V = chunk_NV.shape
        if out is not None and out.shape != (N, V):
            raise ValueError("logit matrices must all have the same shape")
        if out is None:
            out = _output(given, N, V, chunk_NV.device)
        if chunk_NV.is_cuda:
            # On a GPU one launch per op over the whole matrix (blocks would only add
            # launches).
            x_NV = chunk_NV.float()
            probs = torch.softmax(x_NV, dim=-1)
            if p == 0:
                torch.mul(probs, w_PN[p, :, None], out=out)
            else:
                out.addcmul_(probs, w_PN[p, :, None])
            if p == last:
                out.clamp_min_(tiny).log_()
            continue
        _mix_group([chunk_NV], w_PN[p, :, None], out, accumulate=p > 0, finish=p == last, tiny=tiny)
    return out, p
