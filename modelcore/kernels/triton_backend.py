"""The Triton implementation of ``KernelBackend`` (chosen by ``select_backend`` on CUDA)."""

from __future__ import annotations

import torch

from modelcore.kernels import KernelBackend
from modelcore.kernels._triton_util import interpreting
from modelcore.kernels.moe_triton import grouped_mm_triton
from modelcore.kernels.sb_triton import stickbreaking_attention_triton


def triton_backend() -> KernelBackend:
    """Grouped MoE matmul and stick-breaking attention on Triton.

    Needs a CUDA device, or ``TRITON_INTERPRET=1`` (then the kernels run on CPU tensors,
    slowly: that mode exists for the tests).
    """
    if not (torch.cuda.is_available() or interpreting()):
        raise RuntimeError("the Triton backend needs CUDA (or TRITON_INTERPRET=1 for CPU tests)")
    return KernelBackend("triton", grouped_mm_triton, stickbreaking_attention_triton)
