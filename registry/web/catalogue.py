"""The catalogue pages: ``/experts`` (filter, sort, page), ``/experts/{id}`` (datasheet,
versions, lineage, evaluations, its matrix row) and ``/matrix`` (the expert x domain
heatmap, and a form that queues evaluations for its empty cells). docs/web.md.

Who sees what (docs/governance.md, "States"): everyone sees active experts; moderators
and admins ("staff") also see the others, with their state, and their read of a
withdrawn expert's datasheet is audited as the API's is (``expert.review_download``); a
quarantined expert is shown to its owner too. For anyone else an expert in another state
is a 404 page, the same as an unknown id, and lineage links to it are counted, not shown.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup
from sqlalchemy.orm import Session

from registry.api.deps import RuntimeDep
from registry.db.models import Evaluation, Expert
from registry.errors import AgoraError, BadRequest, Forbidden, expert_not_found
from registry.protocol import EVALUATE_KIND, relative_change
from registry.services import evaluations, governance, matrix
from registry.services import experts as svc
from registry.services.arrival import TEXT_SET as OWN_SAMPLES
from registry.services.base_models import list_base_models
from registry.validation import parse_datasheet
from registry.validation.datasheet import Datasheet
from registry.web import svg
from registry.web.render import ViewerDep, fmt_change, fmt_time, page_router, render
from registry.web.sessions import CSRF_FIELD, Viewer, check_csrf

router = page_router()

PAGE_SIZE = 25
MAX_PAGE_NUMBER = 10_000
MAX_FILTER_CHARS = 200
SORTS = tuple(svc.SORTS)
# Who may queue evaluations from the matrix page (as POST /v1/evaluations: registry/api).
FILL_ROLES = ("contributor", "moderator", "admin")
_LINKABLE = ("http://", "https://", "mailto:")


# -- parameters ------------------------------------------------------------------------------


def _choice(name: str, raw: str | None, allowed: Sequence[str], default: str) -> str:
    value = (raw or "").strip() or default
    if value not in allowed:
        raise BadRequest(f"{name} must be one of: {', '.join(allowed)}", code=f"invalid_{name}")
    return value


def _text(name: str, raw: str | None) -> str | None:
    value = (raw or "").strip()
    if len(value) > MAX_FILTER_CHARS:
        raise BadRequest(
            f"{name} must be at most {MAX_FILTER_CHARS} characters", code=f"invalid_{name}"
        )
    return value or None


def _whole(name: str, raw: str | None, *, low: int, high: int, default: int) -> int:
    text = (raw or "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not low <= int(text) <= high:
        raise BadRequest(
            f"{name} must be a whole number from {low} to {high}", code=f"invalid_{name}"
        )
    return int(text)


@dataclass(frozen=True)
class ListQuery:
    base: str | None
    q: str | None
    license: str | None
    language: str | None
    sort: str
    status: str
    page: int

    def url(self, **changes: Any) -> str:
        params = {
            "base": self.base,
            "q": self.q,
            "license": self.license,
            "language": self.language,
            "sort": self.sort,
            "status": self.status if self.status != svc.ACTIVE else None,
            "page": self.page,
            **changes,
        }
        kept = {k: v for k, v in params.items() if v not in (None, "")}
        return "/experts?" + urllib.parse.urlencode(kept)


def parse_list_query(viewer: Viewer | None, raw: Mapping[str, str | None]) -> ListQuery:
    """The list's parameters, each checked (400 naming what is allowed)."""
    staff = viewer is not None and viewer.is_staff
    status = _choice("status", raw.get("status"), svc.STATUSES, svc.ACTIVE)
    if status != svc.ACTIVE and not staff:
        raise Forbidden(
            "only moderators and admins list experts that are not active",
            code="insufficient_role",
        )
    return ListQuery(
        base=_text("base", raw.get("base")),
        q=_text("q", raw.get("q")),
        license=_text("license", raw.get("license")),
        language=_text("language", raw.get("language")),
        sort=_choice("sort", raw.get("sort"), SORTS, "newest"),
        status=status,
        page=_whole("page", raw.get("page"), low=1, high=MAX_PAGE_NUMBER, default=1),
    )


# -- /experts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    experts: list[Expert]
    bases: list[tuple[str, str]]  # (revision, name), newest first
    has_next: bool


def list_page(session: Session, query: ListQuery) -> Listing:
    bases = [(b.revision, b.name) for b in list_base_models(session=session)]
    known = [r for r, _ in bases]
    if query.base is not None and query.base not in known:
        shown = ", ".join(r[:12] for r in known[:10]) or "none stored yet"
        raise BadRequest(f"base must be a stored base revision ({shown})", code="invalid_base")
    experts, more = svc.list_experts(
        session=session,
        base_revision=query.base,
        status=query.status,
        q=query.q,
        limit=PAGE_SIZE,
        cursor=None,
        license=query.license,
        language=query.language,
        sort=query.sort,
        offset=(query.page - 1) * PAGE_SIZE,
    )
    return Listing(experts=experts, bases=bases, has_next=more is not None)


@router.get("/experts")
def experts_page(
    *,
    request: Request,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    base: str | None = None,
    q: str | None = None,
    license: str | None = None,
    language: str | None = None,
    sort: str | None = None,
    status: str | None = None,
    page: str | None = None,
) -> HTMLResponse:
    raw = {"base": base, "q": q, "license": license, "language": language}
    query = parse_list_query(viewer, {**raw, "sort": sort, "status": status, "page": page})
    with runtime.sessions() as session, session.begin():
        listing = list_page(session, query)
    return render(
        request,
        "experts.html",
        query=query,
        listing=listing,
        sorts=SORTS,
        statuses=svc.STATUSES,
    )


# -- /experts/{id} ---------------------------------------------------------------------------


def visible(expert: Expert, viewer: Viewer | None) -> bool:
    if expert.status == svc.ACTIVE or (viewer is not None and viewer.is_staff):
        return True
    return (
        expert.status == svc.QUARANTINED
        and viewer is not None
        and viewer.principal.name == expert.owner
    )


@dataclass(frozen=True)
class Field:
    label: str
    values: list[tuple[str, str | None]]  # (text, href or None)


@dataclass
class SheetView:
    fields: list[Field] = field(default_factory=list)
    body: str = ""
    samples: tuple[str, ...] = ()
    unreadable: str | None = None  # why it could not be parsed (shown as text instead)
    raw: str = ""


def _link(text: str) -> tuple[str, str | None]:
    """A value with a link only for web and mail addresses (never javascript: and kin)."""
    return text, text if text.lower().startswith(_LINKABLE) else None


def _plain(values: Iterable[Any]) -> list[tuple[str, str | None]]:
    return [(str(v), None) for v in values if v not in (None, "")]


def sheet_view(text: str) -> SheetView:
    try:
        sheet = parse_datasheet(text.encode("utf-8"), max_bytes=1 << 30)
    except AgoraError as exc:
        return SheetView(unreadable=exc.detail, raw=text)
    return SheetView(fields=_fields(sheet), body=sheet.body, samples=sheet.samples, raw=text)


def _fields(sheet: Datasheet) -> list[Field]:
    sources = []
    for s in sheet.sources:
        name, href = _link(s.url) if s.url else (s.name, None)
        label = s.name if s.url else name
        extra = f" ({s.description})" if s.description else ""
        sources.append((label + extra, href))
    rows = [
        Field("Name", _plain([sheet.name])),
        Field("Domain", _plain([sheet.domain])),
        Field("License", _plain([sheet.license])),
        Field("Language", _plain(sheet.language)),
        Field("Sources", sources),
        Field("Collection", _plain([sheet.collection])),
        Field("Token count", _plain([f"{sheet.token_count:,}"])),
        Field("PII handling", _plain([sheet.pii_handling])),
        Field("Intended uses", _plain(sheet.intended_uses)),
        Field("Out-of-scope uses", _plain(sheet.out_of_scope_uses)),
        Field("Contact", [_link(sheet.contact)]),
        Field("Tags", _plain(sheet.tags)),
    ]
    return [r for r in rows if r.values]


@dataclass(frozen=True)
class LineageView:
    parents: list[dict[str, Any]]
    children: list[dict[str, Any]]
    hidden_parents: int
    hidden_children: int


def lineage(session: Session, expert: Expert, staff: bool) -> LineageView:
    view = governance.lineage_view(session, expert)

    def shown(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return nodes if staff else [n for n in nodes if n["status"] == svc.ACTIVE]

    parents, children = shown(view["parents"]), shown(view["children"])
    return LineageView(
        parents=parents,
        children=children,
        hidden_parents=len(view["parents"]) - len(parents),
        hidden_children=len(view["children"]) - len(children),
    )


@dataclass(frozen=True)
class EvalRow:
    evaluation: Evaluation
    text_set_label: str
    change: float | None


def _labels(session: Session, names: Iterable[str], staff: bool) -> dict[str, str]:
    """Text set names as people read them: ``samples`` is the expert's own samples, an
    expert's id is that expert's domain (named when the viewer may see it)."""
    labels = {OWN_SAMPLES: "own samples"}
    for name in set(names) - {OWN_SAMPLES}:
        other = session.get(Expert, name)
        if other is not None and (staff or other.status == svc.ACTIVE):
            labels[name] = f"{other.name} (domain)"
        else:
            labels[name] = name
    return labels


def eval_rows(session: Session, expert: Expert, staff: bool) -> list[EvalRow]:
    rows = evaluations.list_evaluations(session=session, expert_id=expert.id)
    labels = _labels(session, (e.text_set for e in rows), staff)
    return [
        EvalRow(e, labels[e.text_set], relative_change(e.bits_per_byte, e.base_bits_per_byte))
        for e in rows
    ]


def eval_chart(rows: Sequence[EvalRow]) -> Markup:
    groups: dict[str, list[EvalRow]] = {}
    for r in rows:
        groups.setdefault(r.text_set_label, []).append(r)
    series = []
    for label, members in sorted(groups.items()):
        newest = max(members, key=lambda r: r.evaluation.id).evaluation
        points = [
            svg.Point(
                at=r.evaluation.created_at,
                value=r.evaluation.bits_per_byte,
                label=f"{label}: {r.evaluation.bits_per_byte:.4f} bits/byte, version "
                f"{r.evaluation.version}, {fmt_time(r.evaluation.created_at)}",
            )
            for r in members
        ]
        series.append(svg.Series(name=label, points=points, baseline=newest.base_bits_per_byte))
    return svg.line_chart(series, title="Bits per byte over time, per text set")


@dataclass(frozen=True)
class ExpertPage:
    expert: Expert
    staff: bool
    sheet: SheetView
    versions: list[Any]
    lineage: LineageView
    evaluations: list[EvalRow]
    chart: Markup
    domains: list[matrix.Domain]
    row: dict[str, matrix.Cell]


def expert_page_view(session: Session, viewer: Viewer | None, expert_id: str) -> ExpertPage:
    """Everything ``/experts/{id}`` shows (404 ``expert_not_found`` when the viewer may not
    see it); a staff read of a withdrawn expert is audited, last."""
    expert = session.get(Expert, expert_id)
    if expert is None or not visible(expert, viewer):
        raise expert_not_found(expert_id)
    staff = viewer is not None and viewer.is_staff
    versions = svc.list_versions(session=session, expert_id=expert.id)
    rows = eval_rows(session, expert, staff)
    domains, row = matrix.expert_row(session=session, expert=expert)
    page = ExpertPage(
        expert=expert,
        staff=staff,
        sheet=sheet_view(versions[-1].datasheet) if versions else SheetView(),
        versions=versions,
        lineage=lineage(session, expert, staff),
        evaluations=rows,
        chart=eval_chart(rows),
        domains=domains,
        row=row,
    )
    if staff and viewer is not None and versions:
        svc.audit_review(
            session=session,
            expert=expert,
            principal=viewer.principal,
            artifact="datasheet",
            version=versions[-1].version,
        )
    return page


@router.get("/experts/{expert_id}")
def expert_page(
    request: Request, expert_id: str, runtime: RuntimeDep, viewer: ViewerDep
) -> HTMLResponse:
    with runtime.sessions() as session, session.begin():
        page = expert_page_view(session, viewer, expert_id)
    return render(request, "expert.html", page=page, e=page.expert)


# -- /matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixPage:
    base: str | None
    bases: list[tuple[str, str]]
    grid: matrix.Matrix | None
    heatmap: Markup | None
    legend: Markup | None
    empty: int  # cells with no evaluation and none queued
    pending: int  # cells with an evaluation queued


def _cell_title(cell: matrix.Cell, names: Mapping[str, str]) -> str:
    base = (
        f", base {cell.base_bits_per_byte:.4f} ({fmt_change(cell.change)})"
        if cell.base_bits_per_byte is not None
        else ", base not measured"
    )
    return (
        f"{names[cell.expert_id]} on {names[cell.domain_id]}: {cell.bits_per_byte:.4f} "
        f"bits/byte{base}, version {cell.version}, {fmt_time(cell.created_at)}"
    )


def draw(grid: matrix.Matrix, pending: set[tuple[str, str]]) -> tuple[Markup, Markup]:
    names = {e.id: e.name for e in grid.experts}
    cells = {
        key: svg.HeatCell(
            value=c.bits_per_byte,
            change=c.change,
            href=f"/experts/{urllib.parse.quote(c.expert_id)}#evaluation-{c.evaluation_id}",
            title=_cell_title(c, names),
        )
        for key, c in grid.cells.items()
    }
    limit = svg.change_limit([c.change for c in cells.values() if c.change is not None])
    heat = svg.heatmap(
        rows=[(e.id, e.name) for e in grid.experts],
        columns=[(d.expert_id, d.name) for d in grid.domains],
        cells=cells,
        base_row=grid.base_row,
        pending=pending,
    )
    return heat, svg.heatmap_legend(limit)


def matrix_page_view(session: Session, base: str | None) -> MatrixPage:
    bases = [(b.revision, b.name) for b in list_base_models(session=session)]
    revision = base or matrix.newest_base_with_experts(session=session)
    if revision is None:
        return MatrixPage(None, bases, None, None, None, 0, 0)
    grid = matrix.build_matrix(session=session, base_revision=revision)
    if not grid.experts:
        return MatrixPage(revision, bases, grid, None, None, 0, 0)
    queued = matrix.pending_cells(session=session, expert_ids=[e.id for e in grid.experts])
    empty = {(e, d) for e, domains in grid.empty_cells().items() for d in domains}
    heat, legend = draw(grid, empty & queued)
    return MatrixPage(revision, bases, grid, heat, legend, len(empty - queued), len(empty & queued))


@router.get("/matrix")
def matrix_page(
    request: Request,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    base: str | None = None,
    queued: str | None = None,
) -> HTMLResponse:
    revision = _text("base", base)
    jobs = None if queued is None else _whole("queued", queued, low=0, high=10**6, default=0)
    with runtime.sessions() as session, session.begin():
        page = matrix_page_view(session, revision)
    may_fill = viewer is not None and viewer.principal.role in FILL_ROLES
    return render(request, "matrix.html", page=page, queued=jobs, may_fill=may_fill)


@router.post("/matrix/fill")
def matrix_fill(
    runtime: RuntimeDep,
    viewer: ViewerDep,
    base: Annotated[str | None, Form()] = None,
    csrf_token: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> RedirectResponse:
    check_csrf(expected=viewer.csrf if viewer else None, sent=csrf_token)
    assert viewer is not None  # check_csrf refused a request without a session
    if viewer.principal.role not in FILL_ROLES or viewer.principal.suspended:
        raise Forbidden(
            "only contributors, moderators and admins queue evaluations",
            code="insufficient_role",
        )
    revision = _text("base", base)
    if revision is None:
        raise BadRequest("base is required", code="invalid_base")
    with runtime.sessions() as session:
        jobs = matrix.fill_matrix(
            session=session, runtime=runtime, principal=viewer.principal, base_revision=revision
        )
    for _ in jobs:
        runtime.metrics.record_job(kind=EVALUATE_KIND, event="queued")
    query = urllib.parse.urlencode({"base": revision, "queued": len(jobs)})
    return RedirectResponse(f"/matrix?{query}", status_code=303)
