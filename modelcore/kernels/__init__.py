"""Kernels of modelcore: the grouped sparse MoE matmul and stick-breaking attention.

Modules never call an implementation directly: they ask ``select_backend(device)`` once,
at construction, and keep the returned backend. On CUDA (with Triton importable) that is
the Triton backend; everywhere else the CPU backend: the MoE reference and the blockwise
stick-breaking path (``sb_blockwise``). ``prefer="reference"`` gives the pure PyTorch
references, the test oracle. All backends implement exactly the same contract (see
``moe_ref`` and ``sb_ref``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from modelcore.kernels.moe_ref import RoutingPlan, grouped_mm_ref, plan_routing
from modelcore.kernels.sb_blockwise import stickbreaking_attention_blockwise
from modelcore.kernels.sb_ref import stickbreaking_attention_ref

__all__ = [
    "KernelBackend",
    "RoutingPlan",
    "cpu_backend",
    "plan_routing",
    "reference_backend",
    "select_backend",
]


class GroupedMM(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        w_EDH: torch.Tensor,
        plan: RoutingPlan,
        *,
        gates_TK: torch.Tensor | None = None,
        grouped_in: bool = False,
        grouped_out: bool = False,
    ) -> torch.Tensor: ...


class StickBreaking(Protocol):
    def __call__(
        self,
        q_BHTD: torch.Tensor,
        k_BHTD: torch.Tensor,
        v_BHTD: torch.Tensor,
        *,
        scale: float | None = None,
        include_diagonal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class KernelBackend:
    name: str
    grouped_mm: GroupedMM
    stickbreaking: StickBreaking


def reference_backend() -> KernelBackend:
    return KernelBackend("reference", grouped_mm_ref, stickbreaking_attention_ref)


def cpu_backend() -> KernelBackend:
    """The MoE reference and blockwise stick-breaking: what CPU modules run (docs/kernels.md,
    "CPU path": the blockwise path beats the reference at every length measured)."""
    return KernelBackend("cpu", grouped_mm_ref, stickbreaking_attention_blockwise)


def select_backend(
    device: torch.device | str | None = None, *, prefer: str = "auto"
) -> KernelBackend:
    """Pick the implementation for modules living on ``device``.

    ``prefer``: ``"auto"`` (Triton on CUDA, the CPU backend elsewhere), ``"reference"``,
    ``"cpu"``, or ``"triton"`` (raises if Triton or CUDA is unavailable, unless
    TRITON_INTERPRET is set).
    """
    if prefer == "reference":
        return reference_backend()
    if prefer == "cpu":
        return cpu_backend()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if prefer == "auto" and dev.type != "cuda":
        return cpu_backend()
    try:
        from modelcore.kernels.triton_backend import triton_backend
    except ImportError:
        if prefer == "triton":
            raise
        return cpu_backend()
    return triton_backend()
