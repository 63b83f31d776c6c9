"""Print the composition claims per seed, with the numbers the tests assert on:

    .venv/bin/python -m modelcore.compose.report [--seeds 0 1 2] [--json]
    .venv/bin/python -m modelcore.compose.report --harm [--seeds 0 1 2] [--json]

The first: the DEMix-setting claims (same setup as tests/modelcore/compose/test_learning.py).
``--harm``: the harm table (``modelcore.compose.harm``): every method's change against
the base on every domain, inside and outside its composition, seen and unseen domains,
with the CLI's defaults (what tests/modelcore/compose/test_harm.py asserts). Minutes per
seed on a CPU.
"""

from __future__ import annotations

import argparse
import json

import torch

from modelcore.compose import experiments as cx
from modelcore.compose import harm
from modelcore.compose.distill import DistillSettings, distill
from modelcore.compose.ensemble import ExpertEnsemble, estimate_prior
from modelcore.compose.evaluate import evaluate_composition, posterior_by_position
from modelcore.eval import evaluate
from modelcore.train import experiments as ex
from modelcore.train import recipes


def run_seed(setup: cx.ComposeSetup, prep: ex.Prepared, seed: int) -> dict:
    base = cx.train_base(setup, prep, seed)
    experts = {d: cx.train_domain_expert(setup, prep, base, d, seed) for d in cx.EXPERT_DOMAINS}
    texts = {d: prep.heldout[d] for d in (*cx.EXPERT_DOMAINS, *cx.BASE_DOMAINS)}
    texts["mixed"] = cx.mixed_heldout(prep, cx.EXPERT_DOMAINS)
    kw = {"seq_len": setup.eval_seq_len, "batch_size": 32}
    rows = {"base": cx.bpb(evaluate(base, prep.tokenizer, texts, **kw))}
    for d, e in experts.items():
        rows[d] = cx.bpb(evaluate_composition(base, prep.tokenizer, texts, [e], **kw))
    for method in ("mixture", "ensemble", "average"):
        res = evaluate_composition(
            base, prep.tokenizer, texts, list(experts.values()), method, **kw
        )
        rows[method] = cx.bpb(res)
    both, rest = list(experts.values()), [experts["python_docs"]]
    for name, chosen, with_base in (
        ("ensemble (experts only)", both, False),
        ("ensemble - licenses", rest, True),
    ):
        res = evaluate_composition(
            base, prep.tokenizer, texts, chosen, "ensemble", include_base=with_base, **kw
        )
        rows[name] = cx.bpb(res)
    ens = ExpertEnsemble(base, list(experts.values()))
    posterior = {}
    for j, d in enumerate(experts):
        for how in ("mean", "median"):
            trace = posterior_by_position(
                ens, prep.tokenizer, prep.heldout[d], seq_len=128, reduce=how
            )
            posterior[f"{d} ({how})"] = {
                t: round(float(trace[j, t]), 3) for t in (0, 8, 16, 32, 64, 127)
            }
    domain = "licenses"

    def make():
        return cx.batches(setup, prep, prep.corpus.domains[domain].train, seed + 5000)

    prior = estimate_prior(ens, make(), n_sequences=16)
    settings = DistillSettings(steps=setup.distill_steps, lr=setup.distill_lr, seed=seed)
    result = distill(base, ens, make, prior, settings)
    student = cx.bpb(
        evaluate_composition(
            base, prep.tokenizer, {domain: texts[domain]}, [result.expert_tensors()], **kw
        )
    )[domain]
    gain_ens = rows["base"][domain] - rows["ensemble"][domain]
    return {
        "seed": seed,
        "bits_per_byte": rows,
        "posterior_on_own_expert_by_position": posterior,
        "distill": {
            "domain": domain,
            "student_bpb": student,
            "recovered": (rows["base"][domain] - student) / gain_ens,
            "kl_first": result.kl[0],
            "kl_last": result.kl[-1],
        },
    }


def harm_main(seeds: list[int], as_json: bool) -> None:
    setup = harm.HarmSetup()
    data = harm.prepare(setup, cache_dir=recipes.default_cache_dir())
    reports = []
    for seed in seeds:
        report = harm.run_seed(setup, data, seed)
        reports.append(report)
        if not as_json:
            print(f"seed {seed}: bits/byte (change vs base; * = the composition's own domain)")
            print(harm.format_table(report))
            print("general share (held-out general text, per layer):", report["general_share"])
            print()
    if as_json:
        print(json.dumps(reports, indent=1))
        return
    print(harm.format_summary(reports))


def main() -> None:
    parser = argparse.ArgumentParser(description="composition claims per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--harm", action="store_true", help="the harm table instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.harm:
        harm_main(args.seeds, args.json)
        return
    setup = cx.ComposeSetup()
    prep = ex.prepare(setup.inner)
    reports = [run_seed(setup, prep, s) for s in args.seeds]
    if args.json:
        print(json.dumps(reports, indent=1))
        return
    for r in reports:
        b = r["bits_per_byte"]
        print(f"seed {r['seed']}")
        domains = list(b["base"])
        print("  " + " " * 26 + "".join(f"{d[:12]:>13}" for d in domains))
        for name, row in b.items():
            print(f"  {name:<26}" + "".join(f"{row[d]:>13.4f}" for d in domains))
        print("  change against the base (every domain, inside and outside the composition):")
        for name, row in b.items():
            if name != "base":
                cells = "".join(f"{100 * (row[d] / b['base'][d] - 1):>+12.2f}%" for d in domains)
                print(f"  {name:<26}" + cells)
        print(f"  posterior on own expert by position: {r['posterior_on_own_expert_by_position']}")
        dd = r["distill"]
        print(
            f"  distilled {dd['domain']} expert: {dd['student_bpb']:.4f} bpb, "
            f"{100 * dd['recovered']:.0f}% of the ensemble's gain; KL {dd['kl_first']:.3f} -> "
            f"{dd['kl_last']:.3f}"
        )


if __name__ == "__main__":
    main()
