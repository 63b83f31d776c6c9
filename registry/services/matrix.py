"""The evaluation matrix of a base revision: each active expert on each domain
(docs/web.md, "Matrix").

A domain is an active expert's datasheet samples, named after that expert: its column
key is the expert's id. Cell (E, D) is E's newest evaluation whose text set is D's id;
on the diagonal, E on its own domain, also one whose text set is ``samples`` (the check
on arrival scores an expert on its own samples, registry/services/arrival.py). The base
row is the base's bits per byte on each domain, as those evaluations measured it.

``fill_requests`` says what fills the empty cells: per active expert, one evaluation
over the domains it has no cell for (nor a queued or leased job scoring it there), each
text set being that domain's samples. The functions take the caller's session and never
commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.db.models import Evaluation, Expert, ExpertVersion, Job
from registry.errors import AgoraError
from registry.protocol import EVALUATE_KIND, EvaluationRequest, relative_change
from registry.services import evaluations
from registry.services.arrival import TEXT_SET as OWN_SAMPLES
from registry.services.base_models import get_base_model
from registry.services.compositions import samples_of
from registry.services.idempotency import IdempotentRequest
from registry.services.requests import request_evaluation
from registry.services.tokens import Principal

if TYPE_CHECKING:
    from registry.runtime import Runtime

ACTIVE = "active"
_PENDING_JOBS = ("queued", "leased")
# The page form that fills the matrix (registry/web/catalogue.py).
FILL_PATH = "/matrix/fill"


@dataclass(frozen=True)
class Domain:
    """A column: an active expert's samples."""

    expert_id: str
    name: str


@dataclass(frozen=True)
class Cell:
    expert_id: str
    domain_id: str
    evaluation_id: int
    text_set: str
    bits_per_byte: float
    base_bits_per_byte: float | None
    version: int | None
    created_at: dt.datetime

    @property
    def change(self) -> float | None:
        return relative_change(self.bits_per_byte, self.base_bits_per_byte)


@dataclass(frozen=True)
class Matrix:
    base_revision: str
    experts: list[Expert]  # the rows, by name
    domains: list[Domain]  # the columns, in the rows' order
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    base_row: dict[str, float] = field(default_factory=dict)

    def empty_cells(self) -> dict[str, list[str]]:
        """expert id -> the domain ids it has no cell for (experts with none left out)."""
        out: dict[str, list[str]] = {}
        for e in self.experts:
            missing = [d.expert_id for d in self.domains if (e.id, d.expert_id) not in self.cells]
            if missing:
                out[e.id] = missing
        return out


def active_experts(*, session: Session, base_revision: str) -> list[Expert]:
    return list(
        session.scalars(
            select(Expert)
            .where(Expert.base_revision == base_revision, Expert.status == ACTIVE)
            .order_by(func.lower(Expert.name), Expert.id)
        )
    )


def newest_base_with_experts(*, session: Session) -> str | None:
    """The revision of the newest active expert's base, or None when no expert is active."""
    return session.scalars(
        select(Expert.base_revision)
        .where(Expert.status == ACTIVE)
        .order_by(Expert.created_at.desc(), Expert.id.desc())
        .limit(1)
    ).one_or_none()


def build_matrix(*, session: Session, base_revision: str) -> Matrix:
    """The matrix of ``base_revision`` (404 ``base_model_not_found`` if unknown)."""
    get_base_model(session=session, revision=base_revision)
    experts = active_experts(session=session, base_revision=base_revision)
    domains = [Domain(expert_id=e.id, name=e.name) for e in experts]
    cells = _cells(session, [e.id for e in experts], [d.expert_id for d in domains])
    return Matrix(
        base_revision=base_revision,
        experts=experts,
        domains=domains,
        cells=cells,
        base_row=_base_row(cells.values()),
    )


def expert_row(*, session: Session, expert: Expert) -> tuple[list[Domain], dict[str, Cell]]:
    """One expert's row (whatever its state) across its base's domains: the domains, and
    its cells by domain id."""
    domains = [
        Domain(expert_id=e.id, name=e.name)
        for e in active_experts(session=session, base_revision=expert.base_revision)
    ]
    if expert.id not in {d.expert_id for d in domains}:  # not active: its own column too
        domains.append(Domain(expert_id=expert.id, name=expert.name))
    cells = _cells(session, [expert.id], [d.expert_id for d in domains])
    return domains, {d: c for (_, d), c in cells.items()}


def _cells(
    session: Session, expert_ids: Sequence[str], domain_ids: Sequence[str]
) -> dict[tuple[str, str], Cell]:
    if not expert_ids or not domain_ids:
        return {}
    wanted = set(domain_ids)
    rows = session.scalars(
        select(Evaluation)
        .where(
            Evaluation.expert_id.in_(list(expert_ids)),
            Evaluation.text_set.in_([*domain_ids, OWN_SAMPLES]),
        )
        .order_by(Evaluation.id)
    )
    cells: dict[tuple[str, str], Cell] = {}
    for ev in rows:  # oldest first: the newest of each cell stays
        assert ev.expert_id is not None
        domain = ev.expert_id if ev.text_set == OWN_SAMPLES else ev.text_set
        if domain not in wanted:
            continue
        cells[(ev.expert_id, domain)] = Cell(
            expert_id=ev.expert_id,
            domain_id=domain,
            evaluation_id=ev.id,
            text_set=ev.text_set,
            bits_per_byte=ev.bits_per_byte,
            base_bits_per_byte=ev.base_bits_per_byte,
            version=ev.version,
            created_at=ev.created_at,
        )
    return cells


def _base_row(cells: Iterable[Cell]) -> dict[str, float]:
    """The base's bits per byte per domain: the newest measurement of it among the cells."""
    newest: dict[str, Cell] = {}
    for c in cells:
        if c.base_bits_per_byte is None:
            continue
        seen = newest.get(c.domain_id)
        if seen is None or c.evaluation_id > seen.evaluation_id:
            newest[c.domain_id] = c
    return {d: c.base_bits_per_byte for d, c in newest.items() if c.base_bits_per_byte is not None}


def pending_cells(*, session: Session, expert_ids: Sequence[str]) -> set[tuple[str, str]]:
    """(expert, text set) pairs a queued or leased evaluation will score."""
    wanted = set(expert_ids)
    pending: set[tuple[str, str]] = set()
    for payload in session.scalars(
        select(Job.payload).where(Job.kind == EVALUATE_KIND, Job.status.in_(_PENDING_JOBS))
    ):
        subject = payload.get("subject") if isinstance(payload, dict) else None
        expert = subject.get("expert") if isinstance(subject, dict) else None
        expert_id = expert.get("id") if isinstance(expert, dict) else None
        if expert_id in wanted:
            for name in payload.get("text_sets") or {}:
                domain = expert_id if name == OWN_SAMPLES else name
                pending.add((expert_id, domain))
    return pending


def fill_requests(*, session: Session, matrix: Matrix) -> list[EvaluationRequest]:
    """One evaluation per active expert over the domains it has neither a cell for nor a
    pending job on; each text set that domain's samples (an expert's latest version)."""
    pending = pending_cells(session=session, expert_ids=[e.id for e in matrix.experts])
    samples = _domain_samples(session, matrix.experts)
    requests: list[EvaluationRequest] = []
    for expert_id, domains in matrix.empty_cells().items():
        text_sets = {
            d: samples[d] for d in domains if (expert_id, d) not in pending and samples.get(d)
        }
        if text_sets:
            requests.append(EvaluationRequest(expert_id=expert_id, text_sets=text_sets))
    return requests


def _domain_samples(session: Session, experts: Sequence[Expert]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in experts:
        version = session.get(ExpertVersion, (e.id, e.latest_version))
        if version is None:
            continue
        try:
            out[e.id] = [t for t in samples_of(version) if t.strip()]
        except AgoraError:  # a datasheet stored under older rules: no domain to score on
            continue
    return out


def fill_matrix(
    *, session: Session, runtime: Runtime, principal: Principal, base_revision: str
) -> list[str]:
    """Queue the evaluations that fill ``base_revision``'s empty cells (``fill_requests``),
    each in a transaction of its own (``request_evaluation``); returns the jobs' ids.
    Every request is checked before any is queued: a set of domains over the payload limit
    is a 413 ``texts_too_large`` that queued nothing."""
    with session.begin():
        matrix = build_matrix(session=session, base_revision=base_revision)
        wanted = fill_requests(session=session, matrix=matrix)
    for request in wanted:
        evaluations.check_text_sets(
            request.text_sets, max_bytes=runtime.settings.max_job_payload_bytes
        )
    jobs: list[str] = []
    for request in wanted:
        idem = IdempotentRequest(
            principal=principal, key=None, method="POST", path=FILL_PATH, fingerprint=""
        )
        queued = request_evaluation(
            session=session, runtime=runtime, principal=principal, request=request, idem=idem
        )
        jobs.append(str(queued.body["job_id"]))
    return jobs
