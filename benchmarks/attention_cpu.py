"""CPU benchmark of stick-breaking attention: the blockwise path vs the reference vs SDPA.

Shapes (issue 19): B=4, H in {2, 8}, D in {48, 128}, T = 512 .. 4096, fp32. Per shape,
forward (no autograd) and forward + backward of each path, all in this process:

* ref: ``sb_ref.stickbreaking_attention_ref`` (several T x T fp32 tensors per head;
  skipped, "n/a", where those would pass ``--ref-gib``);
* blockwise: ``sb_blockwise.stickbreaking_attention_blockwise`` (what the CPU backend runs);
* sdpa: ``F.scaled_dot_product_attention(is_causal=True)``, softmax attention of the
  same shape, the baseline.

Every repetition runs every path once, back to back; each ratio is the median over
repetitions of (blockwise time / sdpa time) within one repetition, so a neighbour that
slows the machine slows both sides of a ratio. Goals (issue 19): forward <= 2x SDPA,
forward + backward <= 3x. Nothing here asserts a time.

Run: .venv/bin/python benchmarks/attention_cpu.py [--quick] [--reps 3] [--threads 2]
     [--block 128] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from modelcore.kernels.sb_blockwise import (
    KEY_CHUNK,
    QUERY_BLOCK,
    stickbreaking_attention_blockwise,
)
from modelcore.kernels.sb_ref import stickbreaking_attention_ref


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Stick-breaking attention on the CPU: blockwise vs reference vs causal\n"
        "SDPA, forward and forward+backward, with the ratios (what is timed: this\n"
        'file\'s docstring; numbers: docs/kernels.md, "CPU path").',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="T in {512, 1024}, two head shapes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--heads", type=str, nargs="*", default=None, metavar="HxD",
                    help="head count x head dim pairs, e.g. 2x48 8x128")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=QUERY_BLOCK, help="queries per block")
    ap.add_argument("--chunk", type=int, default=KEY_CHUNK, help="keys per chunk")
    ap.add_argument("--ref-gib", type=float, default=3.0, help="skip the reference above")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _bench import fmt_ms, fmt_x, header, row

    lengths = args.lengths or ([512, 1024] if args.quick else [512, 1024, 2048, 4096])
    heads = [tuple(int(x) for x in hd.split("x")) for hd in (args.heads or ["2x48", "8x128"])]
    header(
        f"Stick-breaking attention on the CPU: B={args.batch}, fp32, {args.threads} threads, "
        f"blockwise {args.block} queries x {args.chunk} keys; times are medians (ms)",
        torch.device("cpu"),
    )
    print(f"# load average (1 min) at start: {os.getloadavg()[0]:.2f}")
    widths = [2, 3, 5, 9, 9, 9, 6, 10, 10, 10, 6]
    print(row(["H", "D", "T", "ref fwd", "blk fwd", "sdpa fwd", "fwd x",
               "ref f+b", "blk f+b", "sdpa f+b", "f+b x"], widths))  # fmt: skip
    for H, D in heads:
        for T in lengths:
            cells = _measure(args, H, D, T)
            print(row([H, D, T] + [fmt_ms(c) if i % 4 != 3 else fmt_x(c)
                                   for i, c in enumerate(cells)], widths), flush=True)  # fmt: skip
    print(f"# load average (1 min) at end: {os.getloadavg()[0]:.2f}")


def _measure(args: argparse.Namespace, H: int, D: int, T: int) -> list[float | None]:
    B = args.batch
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, D)
    # the reference holds ~8 (B*H, T, T) fp32 tensors at once (more with autograd)
    run_ref = args.ref_gib * 2**30 >= B * H * T * T * 4 * 8

    def blk(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        o, _ = stickbreaking_attention_blockwise(
            qq, kk, vv, query_block=args.block, key_chunk=args.chunk
        )
        return o

    def ref(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return stickbreaking_attention_ref(qq, kk, vv)[0]

    def sdpa(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

    def fwd(f: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                return f(q, k, v)

        return go

    def step(f: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def go() -> object:
            torch.autograd.backward(f(q, k, v), do)
            q.grad = k.grad = v.grad = None
            return None

        return go

    paths: dict[str, Callable[[], object]] = {"blk_f": fwd(blk), "sdpa_f": fwd(sdpa)}
    if not args.no_backward:
        paths |= {"blk_s": step(blk), "sdpa_s": step(sdpa)}
    if run_ref:
        paths["ref_f"] = fwd(ref)
        if not args.no_backward:
            paths["ref_s"] = step(ref)
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, fn in paths.items():
            times[name].append(_time(fn))

    def med(name: str) -> float | None:
        return statistics.median(times[name]) if name in times else None

    def ratio(a: str, b: str) -> float | None:
        if a not in times:
            return None
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return [med("ref_f"), med("blk_f"), med("sdpa_f"), ratio("blk_f", "sdpa_f"),
            med("ref_s"), med("blk_s"), med("sdpa_s"), ratio("blk_s", "sdpa_s")]  # fmt: skip


if __name__ == "__main__":
    main()
