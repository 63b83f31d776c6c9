"""GPU benchmark of the grouped sparse MoE matmul (Triton) inside an MoE FFN layer.

Layer: y = sum_k gate_k * W2[e_k]^T gelu(W1[e_k]^T x), bf16, top-k routing from random
router logits. Shapes (issue 5): Mixtral (d=4096, f=14336, E=8, k=2) and ModuleFormer
(d=1024, f=2048, E=32, k=2), T from 1 to 16384 tokens. Paths, all in this process:

* triton: ``plan_routing`` + grouped_mm (gather in load, grouped out) + gelu + grouped_mm
  (grouped in, gated scatter);
* loop: the per-expert PyTorch loop (``torch.where`` per expert, index_add; as in HF Mixtral);
* _grouped_mm: ``torch._grouped_mm`` on pre-sorted rows, where this torch has it;
* dense: cuBLAS ``(T*k, d) @ (d, f)``, gelu, ``@ (f, d)``: the same FLOPs, no routing.

Ratios: loop/triton (goal >= 3x), dense/triton = the fraction of dense cuBLAS throughput
(goal >= 0.6 at T >= 4096), and for decode (T <= 64) triton / (time to read the active
experts' weights once from HBM at the copy bandwidth measured here) (goal <= 1.5).

Run: PYTHONPATH=. python3 benchmarks/moe_gpu.py [--reps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

gelu = torch.nn.functional.gelu

SHAPES = {
    "mixtral": {"d": 4096, "f": 14336, "E": 8, "k": 2, "T": [1, 16, 64, 512, 4096, 16384]},
    "moduleformer": {"d": 1024, "f": 2048, "E": 32, "k": 2, "T": [1, 64, 4096, 16384]},
}
SMOKE = {"tiny": {"d": 48, "f": 80, "E": 5, "k": 2, "T": [1, 37]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU via TRITON_INTERPRET")
    args = ap.parse_args()
    if args.smoke and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _bench import fmt_ms, fmt_x, hbm_bandwidth, header, row

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = 1 if args.smoke else args.reps
    header("MoE FFN layer: Triton grouped matmul vs baselines (forward)", dev)
    bw = hbm_bandwidth(dev, 64 << 20 if args.smoke else 4 << 30)
    print(f"# HBM copy bandwidth measured here: {bw / 1e9:.0f} GB/s (read + write)")
    shapes = SMOKE if args.smoke else {n: SHAPES[n] for n in args.shapes}

    widths = [6, 11, 10, 11, 12, 10, 9, 12, 12]
    for name, s in shapes.items():
        d, f, E, k = s["d"], s["f"], s["E"], s["k"]
        torch.manual_seed(0)
        W1 = (torch.randn(E, d, f, device=dev) / d**0.5).to(dtype)
        W2 = (torch.randn(E, f, d, device=dev) / f**0.5).to(dtype)
        print(f"\n## {name}: d={d} f={f} E={E} k={k} {str(dtype).removeprefix('torch.')}")
        print(row(["T", "triton ms", "loop ms", "loop/trit", "_gmm ms", "gmm/trit",
                   "dense ms", "dense/trit", "trit/HBM"], widths))  # fmt: skip
        gmm_state = {"ok": hasattr(torch, "_grouped_mm") and dev.type == "cuda", "w": None}
        for T in s["T"]:
            cells = _forward_row(T, W1, W2, k, dev, dtype, reps, bw, gmm_state)
            print(row(cells, widths))
        T = 37 if args.smoke else 4096
        t_tri, t_loop = _train_times(T, W1, W2, k, dev, dtype, reps)
        print(f"fwd+bwd T={T}: triton {fmt_ms(t_tri)} ms, loop {fmt_ms(t_loop)} ms, "
              f"loop/triton {fmt_x(t_loop / t_tri)}")  # fmt: skip
        del W1, W2, gmm_state
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _loop_layer(x, W1, W2, idx, gates, *, functional=False):
    """The per-expert PyTorch loop (as in HF Mixtral): torch.where per expert, index_add."""
    out = torch.zeros_like(x)
    for e in range(W1.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        y = gelu(x[tok] @ W1[e]) @ W2[e]
        contrib = y * gates[tok, slot, None]
        out = out.index_add(0, tok, contrib) if functional else out.index_add_(0, tok, contrib)
    return out


def _triton_layer(x, W1, W2, idx, gates):
    from modelcore.kernels import plan_routing
    from modelcore.kernels.moe_triton import grouped_mm_triton

    plan = plan_routing(idx, W1.shape[0])
    h = gelu(grouped_mm_triton(x, W1, plan, grouped_out=True))
    return grouped_mm_triton(h, W2, plan, gates_TK=gates, grouped_in=True)


def _gmm_layer(x, w1, w2, idx, gates):
    """torch._grouped_mm on rows sorted by expert; gather, scatter and gate sum around it."""
    from modelcore.kernels import plan_routing

    T, k = idx.shape
    plan = plan_routing(idx, w1.shape[0])
    offs = plan.offsets_E.to(torch.int32)
    h = gelu(torch._grouped_mm(x[plan.sorted_assign_A // k], w1, offs=offs))
    y_sorted = torch._grouped_mm(h, w2, offs=offs)
    y = torch.empty_like(y_sorted).index_copy_(0, plan.sorted_assign_A, y_sorted)
    return torch.bmm(gates.unsqueeze(1), y.view(T, k, -1)).squeeze(1)


def _forward_row(T, W1, W2, k, dev, dtype, reps, bw, gmm_state):
    from _bench import bench, fmt_ms, fmt_x

    E, d, f = W1.shape
    x = torch.randn(T, d, device=dev, dtype=dtype)
    top, idx = torch.randn(T, E, device=dev).topk(k, dim=-1)
    gates = top.softmax(-1).to(dtype)
    xa = torch.randn(T * k, d, device=dev, dtype=dtype)
    y_t, y_l = _triton_layer(x, W1, W2, idx, gates), _loop_layer(x, W1, W2, idx, gates)
    scale = max(y_l.float().abs().max().item(), 1e-6)
    err = (y_t.float() - y_l.float()).abs().max().item() / scale
    if err > 0.05:
        print(f"# WARNING: triton vs loop relative error {err:.3g} at T={T}")
    t_tri = bench(lambda: _triton_layer(x, W1, W2, idx, gates), dev, reps=reps)
    t_loop = bench(lambda: _loop_layer(x, W1, W2, idx, gates), dev, reps=reps)
    t_dense = bench(lambda: gelu(xa @ W1[0]) @ W2[0], dev, reps=reps)
    t_gmm = None
    if gmm_state["ok"]:
        # Some builds want column-major expert weights; try the given layout, then that one.
        layouts = [gmm_state["w"]] if gmm_state["w"] else [
            (W1, W2),
            (W1.transpose(1, 2).contiguous().transpose(1, 2),
             W2.transpose(1, 2).contiguous().transpose(1, 2)),
        ]  # fmt: skip
        for w1, w2 in layouts:
            try:
                _gmm_layer(x, w1, w2, idx, gates)
            except Exception as exc:  # layout or dtype support varies by build
                last = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                continue
            gmm_state["w"] = (w1, w2)
            t_gmm = bench(lambda w1=w1, w2=w2: _gmm_layer(x, w1, w2, idx, gates), dev, reps=reps)
            break
        else:
            print(f"# torch._grouped_mm unusable here: {last}")
            gmm_state["ok"] = False
    hbm = None
    if T <= 64:
        n_active = torch.unique(idx).numel()
        weight_bytes = n_active * 2 * d * f * W1.element_size()
        hbm = t_tri / (weight_bytes / bw)
    return [T, fmt_ms(t_tri), fmt_ms(t_loop), fmt_x(t_loop / t_tri), fmt_ms(t_gmm),
            fmt_x(t_gmm / t_tri if t_gmm else None), fmt_ms(t_dense), fmt_x(t_dense / t_tri),
            fmt_x(hbm)]  # fmt: skip


def _train_times(T, W1, W2, k, dev, dtype, reps):
    """Forward + backward of the layer (grads for x, both weights and the gates)."""
    from _bench import bench

    E, d, _ = W1.shape
    w1, w2 = W1.detach().requires_grad_(True), W2.detach().requires_grad_(True)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    top, idx = torch.randn(T, E, device=dev).topk(k, dim=-1)
    gates = top.softmax(-1).to(dtype).requires_grad_(True)
    dy = torch.randn(T, d, device=dev, dtype=dtype)

    def tri_step():
        torch.autograd.backward(_triton_layer(x, w1, w2, idx, gates), dy)

    def loop_step():
        torch.autograd.backward(_loop_layer(x, w1, w2, idx, gates, functional=True), dy)

    return bench(tri_step, dev, reps=reps), bench(loop_step, dev, reps=reps)


if __name__ == "__main__":
    main()
