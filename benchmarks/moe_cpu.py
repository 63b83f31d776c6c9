"""CPU speed of the reference grouped MoE matmul (the CPU path of modelcore).

Shape (issue 5): T=4096 tokens, d=1024, h=2048, E=32 experts, top-k=2, fp32, 2 threads.
Three ways to compute the same T*k expert rows, all in this one process:

* grouped: the reference path, ``plan_routing`` (sort + block ends by searchsorted) then
  ``grouped_mm_ref`` (gather, one matmul per expert block, scatter back), timed together,
  as inference runs it (no autograd: the cache-blocked schedule). The forward of its
  autograd schedule (what CPU training runs) is printed too, for reference;
* dense: one ``torch.mm`` of (T*k, d) @ (d, h): the same FLOPs with no routing at all;
* per-token loop: one (1, d) @ (d, h) product per (token, slot), the naive baseline. It is
  timed on a subset of tokens and extrapolated linearly to T (each product is independent
  and the same size, so its time is linear in the token count); the script says so.

Repetitions interleave the paths, so a busy machine slows them alike, and the best of
the repetitions is reported (the usual estimate of the unloaded time; on a shared
2-core machine the median mostly measures the neighbours).
Goals: grouped >= 0.85x dense GFLOP/s, >= 15x the per-token loop.

Run: .venv/bin/python benchmarks/moe_cpu.py [--reps 7] [--loop-tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from modelcore.kernels import plan_routing
from modelcore.kernels.moe_ref import grouped_mm_ref


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--h", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--loop-tokens", type=int, default=256)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, d, h, E, k = args.tokens, args.d, args.h, args.experts, args.k
    x = torch.randn(T, d)
    w = torch.randn(E, d, h) / d**0.5
    expert_idx = torch.randn(T, E).topk(k, dim=-1).indices  # a router's top-k
    x_dense = torch.randn(T * k, d)
    w_dense = torch.randn(d, h) / d**0.5
    flops = 2.0 * T * k * d * h

    def grouped() -> torch.Tensor:
        with torch.no_grad():
            return grouped_mm_ref(x, w, plan_routing(expert_idx, E))

    w_train = w.clone().requires_grad_()

    def grouped_autograd() -> torch.Tensor:
        return grouped_mm_ref(x, w_train, plan_routing(expert_idx, E))

    def dense() -> torch.Tensor:
        with torch.no_grad():
            return torch.mm(x_dense, w_dense)

    # correctness of what is timed, on a few rows
    y = grouped()
    for a in (0, 1, T * k - 1):
        t, s = divmod(a, k)
        torch.testing.assert_close(y[a], x[t] @ w[expert_idx[t, s]], atol=1e-4, rtol=1e-4)

    torch.testing.assert_close(grouped_autograd().detach(), y)
    grouped(), dense()  # warm-up: allocator, thread pool
    t_grouped, t_dense, t_train = [], [], []
    for _ in range(args.reps):
        t_grouped.append(_time(grouped))
        t_dense.append(_time(dense))
        t_train.append(_time(grouped_autograd))
    tg, td, tt = (min(v) for v in (t_grouped, t_dense, t_train))

    n_loop = min(args.loop_tokens, T)

    def loop() -> None:
        for t in range(n_loop):
            for s in range(k):
                x[t : t + 1] @ w[expert_idx[t, s]]

    loop()
    tl_subset = min(_time(loop) for _ in range(3))
    tl_full = tl_subset * T / n_loop

    print(f"moe_cpu: T={T} d={d} h={h} E={E} k={k} fp32, torch.set_num_threads({args.threads}),")
    print(f"         torch {torch.__version__}, best of {args.reps} (paths interleaved)")
    print(f"{'path':<26}{'time ms':>10}{'GFLOP/s':>10}")
    print(f"{'grouped (ref, incl. plan)':<26}{tg * 1e3:>10.1f}{flops / tg / 1e9:>10.1f}")
    print(f"{'grouped, autograd fwd':<26}{tt * 1e3:>10.1f}{flops / tt / 1e9:>10.1f}")
    print(f"{'dense torch.mm, same FLOPs':<26}{td * 1e3:>10.1f}{flops / td / 1e9:>10.1f}")
    print(f"{'per-token loop (extrap.)':<26}{tl_full * 1e3:>10.1f}{flops / tl_full / 1e9:>10.1f}")
    print(f"per-token loop timed on {n_loop} of {T} tokens and extrapolated x{T / n_loop:g}")
    r_dense, r_loop = td / tg, tl_full / tg
    verdict = {True: "MET", False: "MISSED"}
    print(f"grouped / dense GFLOP/s : {r_dense:.2f}x  (goal >= 0.85x) {verdict[r_dense >= 0.85]}")
    print(f"grouped vs per-token    : {r_loop:.1f}x  (goal >= 15x) {verdict[r_loop >= 15]}")


if __name__ == "__main__":
    main()
