"""The fused C kernel behind ``log_mix`` on the CPU (modelcore/native): built once into a
cache keyed by source, compiler and CPU; as accurate as the float64 reference within a few
float32 ulps; the same NaN / inf / underflow semantics as the torch path; and a missing
compiler degrades to the torch path instead of failing."""

from __future__ import annotations

import logging
import math
import shutil
import threading

import pytest
import torch

from modelcore import native
from modelcore.compose import ensemble
from modelcore.compose.ensemble import log_mix

needs_cc = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler here"
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def native_on(shared_cache, monkeypatch):
    """The kernel, built at most once for this module (in its own cache)."""
    monkeypatch.setenv("AGORA_NATIVE_CACHE", str(shared_cache))
    monkeypatch.setenv("AGORA_NATIVE", "1")
    monkeypatch.setattr(native, "_loaded", {})


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty kernel cache of this test's own, and no kernel loaded yet."""
    monkeypatch.setenv("AGORA_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setenv("AGORA_NATIVE", "1")
    monkeypatch.setattr(native, "_loaded", {})
    return tmp_path / "native"


def _reference(logits, log_w):
    lp = torch.stack([torch.log_softmax(x.double(), -1) for x in logits])
    mixed = torch.logsumexp(lp + log_w.double()[:, :, None], dim=0)
    return mixed.clamp_min(math.log(torch.finfo(torch.float32).tiny))


def _torch_path(logits, log_w, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("AGORA_NATIVE", "0")
        return log_mix(logits, log_w), log_mix(iter(logits), log_w)


@needs_cc
def test_kernel_is_built_once_into_the_cache_and_reused(fresh_native, monkeypatch):
    kernel = native.logmix()
    assert kernel is not None
    built = list(fresh_native.glob("logmix-*.so"))
    assert built == [kernel.path]
    stamp = kernel.path.stat().st_mtime_ns
    # another process (a fresh load) finds the built library and compiles nothing
    monkeypatch.setattr(native, "_loaded", {})
    version = native._compiler_version(native._compiler() or "cc")
    assert version
    monkeypatch.setattr(native, "_compiler_version", lambda cc: version)

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    again = native.logmix()
    assert again is not None
    assert again.path == kernel.path
    assert kernel.path.stat().st_mtime_ns == stamp
    assert not list(fresh_native.glob(".logmix-*"))  # no temp file left behind


@needs_cc
@pytest.mark.parametrize("V", [1, 7, 8, 9, 16, 37, 1000, 4099])
def test_native_matches_the_float64_reference_at_every_row_length(native_on, V):
    g = torch.Generator().manual_seed(V)
    N = 11
    logits = [torch.randn(N, V, generator=g) * s for s in (1.0, 4.0, 12.0)]
    log_w = torch.log_softmax(torch.randn(3, N, generator=g), dim=0)
    want = _reference(logits, log_w)
    assert native.logmix() is not None
    for got in (log_mix(logits, log_w), log_mix(iter(logits), log_w)):
        # a few float32 ulps of the largest magnitudes (log-probs down to ~-80)
        assert (got.double() - want).abs().max().item() < 2e-5
        # and relative to each value's own size
        assert ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item() < 1e-6


@needs_cc
def test_native_edge_rows_behave_like_the_torch_path(native_on, monkeypatch):
    g = torch.Generator().manual_seed(3)
    N, V = 10, 45
    xs = [torch.randn(N, V, generator=g) * 3 for _ in range(3)]
    xs[0][0, 3] = float("nan")  # NaN logit: that row is NaN
    xs[1][1, 2] = float("inf")  # +inf logit: NaN (as log_softmax)
    xs[2][2, :] = float("-inf")  # nothing possible on one path: NaN
    xs[0][3, :] = float("-inf")
    xs[0][3, 5] = 2.0  # one possible token on path 0
    xs[1][4] += 1000.0  # unshifted exps would overflow: shifted path
    xs[2][5] -= 1000.0  # unshifted exps underflow (s < 1): shifted path
    xs[1][8, :40] = -200.0  # far-below values next to ordinary ones (clamped exps)
    log_w = torch.log_softmax(torch.randn(3, N, generator=g), dim=0)
    log_w[1, 6] = float("-inf")  # weight 0
    log_w[:, 7] = torch.tensor([0.0, float("-inf"), float("-inf")])  # one path only
    want_all, want_iter = _torch_path(xs, log_w, monkeypatch)
    assert native.logmix() is not None
    got_all, got_iter = log_mix(xs, log_w), log_mix(iter(xs), log_w)
    for got, want in ((got_all, want_all), (got_iter, want_iter)):
        assert torch.equal(got.isnan(), want.isnan())
        assert got.isnan().all(1).tolist() == [True, True, True] + [False] * 7
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    ref = _reference(xs, log_w)
    ok = ~ref.isnan()
    assert (got_all[ok].double() - ref[ok]).abs().max().item() < 2e-5
    # row 3: path 0 puts all its mass on token 5
    assert got_all[3, 5].exp() >= log_w[0, 3].exp() - 1e-6


@needs_cc
def test_log_mix_uses_the_kernel_for_float32_and_torch_for_other_dtypes(native_on, monkeypatch):
    kernel = native.logmix()
    assert kernel is not None
    bound = []
    real_bind = kernel.bind

    def spy(*args, **kwargs):
        bound.append(kwargs)
        return real_bind(*args, **kwargs)

    monkeypatch.setattr(kernel, "bind", spy)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 50, generator=g) for _ in range(2)]
    log_w = torch.log_softmax(torch.randn(2, 6, generator=g), dim=0)
    log_mix(xs, log_w)
    assert bound == [{"accumulate": False, "finish": True}]
    bound.clear()
    log_mix(iter(xs), log_w)  # one path at a time: accumulate, then finish
    assert bound == [{"accumulate": False, "finish": False}, {"accumulate": True, "finish": True}]
    bound.clear()
    halves = [x.to(torch.bfloat16) for x in xs]
    got = log_mix(halves, log_w)
    assert bound == []
    torch.testing.assert_close(got, _reference(halves, log_w).float(), rtol=1e-5, atol=1e-5)


@needs_cc
def test_concurrent_callers_get_the_same_result(native_on):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 300, generator=g) * 4 for _ in range(4)]
    log_w = torch.log_softmax(torch.randn(4, 64, generator=g), dim=0)
    assert native.logmix() is not None
    want = log_mix(xs, log_w)
    results: list[torch.Tensor] = []

    def call() -> None:
        results.append(log_mix(xs, log_w))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert all(torch.equal(r, want) for r in results)


def test_without_a_compiler_log_mix_falls_back_and_says_why(fresh_native, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    caplog.set_level(logging.WARNING, logger="modelcore.native")
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(5, 20, generator=g) for _ in range(2)]
    log_w = torch.log_softmax(torch.randn(2, 5, generator=g), dim=0)
    got = log_mix(xs, log_w)
    torch.testing.assert_close(got, _reference(xs, log_w).float(), rtol=1e-5, atol=1e-5)
    assert native.logmix() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # said once, not per call
    assert "no C compiler" in warnings[0]
    assert not fresh_native.exists() or not list(fresh_native.iterdir())


@needs_cc
def test_a_source_that_does_not_compile_leaves_nothing_and_reports_the_error(
    fresh_native, tmp_path
):
    bad = tmp_path / "broken.c"
    bad.write_text("int f( {\n")
    with pytest.raises(RuntimeError, match=r"could not compile broken\.c"):
        native.build(bad)
    assert not fresh_native.exists() or not list(fresh_native.iterdir())


def test_agora_native_0_turns_it_off(fresh_native, monkeypatch):
    monkeypatch.setenv("AGORA_NATIVE", "0")
    assert native.logmix() is None
    assert not fresh_native.exists()


def test_binding_checks_layouts(native_on):
    kernel = native.logmix()
    if kernel is None:
        pytest.skip("no C compiler here")
    x = torch.randn(4, 10)
    w = torch.ones(4, 1)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernel.bind([x.t().contiguous().t()], w, torch.empty(4, 10), accumulate=False, finish=True)
    with pytest.raises(ValueError, match="agree"):
        kernel.bind([x], torch.ones(4, 2), torch.empty(4, 10), accumulate=False, finish=True)
    mixer = kernel.bind([x], w, torch.empty(4, 10), accumulate=False, finish=True)
    with pytest.raises(ValueError, match="scratch"):
        mixer.run(0, 4, torch.empty(5))
    assert ensemble._NATIVE_BLOCK_ROWS >= 1
