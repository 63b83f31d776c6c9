"""Print the results table of the empirical claims (docs/training.md), three seeds.

    python -m modelcore.train.report [--seeds 0 1 2] [--json out.json]

Runs ``experiments.run_seed`` for each seed with the default ``experiments.Setup`` (the
same code and settings the tests in tests/modelcore/train assert on) and prints one
markdown table row per seed, the mean, and the margins the tests require.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from modelcore.train import experiments as ex

COLUMNS = (
    ("seed", "seed"),
    ("D base", "base bpb on D"),
    ("gain expert", "D: base - (base + expert), no routing reg"),
    ("gain expert+reg", "same, expert trained with routing reg"),
    ("gain full FT", "D: base - base finetuned on D"),
    ("others Δ expert", "other domains' mean bpb rise, expert without routing reg"),
    ("others Δ expert+reg", "same, expert with routing reg"),
    ("others Δ full FT", "same, whole base finetuned on D"),
    ("H usage MI", "normalised entropy of module usage, MI loss"),
    ("H usage none", "same, no aux loss"),
    ("kept", "FFN modules kept after pruning"),
    ("D conc.", "bpb on D after concentration finetuning"),
    ("D conc.+pruned", "... and pruning"),
    ("prune Δ (conc.)", "pruning's cost after concentration"),
    ("prune Δ (base)", "pruning's cost on the base, no concentration"),
)


def row(r: ex.SeedReport) -> list[float]:
    ins, pr = r.insertion, r.prune
    return [
        r.seed,
        ins.base[ins.domain],
        ins.domain_gain,
        ins.domain_gain_reg,
        ins.domain_gain_full,
        ins.other_rise_expert,
        ins.other_rise_reg,
        ins.other_rise_full,
        r.entropy_mi,
        r.entropy_none,
        pr.kept_fraction,
        pr.concentrated,
        pr.pruned,
        pr.rise,
        pr.base_rise,
    ]


def markdown(rows: list[list[float]]) -> str:
    def fmt(values: list[float], label: str | None = None) -> str:
        cells = [label if label is not None else str(int(values[0]))]
        cells += [f"{v:+.4f}" if "Δ" in name or "gain" in name else f"{v:.4f}"
                  for (name, _), v in zip(COLUMNS[1:], values[1:], strict=True)]  # fmt: skip
        return "| " + " | ".join(cells) + " |"

    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    mean = [sum(col) / len(col) for col in zip(*rows, strict=True)]
    return "\n".join([head, rule, *(fmt(r) for r in rows), fmt(mean, "mean")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = ex.Setup()
    started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    prep = ex.prepare(setup)
    reports = []
    for seed in args.seeds:
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        reports.append(ex.run_seed(setup, prep, seed))
    wall = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
    print(markdown([row(r) for r in reports]))
    print()
    print(f"domain D = {setup.domain}; setup: {ex.Setup()}")
    print(
        f"margins asserted per seed: gain expert >= {ex.MIN_EXPERT_GAIN}; others Δ full FT - "
        f"others Δ expert+reg >= {ex.MIN_FORGETTING_GAP}; H usage MI - H usage none >= "
        f"{ex.MIN_ENTROPY_GAP}; kept <= {ex.MAX_KEPT_FRACTION}; prune Δ (conc.) <= "
        f"{ex.MAX_PRUNE_RISE}; prune Δ (base) - prune Δ (conc.) >= 0, and >= "
        f"{ex.MIN_CONCENTRATION_BENEFIT} in the mean over seeds"
    )
    print(f"{len(args.seeds)} seeds in {wall:.0f}s wall, {cpu:.0f}s CPU, {args.threads} thread(s)")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
