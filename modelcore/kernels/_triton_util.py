"""Plumbing shared by the Triton kernels: lazy JIT, interpreter compatibility, dtype checks.

Why lazy JIT: ``triton.jit`` decides at *decoration* time whether a kernel is compiled or
interpreted (it reads ``TRITON_INTERPRET`` then). Decorating at import would freeze that
choice into whichever process imported us first (a test of another package, say), so the
kernel modules keep plain Python functions and ``jit(fn)`` wraps them on first launch,
once per (function, mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return bool(triton.knobs.runtime.interpret)


@functools.cache
def _jit_cached(fn: Callable[..., Any], interpret: bool) -> Any:
    del interpret  # part of the cache key only: triton.jit reads the mode itself
    return triton.jit(fn)


def jit(fn: Callable[..., Any]) -> Any:
    """The launchable kernel for ``fn`` in the current mode (compiled or interpreted)."""
    mode = interpreting()
    if mode:
        _patch_interpreter_index()
    return _jit_cached(fn, mode)


@functools.cache
def _patch_interpreter_index() -> None:
    """Let the interpreter use tensors as ``range`` bounds under NumPy >= 2.4.

    Triton 3.6's interpreter keeps scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy 2.4 turned into a TypeError for arrays with ndim > 0: every
    ``for p in range(start, end, BLOCK)`` with a runtime bound then fails on the CPU, while
    the compiled kernel is fine. We wrap the interpreter's tensor patch to index through
    ``.reshape(-1)[0]``; nothing changes where NumPy still accepts the old conversion.
    """
    try:
        int(np.array([1]))  # type: ignore[call-overload]
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def check_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU tensors."""
    want_cuda = not interpreting()
    for t in tensors:
        if (t.device.type == "cuda") != want_cuda:
            where = "CUDA" if want_cuda else "CPU (TRITON_INTERPRET=1)"
            raise ValueError(f"Triton kernels here expect {where} tensors, got {t.device}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full IEEE precision (tf32 would cost ~1e-3 relative error,
    ten times the 1e-4 the tests demand); 16-bit inputs use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"
