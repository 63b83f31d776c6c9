"""The expert a composition produces (``MethodSpec.produces_expert``: average, distill):
the datasheet the registry writes for it from its parents' datasheets (name, domain,
license, sources, samples, lineage) and its ``expert_parents`` rows.

Completion (``registry.services.completion``) calls these between checking the worker's
result and recording the new version; the parents are re-checked there, so an expert
disabled since the request withdraws the output too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from sqlalchemy.orm import Session

from registry.db.models import ExpertParent, Job
from registry.protocol import METHOD_SPECS
from registry.services.compositions import ResolvedExpert, interleave, resolve_expert
from registry.validation import parse_datasheet
from registry.validation.datasheet import Datasheet

# A derived expert's datasheet quotes its parents' samples up to this many bytes (the
# datasheet limit on samples is 64 KiB).
DERIVED_SAMPLES_BYTES = 48 * 1024


def _license(licenses: Sequence[str]) -> str:
    """The parents' common license, else their conjunction. SPDX's AND binds tighter than
    OR and the datasheet grammar has no parentheses, so a parent with an OR expression
    makes the conjunction inexpressible: the result is then a LicenseRef the datasheet's
    body spells out."""
    unique = sorted(set(licenses))
    if len(unique) == 1:
        return unique[0]
    if any(" OR " in lic for lic in unique):
        return "LicenseRef-agora-combined"
    return " AND ".join(unique)


def _union(values: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in values:
        for v in group:
            seen.setdefault(str(v), None)
    return list(seen)


def derived_datasheet(
    *,
    job: Job,
    parents: Sequence[ResolvedExpert],
    weights: Sequence[float] | None,
    created_by: str,
) -> bytes:
    """The datasheet of an averaged or distilled expert, from its parents' datasheets."""
    method = job.payload["method"]
    verb = METHOD_SPECS[method].derived_name
    if verb is None:
        raise ValueError(f"{method} produces no expert")
    sheets: list[Datasheet] = [
        parse_datasheet(p.version.datasheet.encode("utf-8"), max_bytes=1 << 30) for p in parents
    ]
    names = [str(s.name) for s in sheets]
    samples = interleave([s.samples for s in sheets], DERIVED_SAMPLES_BYTES)
    parent_list = "; ".join(
        f"{p.expert.id} v{p.version.version} ({n})" for p, n in zip(parents, names, strict=True)
    )
    front: dict[str, Any] = {
        "name": f"{verb} of {' + '.join(names)}"[:200],
        "domain": (
            f"{verb} of {len(parents)} experts. " + " | ".join(str(s.domain) for s in sheets)
        )[:4000],
        "license": _license([str(s.license) for s in sheets]),
        "language": _union([list(s.language) for s in sheets]),
        "sources": [
            {
                "name": f"expert {p.expert.id} v{p.version.version}: {n}"[:200],
                "description": f"the parent expert's own sources, per its datasheet"
                f" (license {s.license})",
                "license": str(s.license),
            }
            for p, n, s in zip(parents, names, sheets, strict=True)
        ],
        "collection": (
            f"Computed by Agora job {job.id} ({method}, params "
            f"{yaml.safe_dump(job.payload.get('params', {}), default_flow_style=True).strip()}) "
            f"from the weights of {parent_list}."
        )[:4000],
        "token_count": sum(int(s.token_count) for s in sheets),
        "pii_handling": (
            "Inherited from the parents: "
            + " | ".join(f"{n}: {s.pii_handling}" for n, s in zip(names, sheets, strict=True))
        )[:4000],
        "intended_uses": _union([list(s.intended_uses) for s in sheets]),
        "out_of_scope_uses": _union([list(s.out_of_scope_uses) for s in sheets]) or None,
        "contact": f"{created_by} (Agora account that requested the composition)",
        "samples": samples,
        "parents": [
            {
                "expert_id": p.expert.id,
                "version": p.version.version,
                **({"weight": float(weights[i])} if weights is not None else {}),
            }
            for i, p in enumerate(parents)
        ],
        "tags": _union([list(s.tags) for s in sheets] + [["derived", method]]),
    }
    front = {k: v for k, v in front.items() if v is not None}
    licenses = "\n".join(
        f"- {p.expert.id} v{p.version.version} ({n}): {s.license}"
        for p, n, s in zip(parents, names, sheets, strict=True)
    )
    body = (
        f"\n# {front['name']}\n\nThis expert was produced by the Agora registry's job "
        f"{job.id} ({method}). Its parents and their licenses:\n\n{licenses}\n"
    )
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body
    return text.encode("utf-8")


def parents_of(*, session: Session, job: Job) -> list[ResolvedExpert]:
    """The job's input experts, re-checked: one disabled since the request withdraws it."""
    return [
        resolve_expert(
            session=session,
            expert_id=ref["id"],
            version=int(ref["version"]),
            base_revision=job.payload["base_revision"],
        )
        for ref in job.payload["experts"]
    ]


def record_lineage(
    *,
    session: Session,
    expert_id: str,
    version: int,
    parents: Sequence[ResolvedExpert],
    weights: Sequence[float] | None,
) -> None:
    for i, p in enumerate(parents):
        session.add(
            ExpertParent(
                expert_id=expert_id,
                version=version,
                parent_id=p.expert.id,
                parent_version=p.version.version,
                weight=None if weights is None else float(weights[i]),
            )
        )
    session.flush()
