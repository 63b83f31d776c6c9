"""Sparse MoE feed-forward layer: E modules, top-k of them per token, an MLP router.

Shape legend: T tokens, D model dim, F hidden dim of one module, E modules, K top-k,
A = T*K assignments.

Each module is a 2-layer MLP ``gelu(x @ w_in_DF) @ w_out_FD`` without biases (as in
ModuleFormer; GELU because the released MoLM models use ``gelu_new`` and because EMoE
splits a GELU FFN exactly, neuron by neuron). The layer computes, for every token,
``sum_k gate_k * module_{idx_k}(x)`` through the kernel backend's grouped matmul: the
routing plan sorts the T*K assignments by module, the first matmul gathers tokens into
module-sorted rows, the second scatters them back and sums with the gates (no padding,
no capacity, no dropped tokens).

Storage: ``w_in`` / ``w_out`` are lists of stacked blocks ``(E_b, D, F)`` / ``(E_b, F, D)``.
Block 0 holds the base modules; every inserted module is a block of its own, so freezing
for insertion is ``requires_grad`` on whole Parameters (old weights stay bit-identical
under any optimizer, weight decay included), and extracting a module is a slice. A layer
with a single block runs without any concatenation.

``active_mask_E`` (a persistent 0/1 buffer; ``active_E`` is its cached bool view) marks
pruned or disabled modules: they get router probability 0 and are never routed.
``dense = True`` routes every token to every active module (top-k = number of active
modules), for the dense phase of gradual modularization.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.config import ModelConfig
from modelcore.decode import GATHER_MAX_ASSIGNMENTS, gathered_mm
from modelcore.kernels import KernelBackend, plan_routing
from modelcore.router import LayerRouting, MLPRouter, block_sizes, cat_blocks, drop_row, route


class MoEFeedForward(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: KernelBackend,
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        E, D, F_ = config.ffn_experts, config.d_model, config.d_ffn
        self.backend = backend
        self.top_k = config.ffn_top_k
        self.dense = False
        std = config.init_std
        # Residual-branch output scaled by 1/sqrt(2L) (GPT-2), so depth does not blow up.
        self.out_std = std / math.sqrt(2 * config.n_layers)
        self.router = MLPRouter(D, config.router_hidden, E, init_std=std, device=device)
        self.w_in = nn.ParameterList([nn.Parameter(torch.randn(E, D, F_, device=device) * std)])
        self.w_out = nn.ParameterList(
            [nn.Parameter(torch.randn(E, F_, D, device=device) * self.out_std)]
        )
        # Stored as 0/1 floats (not bool) so model.safetensors holds float tensors only.
        self.register_buffer("active_mask_E", torch.ones(E, device=device))
        self.active_E = torch.ones(E, dtype=torch.bool, device=device)
        self._n_active = E
        # A loaded state dict may carry a pruned mask: refresh the cached count after it.
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._refresh_active())

    # -- module bookkeeping -------------------------------------------------------------
    @property
    def n_modules(self) -> int:
        return sum(block_sizes(self.w_in))

    def _refresh_active(self) -> None:
        # Bool view cached once per change, so forward does no conversion or host sync.
        self.active_E = self.active_mask_E > 0.5
        self._n_active = int(self.active_E.sum().item())

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to()/.cuda() move the buffer; the cached bool view must follow it.
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_active()
        return out

    def set_active(self, active_E: torch.Tensor) -> None:
        mask = torch.as_tensor(active_E, dtype=torch.bool, device=self.active_mask_E.device)
        if mask.shape != (self.n_modules,):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({self.n_modules},)")
        if not bool(mask.any()):
            raise ValueError("at least one module must stay active")
        self.active_mask_E = mask.to(self.active_mask_E.dtype)
        self._refresh_active()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All modules stacked: ``(w_in_EDF, w_out_EFD)``."""
        return cat_blocks(self.w_in), cat_blocks(self.w_out)

    def block_of(self, idx: int) -> int:
        """Index of the block holding module ``idx``."""
        start = 0
        for b, n in enumerate(block_sizes(self.w_in)):
            if start <= idx < start + n:
                return b
            start += n
        raise IndexError(f"module {idx} out of range (have {start})")

    def append_module(
        self,
        w_in_DF: torch.Tensor,
        w_out_FD: torch.Tensor,
        row_R: torch.Tensor,
        bias: float | torch.Tensor = 0.0,
    ) -> int:
        """Add one module as a new block (active), with its router row and router bias;
        returns its index."""
        ref = self.w_in[0]
        if tuple(w_in_DF.shape) != tuple(ref.shape[1:]):
            raise ValueError(f"w_in shape {tuple(w_in_DF.shape)} != {tuple(ref.shape[1:])}")
        if tuple(w_out_FD.shape) != tuple(self.w_out[0].shape[1:]):
            raise ValueError(f"w_out shape {tuple(w_out_FD.shape)} mismatch")
        like = {"device": ref.device, "dtype": ref.dtype}
        self.w_in.append(nn.Parameter(w_in_DF.detach().to(**like).clone().unsqueeze(0)))
        self.w_out.append(nn.Parameter(w_out_FD.detach().to(**like).clone().unsqueeze(0)))
        self.router.append_row(row_R, bias)
        one = self.active_mask_E.new_ones(1)
        self.active_mask_E = torch.cat([self.active_mask_E, one])
        self._refresh_active()
        return self.n_modules - 1

    def remove_module(self, idx: int) -> None:
        if self.n_modules == 1:
            raise ValueError("cannot remove the last module of a layer")
        self.w_in = drop_row(self.w_in, idx)
        self.w_out = drop_row(self.w_out, idx)
        self.router.remove_row(idx)
        keep = torch.ones(self.active_mask_E.shape[0], dtype=torch.bool)
        keep[idx] = False
        self.active_mask_E = self.active_mask_E[keep.to(self.active_mask_E.device)]
        if not bool((self.active_mask_E > 0.5).any()):
            self.active_mask_E = torch.ones_like(self.active_mask_E)
        self._refresh_active()

    def consolidated(self) -> dict[str, torch.Tensor]:
        """Weights as one block each (state-dict names of a freshly built layer).

        A base has no router biases: inserted modules become base modules here only if
        theirs are zero (a calibrated bias would otherwise be dropped silently)."""
        bias_E = self.router.expert_biases()
        if bias_E is not None and bool((bias_E != 0).any()):
            raise ValueError(
                "inserted modules with a non-zero router bias cannot be saved as base modules"
            )
        w_in, w_out = self.weights()
        return {
            "w_in.0": w_in.detach(),
            "w_out.0": w_out.detach(),
            "router.proj.weight": self.router.proj.weight.detach(),
            "router.proj.bias": self.router.proj.bias.detach(),
            "router.rows.0": self.router.expert_rows().detach(),
            "active_mask_E": self.active_mask_E.detach(),
        }

    # -- forward ------------------------------------------------------------------------
    def forward(
        self, x_TD: torch.Tensor, *, decoding: bool = False
    ) -> tuple[torch.Tensor, LayerRouting]:
        """``decoding``: the tokens are a few new ones of incremental decoding; up to
        ``decode.GATHER_MAX_ASSIGNMENTS`` assignments run through ``decode.gathered_mm``."""
        k = self._n_active if self.dense else min(self.top_k, self._n_active)
        sizes = block_sizes(self.w_in)
        # With inserted modules a token's best base module keeps its slot (router.py).
        n_base = sizes[0] if len(sizes) > 1 and not self.dense else None
        routing = route(self.router(x_TD), self.active_E, k, n_base=n_base)
        w_in_EDF, w_out_EFD = self.weights()
        if decoding and x_TD.shape[0] * k <= GATHER_MAX_ASSIGNMENTS:
            idx_TK = routing.topk_idx_TK
            h_AF = F.gelu(gathered_mm(x_TD, w_in_EDF, idx_TK))
            y_TD = gathered_mm(
                h_AF, w_out_EFD, idx_TK, gates_TK=routing.gates_TK, per_assignment=True
            )
            return y_TD, routing
        plan = plan_routing(routing.topk_idx_TK, self.n_modules)
        h_AF = self.backend.grouped_mm(x_TD, w_in_EDF, plan, grouped_out=True)
        h_AF = F.gelu(h_AF)
        y_TD = self.backend.grouped_mm(
            h_AF, w_out_EFD, plan, gates_TK=routing.gates_TK, grouped_in=True
        )
        return y_TD, routing
