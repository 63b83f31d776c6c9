"""GPU benchmark of stick-breaking attention (Triton) vs causal softmax SDPA (flash).

Shape (issue 5): B=4, H=12, D=128, T = 4096, 8192, 16384, bf16. Forward and forward +
backward, each path timed in this process; ratio = stick-breaking / SDPA time (goal:
fwd+bwd at most 1.5x). SDPA is pinned to the flash backend when this torch has it.

Run: PYTHONPATH=. python3 benchmarks/attention_gpu.py [--reps 5] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU via TRITON_INTERPRET")
    args = ap.parse_args()
    if args.smoke and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _bench import bench, header, row

    from modelcore.kernels.sb_triton import stickbreaking_attention_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, H, D = (1, 2, 32) if args.smoke else (4, 12, 128)
    lengths = [70] if args.smoke else args.lengths
    reps = 1 if args.smoke else args.reps

    def flash():
        if dev.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    header(f"Stick-breaking attention (Triton) vs causal SDPA flash: B={B} H={H} D={D}", dev)
    widths = [6, 11, 9, 9, 14, 12, 12]
    print(
        row(["T", "sb fwd ms", "sdpa fwd", "fwd x", "sb fwd+bwd ms", "sdpa f+b", "f+b x"], widths)
    )
    for T in lengths:
        print(row(_measure(stickbreaking_attention_triton, flash, bench, B, H, T, D, dev, dtype,
                           reps), widths))  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _measure(sb_attn, flash, bench, B, H, T, D, dev, dtype, reps) -> list[str]:
    from _bench import fmt_ms, fmt_x

    torch.manual_seed(0)
    q, k, v = (
        torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    do = torch.randn(B, H, T, D, device=dev, dtype=dtype)

    def sb_fwd():
        with torch.no_grad():
            return sb_attn(q, k, v)

    def sb_step():
        o, _ = sb_attn(q, k, v)
        torch.autograd.backward(o, do)

    def sdpa_fwd():
        with torch.no_grad(), flash():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_step():
        with flash():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.backward(o, do)

    t_sb, t_sd = bench(sb_fwd, dev, reps=reps), bench(sdpa_fwd, dev, reps=reps)
    t_sbs, t_sds = bench(sb_step, dev, reps=reps), bench(sdpa_step, dev, reps=reps)
    return [T, fmt_ms(t_sb), fmt_ms(t_sd), fmt_x(t_sb / t_sd), fmt_ms(t_sbs), fmt_ms(t_sds),
            fmt_x(t_sbs / t_sds)]  # fmt: skip


if __name__ == "__main__":
    main()
