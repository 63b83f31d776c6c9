"""The references are the oracles of the kernel tests, so they are checked against the
definitions written out the slow way: a per-token loop for the MoE matmul, and the product
formula of stick-breaking attention."""

from __future__ import annotations

import threading

import pytest
import torch

from modelcore import threads as mc_threads
from modelcore.kernels import moe_ref, plan_routing
from modelcore.kernels.moe_ref import grouped_mm_ref
from modelcore.kernels.sb_ref import stickbreaking_attention_ref


def test_plan_routing_sorts_stably_and_counts():
    idx = torch.tensor([[2, 0], [0, 2], [4, 0], [2, 4]])
    plan = plan_routing(idx, 6)
    assert plan.sorted_expert_A.tolist() == [0, 0, 0, 2, 2, 2, 4, 4]
    assert plan.sorted_assign_A.tolist() == [1, 2, 5, 0, 3, 6, 4, 7]  # ties keep token order
    assert plan.offsets_E.tolist() == [3, 3, 6, 6, 8, 8]  # experts 1, 3, 5 are empty
    assert plan.k == 2


@pytest.mark.parametrize(
    ("grouped_in", "grouped_out"), [(False, False), (True, False), (False, True)]
)
def test_grouped_mm_ref_is_the_per_token_loop(grouped_in, grouped_out):
    torch.manual_seed(0)
    T, K, E, D, H = 9, 3, 5, 6, 4
    idx = torch.randint(0, E, (T, K))
    plan = plan_routing(idx, E)
    w = torch.randn(E, D, H)
    x = torch.randn(T * K if grouped_in else T, D)
    y = grouped_mm_ref(x, w, plan, grouped_in=grouped_in, grouped_out=grouped_out)
    for p, a in enumerate(plan.sorted_assign_A.tolist()):
        t, slot = divmod(a, K)
        row = x[p] if grouped_in else x[t]
        want = row @ w[idx[t, slot]]
        torch.testing.assert_close(y[p if grouped_out else a], want)
    gates = torch.rand(T, K)
    y = grouped_mm_ref(
        x[:T] if not grouped_in else x, w, plan, gates_TK=gates, grouped_in=grouped_in
    )
    assert y.shape == (T, H)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_sb_ref_is_the_stick_breaking_product(include_diagonal):
    torch.manual_seed(0)
    T, D = 7, 3
    q, k, v = (torch.randn(1, 1, T, D, dtype=torch.float64) for _ in range(3))
    o, rem = stickbreaking_attention_ref(q, k, v, include_diagonal=include_diagonal)
    beta = torch.sigmoid((q[0, 0] @ k[0, 0].T) / D**0.5)
    for i in range(T):
        last = i if include_diagonal else i - 1
        out, stick = torch.zeros(D, dtype=torch.float64), 1.0
        for j in range(last, -1, -1):  # nearest key first
            out += stick * beta[i, j] * v[0, 0, j]
            stick = stick * (1 - beta[i, j])
        out += stick * v[0, 0, i]
        torch.testing.assert_close(o[0, 0, i], out)
        torch.testing.assert_close(rem[0, 0, i], torch.as_tensor(stick, dtype=torch.float64))


@pytest.mark.parametrize(
    ("grouped_in", "grouped_out"), [(False, False), (True, False), (False, True)]
)
def test_grouped_mm_ref_inference_schedule_matches_autograd_schedule(grouped_in, grouped_out):
    torch.manual_seed(1)
    T, K, E, D, H = 23, 2, 6, 8, 5
    idx = torch.randint(0, E - 1, (T, K))  # expert E-1 stays empty
    plan = plan_routing(idx, E)
    x = torch.randn(T * K if grouped_in else T, D)
    w = torch.randn(E, D, H, requires_grad=True)
    gates = None if grouped_out else torch.rand(T, K)
    train = grouped_mm_ref(
        x, w, plan, gates_TK=gates, grouped_in=grouped_in, grouped_out=grouped_out
    )
    with torch.no_grad():
        infer = grouped_mm_ref(
            x, w, plan, gates_TK=gates, grouped_in=grouped_in, grouped_out=grouped_out
        )
    assert train.requires_grad
    assert not infer.requires_grad
    torch.testing.assert_close(infer, train.detach())


# (grouped_in, grouped_out, gated): every combination the contract allows.
_MODES = [
    (False, False, False),
    (False, False, True),
    (True, False, False),
    (True, False, True),
    (False, True, False),
    (True, True, False),
]


def _uneven_routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of E with expert 3 never chosen, expert 0 chosen by nearly every token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, 3] = -float("inf")
    logits[:, 0] += 2.0
    top, idx = logits.topk(K, dim=-1)
    return idx, top.softmax(-1)


@pytest.fixture
def expert_parallel(monkeypatch: pytest.MonkeyPatch):
    """Make the inference schedule hand even tiny calls to its worker threads (2 of them),
    and put the caller's thread count back afterwards."""
    monkeypatch.setattr(moe_ref, "_PARALLEL_MIN_MACS", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("grouped_in", "grouped_out", "gated"), _MODES)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("K", [2, 3])  # K <= 2 combines in place, K > 2 through a buffer
def test_inference_schedule_is_the_per_token_loop(
    grouped_in, grouped_out, gated, parallel, K, request: pytest.FixtureRequest
):
    """The no-grad schedule (per-expert gather into a buffer, matmul, scatter or gated
    combine; serial or on worker threads) against the definition, at odd shapes with an
    empty and a dominant expert."""
    if parallel:
        request.getfixturevalue("expert_parallel")
    T, E, D, H = 37, 5, 50, 70
    idx, gates = _uneven_routing(T, E, K, seed=2)
    plan = plan_routing(idx, E)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T * K if grouped_in else T, D, generator=gen)
    w = torch.randn(E, D, H, generator=gen)
    g = gates if gated else None
    mc_threads._pools.clear()
    with torch.no_grad():
        y = grouped_mm_ref(x, w, plan, gates_TK=g, grouped_in=grouped_in, grouped_out=grouped_out)
    assert (2 in mc_threads._pools) == parallel  # the worker threads ran it, or did not
    want = torch.zeros(T, H) if gated else torch.zeros(T * K, H)
    for p, a in enumerate(plan.sorted_assign_A.tolist()):
        t, slot = divmod(a, K)
        row = x[p] if grouped_in else x[t]
        prod = row @ w[idx[t, slot]]
        if gated:
            want[t] += gates[t, slot] * prod
        else:
            want[p if grouped_out else a] = prod
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_inference_schedule_on_worker_threads_takes_weights_that_require_grad(expert_parallel):
    """An nn.Module's weights require grad; evaluating it under no_grad takes the inference
    schedule, whose worker threads have grad mode on (it is per thread) and must not let
    mm(out=) refuse those weights."""
    T, K, E, D, H = 24, 2, 4, 16, 12
    idx, gates = _uneven_routing(T, E, K, seed=5)
    plan = plan_routing(idx, E)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, D, generator=gen)
    w = torch.randn(E, D, H, generator=gen).requires_grad_()
    mc_threads._pools.clear()
    with torch.no_grad():
        y = grouped_mm_ref(x, w, plan, gates_TK=gates)
        want = grouped_mm_ref(x, w.detach(), plan, gates_TK=gates)
    assert 2 in mc_threads._pools  # it ran on the worker threads
    assert not y.requires_grad
    torch.testing.assert_close(y, want, atol=0, rtol=0)


def test_expert_parallel_schedule_leaves_thread_counts_alone(expert_parallel):
    """Its workers pin themselves to one intra-op thread each, which in torch also resets
    the process-wide default; the caller, and threads it starts later, must keep theirs."""
    mc_threads._pools.clear()  # force the workers to be made (and pinned) during this call
    T, K, E = 16, 2, 4
    idx = torch.arange(T * K).reshape(T, K) % E
    with torch.no_grad():
        grouped_mm_ref(torch.randn(T, 8), torch.randn(E, 8, 6), plan_routing(idx, E))
    assert 2 in mc_threads._pools
    assert torch.get_num_threads() == 2
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [2]
    # and each worker runs its GEMMs on one thread: two workers use the two cores
    on_workers: list[int] = []
    mc_threads._pools[2].run([lambda: on_workers.append(torch.get_num_threads())] * 2)
    assert on_workers == [1, 1]


def test_expert_parallel_schedule_raises_worker_errors_and_recovers(expert_parallel):
    """An error inside a worker (here a dtype mismatch in torch.mm) reaches the caller,
    and the workers keep serving the next call."""
    T, K, E, D, H = 12, 2, 3, 8, 5
    plan = plan_routing(torch.arange(T * K).reshape(T, K) % E, E)
    x = torch.randn(T, D)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        grouped_mm_ref(x, torch.randn(E, D, H, dtype=torch.float64), plan)
    w = torch.randn(E, D, H)
    with torch.no_grad():
        y = grouped_mm_ref(x, w, plan)
    torch.testing.assert_close(y[5], x[2] @ w[5 % E])


def test_inference_schedule_handles_no_tokens():
    plan = plan_routing(torch.zeros(0, 2, dtype=torch.long), 4)
    w = torch.randn(4, 6, 3)
    with torch.no_grad():
        assert grouped_mm_ref(torch.randn(0, 6), w, plan).shape == (0, 3)
        y = grouped_mm_ref(torch.randn(0, 6), w, plan, gates_TK=torch.rand(0, 2))
    assert y.shape == (0, 3)


def test_expert_parallel_gated_combine_is_deterministic(expert_parallel, monkeypatch):
    """With K=2 the worker threads add a token's two gated rows in whichever order their
    blocks finish; the sum must still be bit-identical to the serial schedule's."""
    T, K, E, D, H = 301, 2, 7, 50, 70
    idx, gates = _uneven_routing(T, E, K, seed=4)
    plan = plan_routing(idx, E)
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(T, D, generator=gen), torch.randn(E, D, H, generator=gen)
    with torch.no_grad():
        runs = [grouped_mm_ref(x, w, plan, gates_TK=gates) for _ in range(3)]
        monkeypatch.setattr(moe_ref, "_PARALLEL_MIN_MACS", 1 << 62)
        serial = grouped_mm_ref(x, w, plan, gates_TK=gates)
    for y in runs:
        assert torch.equal(y, serial)
