"""Experts of some MoE layers only: step time, trained parameters and file size by the
layers an expert covers (docs/composition.md, "Experts in some layers only").

An untrained base of the given preset (the numbers do not depend on its weights);
``train_expert`` runs the same batches for each layer set, in turns (one run of each per
round, ``--rounds`` rounds after a warm-up round that also writes each expert file), and
each is reported as the median of its rounds. Nothing here asserts a time; the load
average is printed before and after.

    .venv/bin/python benchmarks/expert_layers.py [--preset small] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from modelcore import experts as ops
from modelcore.config import ModelConfig
from modelcore.model import ModularLM
from modelcore.train import train_expert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.preset).replace(max_seq_len=128)
    model = ModularLM(config)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, config.vocab_size, (8, 129), generator=g)

    n = config.n_layers
    sets: list[list[int] | None] = [None, [n - 1], [n - 2, n - 1], [0]]
    times: list[list[float]] = [[] for _ in sets]
    info: list[tuple[list[int], int, int]] = []
    print(f"load average before: {os.getloadavg()}")
    for r in range(args.rounds + 1):
        for i, layers in enumerate(sets):
            t0 = time.perf_counter()
            res = train_expert(
                model, batches(), args.steps, progress=False, layers=layers, calibrate=0
            )
            step = (time.perf_counter() - t0) / args.steps
            ops.remove_modules(model, res.module_idx)
            if r > 0:
                times[i].append(step)
                continue
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "expert.safetensors")
                ops.save_expert(path, res.tensors, base_revision="0" * 64)
                info.append((res.layers, res.trainable_parameters, os.path.getsize(path)))
    full_time = statistics.median(times[0])
    full_n, full_size = info[0][1], info[0][2]
    print(f"{args.preset}, {args.steps} steps of 8 x 128 tokens, {args.threads} thread(s)")
    print(f"{'layers':>14} | {'ms/step':>8} | {'vs all':>6} | {'trained':>9} | {'file bytes':>10}")
    for i in range(len(sets)):
        layers, n_params, size = info[i]
        t = statistics.median(times[i])
        print(
            f"{layers!s:>14} | {t * 1e3:8.0f} | {t / full_time:5.2f}x | "
            f"{n_params / full_n:8.2f}x | {size:10,} ({size / full_size:.2f}x)"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
