"""The MLP router of ModuleFormer (Shen et al. 2023, section 3.1) and top-k routing.

Shape legend: T tokens, D model dim, R router hidden dim, E experts (modules), K top-k.

``logits_TE = tanh(x_TD @ W_DR + b_R) @ rows_ER.T``: a small MLP whose output layer's rows
are the experts' embeddings. Adding a module appends one row (ModuleFormer section 4.3:
the new module's expert embedding is what insertion trains), so the rows are stored as a
list of blocks: block 0 holds the base modules, each inserted module gets its own
``Parameter``; an optimizer built over the new blocks never touches the old ones.

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

    @property
    def n_experts(self) -> int:
        return sum(block_sizes(self.rows))

    def expert_rows(self) -> torch.Tensor:
        return cat_blocks(self.rows)

    def append_row(self, row_R: torch.Tensor) -> None:
        ref = self.rows[0]
        row = row_R.detach().to(device=ref.device, dtype=ref.dtype).reshape(1, -1).clone()
        self.rows.append(nn.Parameter(row))

    def remove_row(self, idx: int) -> None:
        self.rows = drop_row(self.rows, idx)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TR = torch.tanh(self.proj(x_TD))
        return h_TR @ self.expert_rows().t()


def route(logits_TE: torch.Tensor, active_E: torch.Tensor, k: int) -> LayerRouting:
    """Softmax over active modules, top-k, gates renormalised over the k chosen."""
    # At least fp32 for the softmax (bf16 logits would round the gates); fp64 stays fp64.
    ctype = torch.promote_types(logits_TE.dtype, torch.float32)
    masked_TE = logits_TE.to(ctype).masked_fill(~active_E, float("-inf"))
    probs_TE = F.softmax(masked_TE, dim=-1)
    top_TK, idx_TK = probs_TE.topk(k, dim=-1)
    gates_TK = top_TK / top_TK.sum(-1, keepdim=True)
    return LayerRouting(logits_TE, probs_TE, idx_TK, gates_TK.to(logits_TE.dtype), active_E)
