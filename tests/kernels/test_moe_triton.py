"""Grouped sparse MoE matmul on Triton vs the reference: outputs and every gradient.

Odd shapes on purpose: D=50, H=70 (not multiples of any tile), T=37 (not a multiple of the
row block), E=5 experts with k=3, one expert never chosen and one chosen by most tokens.
"""

from __future__ import annotations

import pytest
import torch

from modelcore.kernels import RoutingPlan, plan_routing, select_backend
from modelcore.kernels.moe_ref import grouped_mm_ref
from modelcore.kernels.moe_triton import grouped_mm_triton

E, K, D, H = 5, 3, 50, 70
EMPTY_EXPERT = 3

# (grouped_in, grouped_out, gated): every combination the contract allows.
MODES = [
    (False, False, False),
    (False, False, True),
    (True, False, True),
    (True, False, False),
    (False, True, False),
    (True, True, False),
]


def _routing(T: int, device: torch.device, *, k: int = K, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, EMPTY_EXPERT] = -float("inf")  # never routed: an empty expert block
    logits[:, 0] += 2.0  # nearly every token picks expert 0 and few pick expert 4:
    logits[:, 4] -= 2.0  # uneven blocks
    top, idx = logits.topk(k, dim=-1)
    gates = top.softmax(-1)
    return plan_routing(idx.to(device), E), gates.to(device)


def _grads(fn, inputs, cot):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], cot)
    return out, grads


def _run_both(device, T, grouped_in, grouped_out, gated, dtype=torch.float32, k=K, seed=0):
    plan, gates = _routing(T, device, k=k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = T * k if grouped_in else T
    x = torch.randn(rows, D, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(E, D, H, generator=gen) / D**0.5).to(device, dtype).requires_grad_()
    g = gates.to(dtype).requires_grad_() if gated else None
    n_out = T if gated else T * k
    cot = torch.randn(n_out, H, generator=gen).to(device, dtype)

    def tri(x, w, g):
        return grouped_mm_triton(
            x, w, plan, gates_TK=g, grouped_in=grouped_in, grouped_out=grouped_out
        )

    def ref(x, w, g):
        # the oracle runs in fp32 on the same (rounded) inputs
        def up(t):
            return None if t is None else t.float()

        return grouped_mm_ref(
            up(x), up(w), plan, gates_TK=up(g), grouped_in=grouped_in, grouped_out=grouped_out
        )

    got = _grads(tri, (x, w, g), cot)
    want = _grads(ref, (x, w, g), cot.float())
    return got, want


def _assert_close(got, want, tol):
    out, grads = got
    out_r, grads_r = want
    torch.testing.assert_close(out.float(), out_r.float(), atol=tol, rtol=tol)
    assert len(grads) == len(grads_r)
    for name, a, b in zip(("x", "w", "gates"), grads, grads_r, strict=False):
        torch.testing.assert_close(
            a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.parametrize(("grouped_in", "grouped_out", "gated"), MODES)
def test_matches_reference_fp32(device, grouped_in, grouped_out, gated):
    _assert_close(*_run_both(device, 37, grouped_in, grouped_out, gated), tol=1e-4)


def test_routing_has_empty_and_uneven_experts(device):
    plan, _ = _routing(37, device)
    counts = torch.diff(plan.offsets_E, prepend=plan.offsets_E.new_zeros(1))
    assert counts[EMPTY_EXPERT] == 0
    assert counts.max() > 2 * counts[counts > 0].min()


def test_top1_and_single_token(device):
    # k = 1 takes the no-sum path of dX; T = 1 is decode.
    _assert_close(*_run_both(device, 1, False, False, True, k=1), tol=1e-4)
    _assert_close(*_run_both(device, 19, False, False, False, k=1, seed=3), tol=1e-4)


def test_empty_batch(device):
    plan, gates = _routing(0, device)
    x = torch.zeros(0, D, device=device, requires_grad=True)
    w = torch.randn(E, D, H, device=device, requires_grad=True)
    y = grouped_mm_triton(x, w, plan, gates_TK=gates.requires_grad_())
    assert y.shape == (0, H)
    (dw,) = torch.autograd.grad(y.sum(), [w])
    assert torch.count_nonzero(dw) == 0


def test_fp16(device):
    _assert_close(*_run_both(device, 37, False, False, True, dtype=torch.float16), tol=2e-2)


def test_rejects_mismatched_inputs(device):
    plan, gates = _routing(8, device)
    w = torch.randn(E, D, H, device=device)
    with pytest.raises(ValueError, match="rows"):
        grouped_mm_triton(torch.randn(9, D, device=device), w, plan)
    with pytest.raises(ValueError, match="grouped_out"):
        grouped_mm_triton(
            torch.randn(8, D, device=device), w, plan, gates_TK=gates, grouped_out=True
        )


def test_backend_dispatch(device):
    backend = select_backend(device, prefer="triton")
    assert backend.name == "triton"
    plan, gates = _routing(11, device)
    x, w = torch.randn(11, D, device=device), torch.randn(E, D, H, device=device)
    torch.testing.assert_close(
        backend.grouped_mm(x, w, plan, gates_TK=gates),
        grouped_mm_ref(x, w, plan, gates_TK=gates),
        atol=1e-4,
        rtol=1e-4,
    )


def _moe_ffn(x, w1, w2, router, mm, k=2):
    gates, idx = (x @ router).softmax(-1).topk(k, dim=-1)
    plan: RoutingPlan = plan_routing(idx, w1.shape[0])
    h = torch.relu(mm(x, w1, plan, grouped_out=True))
    return mm(h, w2, plan, gates_TK=gates, grouped_in=True)


def test_torch_compile_fullgraph(device):
    """torch.compile traces through the custom op (fake + autograd registrations) in one graph.

    On the CPU the aot_eager backend checks exactly that (Dynamo + AOTAutograd with fake
    tensors) without compiling C++; the GPU test below uses Inductor.
    """
    torch.manual_seed(0)
    T, d, h = 13, 24, 40
    x = torch.randn(T, d, device=device, requires_grad=True)
    w1 = torch.randn(E, d, h, device=device, requires_grad=True)
    w2 = torch.randn(E, h, d, device=device, requires_grad=True)
    router = torch.randn(d, E, device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(
        lambda x, w1, w2: _moe_ffn(x, w1, w2, router, grouped_mm_triton),
        fullgraph=True,
        backend=backend,
    )
    y = compiled(x, w1, w2)
    got = torch.autograd.grad(y.square().sum(), [x, w1, w2])
    y_ref = _moe_ffn(x, w1, w2, router, grouped_mm_ref)
    want = torch.autograd.grad(y_ref.square().sum(), [x, w1, w2])
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    # fp32 throughout, but the compiled graph reorders the router's and the loss's
    # reductions; gradients of y^2 reach ~5, so 1e-3 relative (observed 3e-4 on an H100).
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_bf16_and_deterministic_dw():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    T, d, h, e, k = 1000, 512, 1024, 8, 2
    idx = torch.randn(T, e, device=dev).topk(k, -1).indices
    gates = torch.rand(T, k, device=dev)
    plan = plan_routing(idx, e)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(e, d, h, device=dev) / d**0.5).bfloat16().requires_grad_()
    y = grouped_mm_triton(x, w, plan, gates_TK=gates)
    y_ref = grouped_mm_ref(x.float(), w.float(), plan, gates_TK=gates)
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=2e-2)
    cot = torch.randn_like(y)
    dw1 = torch.autograd.grad(grouped_mm_triton(x, w, plan, gates_TK=gates), [w], cot)[0]
    dw2 = torch.autograd.grad(grouped_mm_triton(x, w, plan, gates_TK=gates), [w], cot)[0]
    assert torch.equal(dw1, dw2)


@pytest.mark.gpu
def test_gpu_large_odd_fp32():
    got, want = _run_both(torch.device("cuda"), 3001, False, False, True)
    _assert_close(got, want, tol=1e-4)
    got, want = _run_both(torch.device("cuda"), 2999, True, True, False, seed=5)
    _assert_close(got, want, tol=1e-4)
