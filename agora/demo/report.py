"""What the demo prints: the table of bits per byte and the forgetting check, in plain
text at most 80 columns wide (docs/demo.md shows a run), or the same as JSON."""

from __future__ import annotations

import textwrap
from typing import Any

from agora.demo.flow import Forgetting, Outcome
from registry.protocol import AVERAGE, DISTILL, ENSEMBLE, MIXTURE


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def names_by_id(outcome: Outcome) -> dict[str, str]:
    return {p.expert_id: p.expert.name for p in outcome.published}


def table(outcome: Outcome) -> str:
    names = names_by_id(outcome)
    lines = [
        "Bits per byte on each domain's evaluation text (held out from training, search",
        "and composition; lower is better). Best single: the best of the experts search",
        "found, each alone with the base.",
        "",
        f"{'domain':<16}{'base':>7}  {'best single':<21}{ENSEMBLE.name:>9}{AVERAGE.name:>9}"
        f"{'distilled':>11}",
    ]
    for run in outcome.domains:
        best = names.get(run.best_single or "", run.best_single or "")
        single = f"{_f(run.scores.get('best'))} {best}"[:20]
        lines.append(
            f"{run.domain:<16}{_f(run.base):>7}  {single:<21}"
            f"{_f(run.scores.get(ENSEMBLE.name)):>9}{_f(run.scores.get(AVERAGE.name)):>9}"
            f"{_f(run.scores.get(DISTILL.name)):>11}"
        )
    if outcome.unlabeled:
        lines += textwrap.wrap(
            f"{' and '.join(outcome.unlabeled)}: pooled as unlabelled text; their experts "
            "are the clusters domain discovery found in it.",
            width=80,
        )
    return "\n".join(lines)


def forgetting_summary(f: Forgetting) -> dict[str, Any]:
    """Per report: the disabled expert's own samples with it, without it and the base, and
    the largest change on any other expert's samples."""
    rows = []
    for r in f.reports:
        d = r.domain
        others = [abs(o.change) for o in r.others.values() if o.change is not None]
        rows.append(
            {
                "composition_id": r.composition_id,
                "method": r.method,
                "status": r.status,
                "error": r.error,
                "with": d.with_ if d else None,
                "without": d.without if d else None,
                "base": d.base if d else None,
                "others_max_change": max(others) if others else None,
                "others": len(r.others),
            }
        )
    return {
        "expert_id": f.expert_id,
        "domain": f.name,
        "moderation_action": f.action_id,
        "found_by_search_after": f.still_found,
        "restored": f.restored,
        "reused": f.reused,
        "reports": rows,
    }


def forgetting_text(outcome: Outcome) -> str:
    f = outcome.forgetting
    assert f is not None
    summary = forgetting_summary(f)
    lines = [
        *textwrap.wrap(
            f"Forgetting: the {f.name} expert {f.expert_id} disabled (moderation action "
            f"{f.action_id}). The registry measured each composition that used it, with and "
            "without it, on its own samples, and on every other expert's samples (largest "
            "change shown).",
            width=80,
        ),
        "",
        f"{'measured':<26}{'with':>8}{'without':>9}{'base':>8}{'others max':>12}",
    ]
    order = {ENSEMBLE.name: 0, AVERAGE.name: 1, DISTILL.name: 2, MIXTURE.name: 3}
    rows = sorted(
        summary["reports"],
        key=lambda r: (
            r["composition_id"] is None,
            order.get(r["method"], 9),
            r["composition_id"] or "",
        ),
    )
    for row in rows:
        what = (
            f"{row['method']} {row['composition_id'][:16]}"
            if row["composition_id"]
            else "the expert alone"
        )
        if row["status"] != "ready":
            lines.append(f"{what:<26}  {row['status']}: {row['error'] or ''}"[:80])
            continue
        lines.append(
            f"{what:<26}{_f(row['with']):>8}{_f(row['without']):>9}{_f(row['base']):>8}"
            f"{_f(row['others_max_change']):>12}"
        )
    ready = [r for r in summary["reports"] if r["status"] == "ready" and r["base"] is not None]
    alone = [r for r in ready if r["composition_id"] is None]
    composed = [r for r in ready if r["composition_id"] is not None]
    lines.append("")
    if alone:
        r = alone[0]
        same = "exactly the base" if r["without"] == r["base"] else "not the base (unexpected)"
        lines.append(f"Alone: without it the model is {same} ({_f(r['without'])}).")
    if composed:
        worth = max(r["without"] - r["with"] for r in composed)
        back = max(r["base"] - r["without"] for r in composed)
        moved = max((r["others_max_change"] or 0.0) for r in composed)
        lines += textwrap.wrap(
            f"In its compositions it was worth up to {worth:.3f} bits/byte on its own text; "
            f"without it they are at most {back:.3f} better than the base there, and the "
            f"other experts' text moved at most {moved:.3f}.",
            width=80,
        )
    own = next((run for run in outcome.domains if run.domain == f.name), None)
    others = {
        names_by_id(outcome).get(c.split(":", 1)[1], c): v
        for c, v in (own.scores.items() if own else ())
        if c.startswith("single:") and c.split(":", 1)[1] != f.expert_id
    }
    if own is not None and others and own.base is not None:
        shown = ", ".join(f"{name} {value:.3f}" for name, value in others.items())
        lines += textwrap.wrap(
            f"The other experts alone on {f.name} evaluation text: {shown} (the base "
            f"{own.base:.3f}). What they know of it stays until they are removed too.",
            width=80,
        )
    lines.append(
        "Search for its text now "
        + ("still finds it (unexpected)." if f.still_found else "no longer finds it.")
    )
    if f.reused:
        lines.append(
            f"Read back from moderation action {f.action_id} of an earlier run, which measured "
            "these same compositions (--forget-again measures anew)."
        )
    elif f.restored:
        lines.append("Enabled again afterwards (--keep-disabled leaves it disabled).")
    return "\n".join(lines)


def as_json(outcome: Outcome, timings: dict[str, float]) -> dict[str, Any]:
    names = names_by_id(outcome)
    return {
        "base_revision": outcome.revision,
        "unlabeled": outcome.unlabeled,
        "experts": [
            {
                "id": p.expert_id,
                "name": p.expert.name,
                "kind": p.expert.kind,
                "status": p.status,
                "license": p.expert.license,
                "cached": p.expert.cached,
                "arrival_bits_per_byte": p.arrival_bpb,
                "arrival_base_bits_per_byte": p.arrival_base_bpb,
            }
            for p in outcome.published
        ],
        "domains": {
            run.domain: {
                "found": [
                    {"expert_id": e, "name": names.get(e), "weight": w} for e, w in run.found
                ],
                "compositions": run.compositions,
                "base": run.base,
                "best_single": run.scores.get("best"),
                "best_single_expert": run.best_single,
                ENSEMBLE.name: run.scores.get(ENSEMBLE.name),
                AVERAGE.name: run.scores.get(AVERAGE.name),
                DISTILL.name: run.scores.get(DISTILL.name),
                "singles": {
                    c.split(":", 1)[1]: v for c, v in run.scores.items() if c.startswith("single:")
                },
            }
            for run in outcome.domains
        },
        "forgetting": forgetting_summary(outcome.forgetting) if outcome.forgetting else None,
        "notes": outcome.notes,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
