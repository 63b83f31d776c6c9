"""Pydantic models of the registry's JSON responses (contract: HTTP API v1).

Unknown fields are kept (``extra="allow"``) rather than rejected, so an older SDK keeps
working against a newer server that adds fields. Where a response carries a wire model of
``registry.protocol`` the SDK's model is that model (``ExpertRef``, ``EvaluationScore``),
with the same forward-compatible config. The manifest is not: the protocol's refuses
methods and formats it does not know, and an SDK must keep reading the compositions a
newer registry makes; nor is ``Caution``, a plain dataclass there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry.protocol import ManifestExpert, TextSetScore


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class FileInfo(_Model):
    digest: str
    size: int


class BaseModelFiles(_Model):
    config: FileInfo
    tokenizer: FileInfo
    weights: FileInfo


class BaseModelRevision(_Model):
    """An immutable base model revision: config.json + tokenizer.json + model.safetensors."""

    revision: str
    name: str | None = None
    files: BaseModelFiles
    created_at: datetime | None = None


class SubmittedExpert(_Model):
    """The answer to a submission: the expert's id, the new version and its content digest."""

    id: str
    version: int
    digest: str
    status: str


class ExpertVersion(_Model):
    version: int
    digest: str
    size: int
    base_revision: str
    created_at: datetime | None = None


class ArrivalCheck(_Model):
    """An expert's latest version's check on arrival: an evaluation on its own datasheet
    samples against the base (docs/governance.md, "Checks on arrival")."""

    version: int
    # pending, passed, flagged, failed, released, superseded or cancelled
    state: str
    job_id: str | None = None
    job_status: str | None = None
    bits_per_byte: float | None = None
    base_bits_per_byte: float | None = None
    relative_change: float | None = None
    min_gain: float | None = None
    error: str | None = None
    report_id: int | None = None

    @property
    def pending(self) -> bool:
        return self.state == "pending"


class Expert(_Model):
    id: str
    name: str | None = None
    domain: str | None = None
    owner: str | None = None
    status: str
    base_revision: str
    license: str | None = None
    latest_version: int
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Present on GET /v1/experts/{id}; list pages leave it out.
    versions: list[ExpertVersion] = Field(default_factory=list)
    # On GET /v1/experts/{id}: the latest version's check on arrival, if one ran.
    arrival: ArrivalCheck | None = None


class ExpertPage(_Model):
    items: list[Expert]
    next_cursor: str | None = None


class SearchResult(_Model):
    """One expert that fits the searched texts; ``weight`` is its share of the ensemble."""

    expert_id: str
    version: int
    score: float
    weight: float
    distance: float | None = None
    name: str | None = None
    domain: str | None = None


class SearchResults(_Model):
    """The answer to ``Agora.search``: best first; weights sum to 1 (c-BTM softmax(-d^2/T))."""

    results: list[SearchResult]
    embedder: str

    @property
    def expert_ids(self) -> list[str]:
        return [r.expert_id for r in self.results]

    @property
    def weights(self) -> dict[str, float]:
        return {r.expert_id: r.weight for r in self.results}


class ModerationAction(_Model):
    """A disable or enable of an expert, with its reason and who did it."""

    id: int
    expert_id: str
    action: str
    status: str
    reason: str
    actor: str
    at: datetime | None = None


class Report(_Model):
    """A report of an expert and its outcome (docs/governance.md, "Reports")."""

    id: int
    expert_id: str
    reporter: str
    reason: str
    evidence: str = ""
    status: str
    resolution: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    moderation_action: int | None = None
    created_at: datetime | None = None


class ForgettingDomain(_Model):
    """The disabled expert's own samples: bits per byte with it, without it, the base."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    with_: float = Field(alias="with")
    without: float
    base: float | None = None
    without_vs_base: float | None = None
    with_vs_base: float | None = None


class ForgettingOther(_Model):
    """Another expert's samples: with the disabled expert, without it, the change."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    with_: float = Field(alias="with")
    without: float
    change: float | None = None


class ForgettingReport(_Model):
    """A disable's proof of forgetting for one composition (or the expert alone): docs/
    governance.md, "Proof of forgetting"."""

    id: int
    expert_id: str
    version: int
    composition_id: str | None = None
    method: str
    without_method: str
    removed: list[str] = Field(default_factory=list)
    status: str
    error: str | None = None
    job_id: str
    moderation_action: int | None = None
    domain: ForgettingDomain | None = None
    others: dict[str, ForgettingOther] = Field(default_factory=dict)
    created_at: datetime | None = None


class ForgettingReports(_Model):
    expert_id: str
    items: list[ForgettingReport]


class AuditEntry(_Model):
    """One entry of the audit log, exactly as hashed (docs/governance.md, "Audit log"):
    ``at`` stays the served text so that the entry can be re-hashed."""

    seq: int
    at: str
    actor: str
    action: str
    target: str
    reason: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(_Model):
    items: list[AuditEntry]
    next_cursor: str | None = None


class ChainHead(_Model):
    seq: int
    hash: str


class ChainBreak(_Model):
    """The first entry where the chain fails: ``problem`` is ``sequence_gap`` (a deleted
    entry), ``prev_hash_mismatch`` or ``hash_mismatch`` (an altered entry), or
    ``unreadable`` (a value not of its column's type)."""

    seq: int
    position: int
    problem: str
    expected: str
    found: str
    detail: str


class AuditVerification(_Model):
    """The answer of ``GET /v1/audit/verify``: ``ok``, the entries verified, the newest
    stored entry, and the first break (``break`` on the wire)."""

    ok: bool
    count: int
    head: ChainHead | None = None
    first_break: ChainBreak | None = Field(default=None, alias="break")


class TokenInfo(_Model):
    """A token as an admin lists it: never its secret."""

    id: int
    name: str
    role: str
    trusted: bool = False
    prefix: str
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    suspended_at: datetime | None = None


class CreatedToken(TokenInfo):
    """A token just made: ``secret`` is in this answer only."""

    secret: str


# -- jobs, compositions, evaluations ----------------------------------------------------------

FINAL_JOB_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "dead"})


class Job(_Model):
    """A unit of work computed by a worker: a composition (``compose.*``) or an evaluation.

    ``failed`` means a worker reported a permanent error, ``dead`` that the attempts ran
    out; both are final, like ``succeeded``. ``fencing_token`` is only shown to workers.
    """

    id: str
    kind: str
    status: str
    payload: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    max_attempts: int | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    fencing_token: int | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    composition_id: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or dead)."""
        return self.status in FINAL_JOB_STATUSES


class LeasedJob(_Model):
    """A job leased by a worker, with the fencing token every later call must carry."""

    job: Job
    fencing_token: int

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def kind(self) -> str:
        return self.job.kind

    @property
    def payload(self) -> dict[str, Any]:
        return self.job.payload


class ExpertRef(ManifestExpert):
    """One exact expert version: ``weight`` is its share in a composition (None: none)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Manifest(_Model):
    """What a composition is (``format`` agora.composition/1): base, experts, weights.

    An ensemble's says ``with_base``: whether the unmodified base is one more path, last
    (the null expert its posterior falls back on), with the prior weight ``base_weight``
    (the experts' weights and it sum to 1; None: the mean of the experts'). Manifests
    written before the base became a path do not say, and were built without it: False.
    """

    format: str
    id: str
    method: str
    base_revision: str
    experts: list[ExpertRef]
    params: dict[str, Any] = Field(default_factory=dict)
    output: ExpertRef | None = None
    metrics: dict[str, Any] | None = None
    with_base: bool = False
    base_weight: float | None = None


class Caution(_Model):
    """A warning the registry answers a composition request with: ``code`` is stable
    (``average_may_harm``), ``detail`` says what was measured and what to use instead."""

    code: str
    detail: str


class Composition(_Model):
    """A requested composition; ``manifest`` is set once it is ``ready``.

    ``expert_id`` names the new expert an ``average`` or ``distill`` composition produced;
    ``warnings`` are its method's cautions (``average_may_harm`` for ``average``).
    ``status`` is ``verifying`` while a second worker checks an untrusted worker's output;
    ``verification`` is that check (``job_id``, ``mode``, ``state``, ``cause``) or None.
    """

    id: str
    method: str
    base_revision: str
    status: str
    job_id: str | None = None
    manifest: Manifest | None = None
    expert_id: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None
    warnings: list[Caution] = Field(default_factory=list)
    verification: dict[str, Any] | None = None


class JobAccepted(_Model):
    """The 202 answer to a composition or evaluation request; a composition's carries its
    method's ``warnings`` (empty for most methods, and for evaluations)."""

    job_id: str
    status: str
    composition_id: str | None = None
    warnings: list[Caution] = Field(default_factory=list)


class EvaluationScore(TextSetScore):
    """Bits per byte of one text set, with the base model's on the same text and their
    relative change ``delta_vs_base`` (+0.004: 0.4% more bits per byte than the base)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Evaluation(EvaluationScore):
    """A stored evaluation of an expert version or a composition on one named text set."""

    id: str | int
    text_set: str
    job_id: str | None = None
    expert_id: str | None = None
    version: int | None = None
    composition_id: str | None = None
    created_at: datetime | None = None


# -- monitoring (docs/governance.md, "Monitoring") ------------------------------------------


class TextSet(_Model):
    """A named, dated text set that monitoring runs measure every expert on; ``key``
    (``name@date``) is its text set name in evaluations. ``texts`` only when read by id."""

    id: int
    name: str
    date: str
    key: str
    n_texts: int
    bytes: int
    uploader: str
    created_at: datetime
    texts: list[str] | None = None


class MonitorSchedule(_Model):
    """A monitoring schedule: from ``not_before``, once or every ``every_hours``; ``runs``,
    ``completed`` and ``flagged`` count its runs so far."""

    id: int
    not_before: datetime
    every_hours: float | None = None
    text_sets: dict[str, Any] = Field(default_factory=dict)
    created_by: str
    created_at: datetime
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None
    runs: int
    completed: int
    flagged: int


class CreatedSchedule(MonitorSchedule):
    """A schedule just made, with the ids of the jobs it queued (one per active expert)."""

    jobs: list[str]


class CancelledSchedule(MonitorSchedule):
    """A schedule just cancelled, with the ids of the queued jobs cancelled with it."""

    cancelled_jobs: list[str]


class MonitorRun(_Model):
    """One expert's monitoring run: its bits per byte against its reference evaluation's
    (``worsening``: relative, +0.05 is 5% worse), repetition against the base's, and the
    report it raised (``report_id``) when a threshold was crossed."""

    job_id: str
    schedule_id: int
    expert_id: str
    version: int
    run_at: datetime
    completed_at: datetime | None = None
    own_bits_per_byte: float | None = None
    reference_evaluation: int | None = None
    reference_bits_per_byte: float | None = None
    worsening: float | None = None
    repetition: float | None = None
    base_repetition: float | None = None
    report_id: int | None = None
