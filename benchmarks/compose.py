"""Composition benchmarks; every baseline is measured in the same run, ratios printed.

1. ensemble: the batched ensemble of k = 2, 4, 8 experts (one forward, stacked expert
   weights routed by path through the grouped matmul) vs k separate forward passes of
   base + expert j (insert, forward, remove), in target log-likelihoods per second;
2. average: merging 8 expert files of ~16M parameters each, streamed from safetensors,
   as a ratio to a plain memcpy of the same bytes (goal >= 0.4x), next to the naive
   per-parameter loop over fully loaded state dicts (~0.07x expected);
3. log-mix: mixing 4 logit tensors (2048 x vocab) into the mixture's log-distribution,
   as a ratio to one read pass over the 4 tensors (``x.sum()`` of each, torch's default
   threads; goal <= 2x), next to the stacked ``logsumexp(stack(log_softmax))``.

    .venv/bin/python benchmarks/compose.py [--device cuda] [--only ensemble,average,logmix]
        [--rounds 7]

For averaging and log-mix the baseline and the candidates run in turns (one call of each
per round, ``--rounds`` rounds after a warm-up round) and each is reported as the median
of its rounds, so a change in the machine's load hits all of them alike. Nothing here
asserts a time; the machine's load average is printed before and after the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import bench, fmt_x, header, row, sync


def in_turns(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds of one call each, in turns,
    after one warm-up round."""
    return {k: statistics.median(v) for k, v in rounds_in_turns(fns, device, rounds).items()}


def rounds_in_turns(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int
) -> dict[str, list[float]]:
    """Seconds of each function in each of ``rounds`` rounds (one call each, in turns),
    after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of one function's time over the baseline's in the same round: a
    neighbour that slows the shared machine for a while slows both sides of a pair."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def best_of(fn: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_ensemble(device: torch.device) -> None:
    from modelcore.compose.ensemble import ExpertEnsemble
    from modelcore.compose.mixture import mixture
    from modelcore.config import ModelConfig
    from modelcore.experts import add_modules, extract_expert, remove_modules
    from modelcore.model import ModularLM

    torch.manual_seed(0)
    config = ModelConfig.from_name("small")
    model = ModularLM(config, device=device).eval()
    B, T = (4, 256) if device.type == "cpu" else (16, 512)
    batch = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
    experts = []
    for s in range(8):
        idx = add_modules(model, generator=torch.Generator().manual_seed(s))
        experts.append(extract_expert(model, idx))
        remove_modules(model, idx)

    def separate(k: int) -> None:
        for e in experts[:k]:
            with mixture(model, [e]):
                logits = model(batch[:, :-1], aux="none").logits.float()
                logits.gather(-1, batch[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)

    print(f"\n## ensemble: preset small, B={B}, T={T}, log-likelihoods of every path")
    widths = [3, 14, 14, 10, 12]
    print(row(["k", "separate tok/s", "batched tok/s", "ratio", "stack ms"], widths))
    with torch.no_grad():
        for k in (2, 4, 8):
            t0 = time.perf_counter()
            # k expert paths, compared with k separate passes (no base path here)
            ens = ExpertEnsemble(model, experts[:k], include_base=False)
            stack = time.perf_counter() - t0
            t_sep = bench(lambda k=k: separate(k), device, warmup=1, reps=3)
            t_bat = bench(lambda ens=ens: ens.log_likelihoods(batch), device, warmup=1, reps=3)
            tokens = k * B * T
            print(
                row(
                    [
                        k,
                        f"{tokens / t_sep:,.0f}",
                        f"{tokens / t_bat:,.0f}",
                        fmt_x(t_sep / t_bat),
                        f"{stack * 1e3:.1f}",
                    ],
                    widths,
                )
            )


def bench_average(workdir: Path, rounds: int) -> None:
    from safetensors.torch import load_file

    from modelcore.compose.merge import merge_files
    from modelcore.config import ModelConfig
    from modelcore.experts import expert_schema, save_expert

    # 4 layers of MoLM-4B-K2's module widths (D 1024, F 2048, R 256): 16.8M parameters.
    config = ModelConfig.from_name("molm_4b_k2").replace(n_layers=4)
    shapes = {t["name"]: t["shape"] for t in expert_schema(config)["tensors"]}
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        tensors = {n: torch.randn(*s, generator=g) * 0.02 for n, s in shapes.items()}
        paths.append(workdir / f"expert{i}.safetensors")
        save_expert(paths[-1], tensors, base_revision="ab" * 32)
    in_bytes = 8 * n_params * 4
    cpu = torch.device("cpu")
    # The baseline: one plain copy of the same number of bytes between two buffers in
    # memory (torch's default threads), as the issue states it.
    src = torch.ones(in_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def naive() -> None:
        # Every file loaded whole, then a Python loop over parameters summing full tensors.
        states = [load_file(str(p)) for p in paths]
        out = {}
        for name in states[0]:
            acc = states[0][name].clone()
            for s in states[1:]:
                acc = acc + s[name]
            out[name] = acc / len(states)

    def merged(method: str, **kw: Any) -> Callable[[], None]:
        # A fresh output path each time: replacing an existing 64 MiB file makes the
        # rename unlink it (50 ms here), which is not the merge's cost.
        def run() -> None:
            out = workdir / "merged.safetensors"
            out.unlink(missing_ok=True)
            merge_files(paths, out, method, **kw)

        return run

    print(f"\n## average: 8 experts x {n_params / 1e6:.1f}M params ({in_bytes / 2**20:.0f} MiB)")
    print(f"# before: {load()}; median of {rounds} rounds in turns (slow ones: 1-2 runs)")
    t = in_turns(
        {
            "copy": lambda: dst.copy_(src),
            "uniform": merged("uniform"),
            "weighted": merged("weighted", weights=range(1, 9)),
        },
        cpu,
        rounds,
    )
    t_copy, t_uniform, t_weighted = t["copy"], t["uniform"], t["weighted"]
    t_ties = best_of(merged("ties"), cpu, reps=2)
    t_naive = best_of(naive, cpu, reps=1)
    print(f"# after: {load()}")
    widths = [26, 10, 10, 14]
    print(row(["method", "seconds", "GB/s", "vs memcpy"], widths))
    for name, sec in (
        ("memcpy of the same bytes", t_copy),
        ("uniform (streamed)", t_uniform),
        ("weighted (streamed)", t_weighted),
        ("ties density 0.2", t_ties),
        ("naive per-parameter loop", t_naive),
    ):
        print(row([name, f"{sec:.3f}", f"{in_bytes / sec / 1e9:.2f}", fmt_x(t_copy / sec)], widths))


def bench_logmix(device: torch.device, vocab: int, rounds: int) -> None:
    from modelcore import native
    from modelcore.compose.ensemble import log_mix

    torch.manual_seed(0)
    N, P = 2048, 4
    logits = [torch.randn(N, vocab, device=device) * 3 for _ in range(P)]
    log_w = torch.log_softmax(torch.randn(P, N, device=device), dim=0)

    def read() -> None:
        for x in logits:
            x.sum()

    def stacked() -> torch.Tensor:
        lp = torch.stack([torch.log_softmax(x, -1) for x in logits])
        return torch.logsumexp(lp + log_w[:, :, None], dim=0)

    out = torch.empty(N, vocab, device=device)  # reused, as a distillation loop would
    gib = P * N * vocab * 4 / 2**30
    print(f"\n## log-mix: {P} x ({N} x {vocab}) float32 logits ({gib:.2f} GiB)")
    print(f"# before: {load()}; median of {rounds} rounds in turns (stacked: best of 2)")
    raw = rounds_in_turns(
        {
            "read": read,
            "list_out": lambda: log_mix(logits, log_w, out=out),
            "list_new": lambda: log_mix(logits, log_w),
            "iter_out": lambda: log_mix(iter(logits), log_w, out=out),
        },
        device,
        rounds,
    )
    t = {k: statistics.median(v) for k, v in raw.items()}
    t_stack = best_of(stacked, device, reps=2)
    print(f"# after: {load()}")
    if device.type == "cpu":
        kernel = native.logmix()
        print(f"# CPU kernel: {kernel.path if kernel else 'none (torch ops)'}")
    widths = [44, 10, 12]
    print(row(["", "ms", "vs one read"], widths))
    print(row(["one read pass (sum of each)", f"{t['read'] * 1e3:.1f}", fmt_x(1.0)], widths))
    for name, key in (
        ("log_mix, all 4 at hand, into a given out", "list_out"),
        ("log_mix, all 4 at hand, fresh output", "list_new"),
        ("log_mix, one at a time (accumulator), out", "iter_out"),
    ):
        ratio = paired_ratio(raw[key], raw["read"])
        print(row([name, f"{t[key] * 1e3:.1f}", fmt_x(ratio)], widths))
    stack_x = fmt_x(t_stack / t["read"])
    print(row(["stack + logsumexp(log_softmax)", f"{t_stack * 1e3:.1f}", stack_x], widths))
    print("# ms: median over rounds; vs one read: median over rounds of the ratio to that")
    print("# round's read pass (the stacked version: best of 2 over the median read)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="ensemble,average,logmix")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the in-turn timings")
    args = parser.parse_args()
    device = torch.device(args.device)
    header("composition benchmarks", device)
    print(f"# torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    only = set(args.only.split(","))
    if "ensemble" in only:
        bench_ensemble(device)
    if "average" in only:
        with tempfile.TemporaryDirectory() as tmp:
            bench_average(Path(tmp), args.rounds)
    if "logmix" in only:
        bench_logmix(device, args.vocab, args.rounds)


if __name__ == "__main__":
    main()
