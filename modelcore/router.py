"""The MLP router of ModuleFormer (Shen et al. 2023, section 3.1) and top-k routing.

Shape legend: T tokens, D model dim, R router hidden dim, E experts (modules), K top-k.

``logits_TE = tanh(x_TD @ W_DR + b_R) @ rows_ER.T + bias_E``: a small MLP whose output
layer's rows are the experts' embeddings. Adding a module appends one row (ModuleFormer
section 4.3: the new module's expert embedding is what insertion trains), so the rows are
stored as a list of blocks: block 0 holds the base modules, each inserted module gets its
own ``Parameter``; an optimizer built over the new blocks never touches the old ones.

``bias_E`` is zero for the base's modules and a calibrated scalar for each inserted one
(``biases``: one entry per inserted block, parallel to ``rows[1:]``). A base model's
state dict therefore has no bias at all (its files are unchanged), and an inserted
module's bias is what keeps it in its lane: set after training so that on general text
the module enters the top-k of only a chosen share of tokens (modelcore.lanes;
docs/composition.md, "Do no harm").

Routing uses a softmax over the *active* modules only (inactive ones get probability 0
and are never selected) and renormalises the top-k probabilities into gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerRouting:
    """What one router decided for T tokens (kept with gradients, for the aux losses).

    Field names carry their shapes (the shared modelcore API), hence the N815 waivers.
    """

    # raw router logits (for the z-loss); inactive modules keep their raw value
    logits_TE: torch.Tensor  # noqa: N815
    # softmax over the active modules; exactly 0 for inactive ones
    probs_TE: torch.Tensor  # noqa: N815
    # int64 ids of the chosen modules, and their renormalised gates (rows sum to 1)
    topk_idx_TK: torch.Tensor  # noqa: N815
    gates_TK: torch.Tensor  # noqa: N815
    # bool: which modules could be routed to
    active_E: torch.Tensor  # noqa: N815


def cat_blocks(blocks: nn.ParameterList) -> torch.Tensor:
    """Stack per-block parameters along dim 0; no copy for the common single-block case."""
    return blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=0)


def block_sizes(blocks: nn.ParameterList) -> list[int]:
    return [int(b.shape[0]) for b in blocks]


def drop_row(blocks: nn.ParameterList, idx: int) -> nn.ParameterList:
    """Return the blocks without global row ``idx``; untouched blocks keep their Parameter."""
    out: list[nn.Parameter] = []
    start = 0
    for block in blocks:
        n = int(block.shape[0])
        if start <= idx < start + n:
            local = idx - start
            if n > 1:
                kept = torch.cat([block.data[:local], block.data[local + 1 :]], dim=0)
                out.append(nn.Parameter(kept, requires_grad=block.requires_grad))
        else:
            out.append(block)
        start += n
    if start <= idx or idx < 0:
        raise IndexError(f"module {idx} out of range (have {start})")
    return nn.ParameterList(out)


class MLPRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int,
        *,
        init_std: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, hidden, device=device)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        rows_ER = torch.randn(n_experts, hidden, device=device) * init_std
        self.rows = nn.ParameterList([nn.Parameter(rows_ER)])
        self.biases = nn.ParameterList()  # one (E_b,) entry per inserted block rows[1:]

    @property
    def n_experts(self) -> int:
        return sum(block_sizes(self.rows))

    def expert_rows(self) -> torch.Tensor:
        return cat_blocks(self.rows)

    def expert_biases(self) -> torch.Tensor | None:
        """``bias_E`` (zeros for the base's modules), or None when nothing is inserted."""
        if len(self.biases) == 0:
            return None
        base = self.rows[0]
        zeros = base.new_zeros(int(base.shape[0]))
        return torch.cat([zeros, *self.biases])

    def bias_of_block(self, block: int) -> nn.Parameter:
        if block < 1:
            raise ValueError("the base's modules have no bias (it is zero)")
        return self.biases[block - 1]

    def append_row(self, row_R: torch.Tensor, bias: float | torch.Tensor = 0.0) -> None:
        ref = self.rows[0]
        row = row_R.detach().to(device=ref.device, dtype=ref.dtype).reshape(1, -1).clone()
        self.rows.append(nn.Parameter(row))
        b = torch.as_tensor(bias, dtype=ref.dtype).detach().to(ref.device).reshape(1).clone()
        self.biases.append(nn.Parameter(b))

    def remove_row(self, idx: int) -> None:
        sizes = block_sizes(self.rows)
        if 0 <= idx < sizes[0] and sizes[0] == 1 and len(sizes) > 1:
            raise ValueError("cannot remove the last base module while inserted ones remain")
        self.rows = drop_row(self.rows, idx)
        if idx >= sizes[0]:
            # The same global row, counted among the inserted blocks.
            self.biases = drop_row(self.biases, idx - sizes[0])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TR = torch.tanh(self.proj(x_TD))
        logits_TE = h_TR @ self.expert_rows().t()
        bias_E = self.expert_biases()
        return logits_TE if bias_E is None else logits_TE + bias_E


def topk_keeping_base(
    probs_TE: torch.Tensor, k: int, n_base: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs_TE.topk(k)``, except that with inserted modules (``n_base``: how many of
    the E modules are the base's, the first ones) each token keeps its best base module
    in the first slot and the inserted modules compete for the other k - 1 only.

    An inserted module can then replace at most the k-1 weaker of a token's base
    choices, never the one the base relies on most; with two experts that both fire on
    the same token of general text (k = 2), one base module is always left. Without
    inserted modules (``n_base`` None or E) this is plain top-k, bit for bit."""
    E = probs_TE.shape[-1]
    if n_base is None or n_base >= E or k < 2:
        return probs_TE.topk(k, dim=-1)
    first_T1, first_idx_T1 = probs_TE[:, :n_base].max(dim=-1, keepdim=True)
    rest_TE = probs_TE.scatter(-1, first_idx_T1, float("-inf"))
    rest_TK, rest_idx_TK = rest_TE.topk(k - 1, dim=-1)
    return torch.cat([first_T1, rest_TK], dim=-1), torch.cat([first_idx_T1, rest_idx_TK], dim=-1)


def route(
    logits_TE: torch.Tensor, active_E: torch.Tensor, k: int, *, n_base: int | None = None
) -> LayerRouting:
    """Softmax over active modules, top-k, gates renormalised over the k chosen.

    ``n_base``: the number of base modules when inserted ones follow them
    (``topk_keeping_base``)."""
    # At least fp32 for the softmax (bf16 logits would round the gates); fp64 stays fp64.
    ctype = torch.promote_types(logits_TE.dtype, torch.float32)
    masked_TE = logits_TE.to(ctype).masked_fill(~active_E, float("-inf"))
    probs_TE = F.softmax(masked_TE, dim=-1)
    top_TK, idx_TK = topk_keeping_base(probs_TE, k, n_base)
    gates_TK = top_TK / top_TK.sum(-1, keepdim=True)
    return LayerRouting(logits_TE, probs_TE, idx_TK, gates_TK.to(logits_TE.dtype), active_E)
