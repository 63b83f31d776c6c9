"""Timing helpers shared by the GPU benchmarks (each script measures its baselines in the
same process and prints ratios; nothing here asserts a time)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, reps: int = 10) -> float:
    """Mean seconds per call over ``reps`` calls after ``warmup`` calls (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def hbm_bandwidth(device: torch.device, n_bytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * src.numel() / t


def header(title: str, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {title}")
    print(f"# device: {name}; torch {torch.__version__}; {now}")


def row(cells: list[Any], widths: list[int]) -> str:
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def fmt_x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"
