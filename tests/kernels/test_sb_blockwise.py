"""The blockwise CPU path of stick-breaking attention against the reference (the oracle).

The oracle runs in float64 on the same (fp32-representable) inputs: the fp32 reference
itself drifts ~2e-5 from fp64 at a few hundred keys (``total - cumsum`` cancels), more
than the 1e-5 asked of the blockwise path (docs/kernels.md, "CPU path").
"""

from __future__ import annotations

import pytest
import torch

from modelcore.config import ModelConfig
from modelcore.kernels import sb_blockwise, select_backend
from modelcore.kernels.sb_blockwise import stickbreaking_attention_blockwise
from modelcore.kernels.sb_ref import stickbreaking_attention_ref
from modelcore.model import ModularLM


def _inputs(
    B: int, H: int, T: int, D: int, *, std: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    drem = torch.randn(B, H, T, generator=g)
    return q * std, k * std, v, do, drem


def _run(
    fn: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
    drem: torch.Tensor, **kw: object,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(o, rem, dq, dk, dv) with the loss sum(o * do) + sum(rem * drem)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, rem = fn(*leaves, **kw)  # type: ignore[operator]
    loss = (o * do.to(o.dtype)).sum() + (rem * drem.to(rem.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (o.detach(), rem.detach(), *grads)


def _assert_close_to_oracle(
    got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tol: float
) -> None:
    """Each output within ``tol`` of the oracle, relative to the oracle's largest entry
    (a gradient's scale grows with T and the logits; 1e-5 absolute on o and rem)."""
    for name, a, b in zip(("o", "rem", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        err = (a.double() - b).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


ODD_SHAPES = [
    # (B, H, T, D, query_block, key_chunk): T off every block edge, blocks smaller and
    # larger than T, one key chunk shorter than the query block
    (2, 3, 37, 48, 8, 16),
    (1, 2, 300, 48, 64, 100),
    (2, 2, 129, 33, 128, 1024),
    (1, 1, 50, 7, 64, 64),
    (3, 2, 77, 16, 16, 5),
    (1, 2, 1, 48, 128, 1024),
]


@pytest.mark.parametrize("include_diagonal", [False, True])
@pytest.mark.parametrize(("B", "H", "T", "D", "qb", "kc"), ODD_SHAPES)
def test_fp32_matches_reference_forward_and_backward(
    B: int, H: int, T: int, D: int, qb: int, kc: int, include_diagonal: bool
) -> None:
    q, k, v, do, drem = _inputs(B, H, T, D, seed=T + D)
    want = _run(stickbreaking_attention_ref, q.double(), k.double(), v.double(), do, drem,
                include_diagonal=include_diagonal)  # fmt: skip
    got = _run(stickbreaking_attention_blockwise, q, k, v, do, drem,
               include_diagonal=include_diagonal, query_block=qb, key_chunk=kc)  # fmt: skip
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.float32
    _assert_close_to_oracle(got, want, 1e-5)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_fp64_matches_reference_tightly(include_diagonal: bool) -> None:
    q, k, v, do, drem = (t.double() for t in _inputs(2, 3, 97, 50, seed=5))
    kw = {"include_diagonal": include_diagonal}
    want = _run(stickbreaking_attention_ref, q, k, v, do, drem, **kw)
    got = _run(stickbreaking_attention_blockwise, q, k, v, do, drem, query_block=32,
               key_chunk=24, **kw)  # fmt: skip
    assert got[0].dtype == torch.float64
    _assert_close_to_oracle(got, want, 1e-10)


def test_t1_is_the_own_value() -> None:
    q, k, v, _, _ = _inputs(2, 3, 1, 5)
    o, rem = stickbreaking_attention_blockwise(q, k, v)
    torch.testing.assert_close(o, v, rtol=0, atol=0)
    torch.testing.assert_close(rem, torch.ones(2, 3, 1), rtol=0, atol=0)


def test_extreme_logits_over_a_long_row() -> None:
    """|z| ~ 30: sigmoid rounds to 1 in fp32 (log(1 - sigmoid) would be -inf) and the stick
    is used up within a few keys, over 1100 keys crossing several chunks. q.k / sqrt(D) has
    standard deviation std^2 = 45, so a median |z| of ~30."""
    q, k, v, do, drem = _inputs(1, 2, 1100, 16, std=45**0.5, seed=3)
    z = (q[0, 0] @ k[0, 0].T) / 4.0
    assert z.abs().median().item() > 20.0  # the logits really are extreme
    assert (torch.sigmoid(z) == 1.0).any()
    want = _run(stickbreaking_attention_ref, q.double(), k.double(), v.double(), do, drem)
    got = _run(stickbreaking_attention_blockwise, q, k, v, do, drem, query_block=128,
               key_chunk=256)  # fmt: skip
    _assert_close_to_oracle(got, want, 1e-5)


def test_gradcheck_fp64_tiny() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    for diag in (False, True):

        def fn(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, diag: bool = diag
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return stickbreaking_attention_blockwise(
                q, k, v, include_diagonal=diag, query_block=3, key_chunk=2
            )

        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_the_result_does_not_depend_on_how_rows_are_split(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The (batch x head) rows are shared out to the worker threads: every output and
    gradient is the one computed on a single thread, to rounding (the rows are independent;
    a batched matmul over fewer rows may run another kernel, so bits can differ)."""
    q, k, v, do, drem = _inputs(2, 3, 70, 16, std=1.5, seed=3)
    monkeypatch.setattr(sb_blockwise, "_workers", lambda: 1)
    want = _run(stickbreaking_attention_blockwise, q, k, v, do, drem, query_block=32)
    monkeypatch.setattr(sb_blockwise, "_workers", lambda: workers)
    assert len(sb_blockwise._row_slices(6)) == min(workers, 6)
    got = _run(stickbreaking_attention_blockwise, q, k, v, do, drem, query_block=32)
    for name, a, b in zip(("o", "rem", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_rejects_mismatched_shapes() -> None:
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="share one"):
        stickbreaking_attention_blockwise(q, q[:, :, :4], q)


def test_cpu_backend_runs_the_blockwise_path_and_reference_stays_selectable() -> None:
    assert select_backend("cpu").name == "cpu"
    assert select_backend("cpu", prefer="reference").name == "reference"
    q, k, v, do, drem = _inputs(2, 2, 600, 48, seed=11)
    want = _run(stickbreaking_attention_ref, q.double(), k.double(), v.double(), do, drem)
    got = _run(select_backend("cpu").stickbreaking, q, k, v, do, drem)
    _assert_close_to_oracle(got, want, 1e-5)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_model_forward_and_gradients_match_the_reference_backend(include_diagonal: bool) -> None:
    cfg = ModelConfig.from_name("tiny").replace(
        vocab_size=97, max_seq_len=64, sb_include_diagonal=include_diagonal
    )
    torch.manual_seed(0)
    ref = ModularLM(cfg, kernels="reference")
    torch.manual_seed(0)
    cpu = ModularLM(cfg)
    assert cpu.backend.name == "cpu"
    assert ref.backend.name == "reference"
    cpu.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (3, 45), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (ref, cpu):
        logits = model(ids, aux="none").logits
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        assert grad is not None
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
