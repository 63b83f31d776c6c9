"""EMoE: split a dense FFN into modules (Qiu et al. 2023, "Emergent Modularity in
Pre-trained Transformers"; clustering as in MoEfication, Zhang et al. 2022).

Shape legend: T tokens, D model dim, F_total dense hidden width, E modules,
F = F_total / E neurons per module, K top-k.

A dense FFN ``y = act(x @ w_in + b_in) @ w_out + b_out`` is a sum over its F_total neurons;
neuron j has a *key* (column j of ``w_in``) and a value (row j of ``w_out``). EMoE groups
neurons whose keys point the same way into E equal-size modules by **balanced k-means**
on the L2-normalised keys, and gates with **avg-k**: module e's score for token x is the
mean of its neurons' key pre-activations, ``mean_{j in e} (x . k_j + b_j)``, which is
``x . mean_k_e + mean_b_e``. The top-k modules by score run; their outputs are summed
unweighted (gate 1 for a chosen module, 0 otherwise: the gate only selects). With top-k =
E every neuron runs, and the split FFN computes exactly the dense FFN.

``EMoEFeedForward`` has the forward protocol of ``moe.MoEFeedForward`` (returns the
output and a ``LayerRouting``), so ``apply_emoe`` can swap it into a ``ModularLM`` built
with one FFN module per layer (a dense model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.kernels import KernelBackend, plan_routing
from modelcore.router import LayerRouting


@dataclass(frozen=True)
class EMoEWeights:
    """The split FFN; field names carry their shapes (hence the N815 waivers)."""

    w_in_EDF: torch.Tensor  # noqa: N815
    w_out_EFD: torch.Tensor  # noqa: N815
    b_in_EF: torch.Tensor | None  # noqa: N815
    # int64: the dense neuron index behind each module slot
    neurons_EF: torch.Tensor  # noqa: N815


def balanced_kmeans(
    x_ND: torch.Tensor, n_clusters: int, *, seed: int, iters: int = 30
) -> torch.Tensor:
    """Cluster N unit vectors into equal-size groups by cosine similarity.

    Assignment step: all (point, cluster) pairs by similarity, best first; a point takes
    the first cluster that still has room (greedy balanced assignment, exact capacity N/E).
    Update step: centroid = normalised mean of its members. Returns labels (N,), int64.
    """
    N = x_ND.shape[0]
    if N % n_clusters:
        raise ValueError(f"{N} points do not split into {n_clusters} equal clusters")
    cap = N // n_clusters
    x = F.normalize(x_ND.double(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centroids_ED = x[torch.randperm(N, generator=gen)[:n_clusters]].clone()
    labels = torch.full((N,), -1, dtype=torch.long)
    for _ in range(iters):
        sim_NE = x @ centroids_ED.T
        order = torch.argsort(sim_NE.reshape(-1), descending=True, stable=True).tolist()
        new = torch.full((N,), -1, dtype=torch.long)
        room = [cap] * n_clusters
        left = N
        for flat in order:
            n, e = divmod(flat, n_clusters)
            if new[n] < 0 and room[e] > 0:
                new[n] = e
                room[e] -= 1
                left -= 1
                if left == 0:
                    break
        if torch.equal(new, labels):
            break
        labels = new
        for e in range(n_clusters):
            centroids_ED[e] = F.normalize(x[labels == e].mean(0), dim=0)
    return labels


def emoe_split(
    dense_ffn_weights: tuple[torch.Tensor, torch.Tensor]
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    n_modules: int,
    seed: int,
) -> EMoEWeights:
    """Split ``(w_in_DF, w_out_FD[, b_in_F])`` into ``n_modules`` modules by key clusters."""
    w_in_DF, w_out_FD = dense_ffn_weights[0], dense_ffn_weights[1]
    b_in_F = dense_ffn_weights[2] if len(dense_ffn_weights) > 2 else None
    D, F_total = w_in_DF.shape
    if tuple(w_out_FD.shape) != (F_total, D):
        raise ValueError(f"w_out shape {tuple(w_out_FD.shape)} != ({F_total}, {D})")
    labels_F = balanced_kmeans(w_in_DF.detach().T.cpu(), n_modules, seed=seed)
    # Stable sort keeps neurons in dense order within a module (reproducible layout).
    neurons_EF = torch.argsort(labels_F, stable=True).view(n_modules, -1).to(w_in_DF.device)
    w_in_EDF = w_in_DF.detach()[:, neurons_EF].permute(1, 0, 2).contiguous()
    w_out_EFD = w_out_FD.detach()[neurons_EF].contiguous()
    b_in_EF = None if b_in_F is None else b_in_F.detach()[neurons_EF].contiguous()
    return EMoEWeights(w_in_EDF, w_out_EFD, b_in_EF, neurons_EF)


class EMoEFeedForward(nn.Module):
    """Top-k of E key-cluster modules, selected by avg-k scores, gate 1 per chosen module."""

    def __init__(self, weights: EMoEWeights, top_k: int, backend: KernelBackend) -> None:
        super().__init__()
        E = weights.w_in_EDF.shape[0]
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be in 1..{E}")
        self.backend = backend
        self.top_k = top_k
        self.w_in_EDF = nn.Parameter(weights.w_in_EDF.clone())
        self.w_out_EFD = nn.Parameter(weights.w_out_EFD.clone())
        b = weights.b_in_EF
        self.b_in_EF = None if b is None else nn.Parameter(b.clone())
        self.register_buffer("active_E", torch.ones(E, dtype=torch.bool), persistent=False)

    @property
    def n_modules(self) -> int:
        return int(self.w_in_EDF.shape[0])

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """avg-k: mean key pre-activation of each module, ``x . mean_k_e (+ mean_b_e)``."""
        scores_TE = x_TD @ self.w_in_EDF.mean(-1).T
        return scores_TE if self.b_in_EF is None else scores_TE + self.b_in_EF.mean(-1)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        scores_TE = self.scores(x_TD)
        idx_TK = scores_TE.topk(self.top_k, dim=-1).indices
        gates_TK = torch.ones(idx_TK.shape, dtype=x_TD.dtype, device=x_TD.device)
        plan = plan_routing(idx_TK, self.n_modules)
        h_AF = self.backend.grouped_mm(x_TD, self.w_in_EDF, plan, grouped_out=True)
        if self.b_in_EF is not None:
            h_AF = h_AF + self.b_in_EF[plan.sorted_expert_A]
        y_TD = self.backend.grouped_mm(
            F.gelu(h_AF), self.w_out_EFD, plan, gates_TK=gates_TK, grouped_in=True
        )
        probs_TE = F.softmax(scores_TE.float(), dim=-1)  # for statistics and aux losses only
        return y_TD, LayerRouting(scores_TE, probs_TE, idx_TK, gates_TK, self.active_E)


def apply_emoe(model: nn.Module, n_modules: int, top_k: int, *, seed: int = 0) -> None:
    """Replace every single-module FFN of a ``ModularLM`` (a dense model) by its EMoE split.

    A one-module layer routes every token to its module with gate 1, so it *is* a dense
    GELU FFN ``gelu(x @ w_in) @ w_out``; the split keeps that function at top-k = E.
    """
    for i, block in enumerate(model.layers):  # type: ignore[union-attr]
        ffn = block.ffn
        if getattr(ffn, "n_modules", None) != 1 or not hasattr(ffn, "weights"):
            raise ValueError(f"layer {i} is not a dense (single-module) FFN")
        w_in_EDF, w_out_EFD = ffn.weights()
        weights = emoe_split((w_in_EDF[0], w_out_EFD[0]), n_modules, seed + i)
        block.ffn = EMoEFeedForward(weights, top_k, model.backend).to(w_in_EDF.device)
