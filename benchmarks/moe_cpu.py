"""CPU speed of the reference grouped MoE matmul (the CPU path of modelcore).

Shape (issue 5): T=4096 tokens, d=1024, h=2048, E=32 experts, top-k=2, fp32, 2 threads.
Ways to compute the same T*k expert rows, all in this one process:

* grouped: the whole sort-based reference path, timed as one call each: ``plan_routing``
  (stable sort + block ends by searchsorted) then ``grouped_mm_ref`` without autograd
  (as inference runs it): gather the rows of each expert, one matmul per expert block,
  scatter the (T*k, h) result back to assignment order. A second row times the same with
  gates: the K rows of each token combined into a (T, h) result (the MoE layer's output
  step). The forward of the autograd schedule (what CPU training runs) is printed too;
* dense: one ``torch.mm`` of (T*k, d) @ (d, h): the same FLOPs with no routing at all,
  allocating its (T*k, h) output as the grouped call does;
* per-token loop: one (1, d) @ (d, h) product per (token, slot), expert ids read as
  Python ints beforehand. It is timed on a subset of tokens and extrapolated linearly to
  T (each product is independent and the same size, so its time is linear in the token
  count); the script says so.

Every repetition runs every path once, back to back, and each ratio is taken within a
repetition (dense time / grouped time of the same repetition), so a neighbour that slows
the machine for a while slows both sides of a ratio; the median over repetitions is the
verdict, and the best times are printed beside it.
Goals: grouped >= 0.85x dense GFLOP/s, >= 15x the per-token loop.

``--compare-with FILE`` also times another version of ``moe_ref.py`` (e.g. an earlier
commit's: ``git show REV:modelcore/kernels/moe_ref.py > /tmp/moe_ref_old.py``) in the same
repetitions, so a before/after is measured under the same conditions.

Run: .venv/bin/python benchmarks/moe_cpu.py [--reps 9] [--loop-tokens 256] [--compare-with F]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from modelcore.kernels import plan_routing
from modelcore.kernels.moe_ref import grouped_mm_ref


def _time(fn: Callable[[], object]) -> float:
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
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--loop-tokens", type=int, default=256)
    ap.add_argument("--compare-with", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, d, h, E, k = args.tokens, args.d, args.h, args.experts, args.k
    x = torch.randn(T, d)
    w = torch.randn(E, d, h) / d**0.5
    logits = torch.randn(T, E)  # a router's scores
    top, expert_idx = logits.topk(k, dim=-1)
    gates = top.softmax(-1)
    x_dense = torch.randn(T * k, d)
    w_dense = torch.randn(d, h) / d**0.5
    flops = 2.0 * T * k * d * h

    def grouped() -> torch.Tensor:
        with torch.no_grad():
            return grouped_mm_ref(x, w, plan_routing(expert_idx, E))

    def grouped_gated() -> torch.Tensor:
        with torch.no_grad():
            return grouped_mm_ref(x, w, plan_routing(expert_idx, E), gates_TK=gates)

    w_train = w.clone().requires_grad_()

    def grouped_autograd() -> torch.Tensor:
        return grouped_mm_ref(x, w_train, plan_routing(expert_idx, E))

    def dense() -> torch.Tensor:
        with torch.no_grad():
            return torch.mm(x_dense, w_dense)

    n_loop = min(args.loop_tokens, T)
    loop_ids = expert_idx[:n_loop].tolist()

    def loop() -> None:
        with torch.no_grad():
            for t in range(n_loop):
                for e in loop_ids[t]:
                    x[t : t + 1] @ w[e]

    # correctness of what is timed: every row against the autograd schedule, a few rows
    # against the definition, and the gated combine against its formula
    y = grouped()
    for a in (0, 1, T * k - 1):
        t, s = divmod(a, k)
        torch.testing.assert_close(y[a], x[t] @ w[expert_idx[t, s]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grouped_autograd().detach(), y)
    want_gated = torch.einsum("tkh,tk->th", y.view(T, k, h), gates)
    torch.testing.assert_close(grouped_gated(), want_gated, atol=1e-4, rtol=1e-4)
    del y, want_gated

    paths = {
        "grouped": grouped,
        "grouped_gated": grouped_gated,
        "dense": dense,
        "autograd": grouped_autograd,
        "loop": loop,
    }
    rows = [
        ("grouped (plan+gather+mm+scatter)", "grouped"),
        ("grouped, gated combine to (T,h)", "grouped_gated"),
        ("grouped, autograd schedule fwd", "autograd"),
        ("dense torch.mm, same FLOPs", "dense"),
        ("per-token loop (extrapolated)", "loop"),
    ]
    goal_rows = rows[:2]
    if args.compare_with is not None:
        other = _load_module(args.compare_with)

        def other_grouped() -> torch.Tensor:
            with torch.no_grad():
                return other.grouped_mm_ref(x, w, other.plan_routing(expert_idx, E))

        def other_gated() -> torch.Tensor:
            with torch.no_grad():
                return other.grouped_mm_ref(x, w, other.plan_routing(expert_idx, E), gates_TK=gates)

        torch.testing.assert_close(other_grouped(), grouped())
        torch.testing.assert_close(other_gated(), grouped_gated(), atol=1e-4, rtol=1e-4)
        paths |= {"other": other_grouped, "other_gated": other_gated}
        extra = [
            (f"{args.compare_with.name}: grouped", "other"),
            (f"{args.compare_with.name}: gated", "other_gated"),
        ]
        rows[2:2] = extra
        goal_rows = goal_rows + extra
    for fn in paths.values():  # warm-up: allocator, thread pools, MKL's buffers
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, fn in paths.items():
            times[name].append(_time(fn))
    times["loop"] = [t_sub * T / n_loop for t_sub in times["loop"]]  # extrapolated to T

    def paired(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"moe_cpu: T={T} d={d} h={h} E={E} k={k} fp32, torch.set_num_threads({args.threads}),")
    print(f"         torch {torch.__version__}, {args.reps} repetitions (paths interleaved),")
    print(f"         load average at the end (1, 5, 15 min): {load}")
    print(f"{'path':<34}{'median ms':>10}{'best ms':>10}{'GFLOP/s':>9}")
    for label, name in rows:
        med, best = statistics.median(times[name]), min(times[name])
        print(f"{label:<34}{med * 1e3:>10.1f}{best * 1e3:>10.1f}{flops / med / 1e9:>9.1f}")
    print(f"per-token loop timed on {n_loop} of {T} tokens and extrapolated x{T / n_loop:g}")
    print("ratios: median over repetitions of (other path's time / grouped time), same repetition")
    verdict = {True: "MET", False: "MISSED"}
    for label, name in goal_rows:
        r_dense, r_loop = paired("dense", name), paired("loop", name)
        print(f"{label}:")
        print(f"  vs dense GFLOP/s : {r_dense:.2f}x  (goal >= 0.85x) {verdict[r_dense >= 0.85]}")
        print(f"  vs per-token loop: {r_loop:.1f}x  (goal >= 15x) {verdict[r_loop >= 15]}")


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("moe_ref_compared", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
