"""The audit log: an append-only, hash-chained record of every governance action.

Every entry has a sequence number (1, 2, ... with no gaps), the actor, the action, its
target, a reason, the time, a JSON detail, the hash of the previous entry and its own
hash: the sha256 of a canonical serialisation of its fields and the previous hash
(``entry_hash``; the exact bytes are in docs/governance.md, "Audit log", so anyone can
re-verify the chain without this code). Changing, removing or inserting an entry breaks
the chain at that entry, and ``verify`` finds the first break.

``append`` is the one way in; every governance action calls it in its own transaction,
after its other writes (a submission, a disable, a token made or revoked, a worker
suspended). Appends are serialised so that the chain never forks: on PostgreSQL by a
transaction-scoped advisory lock (``CHAIN_LOCK_ID``) taken before the head is read and
held until the appending transaction ends; on SQLite by the database's write lock, which
every transaction takes up front (``BEGIN IMMEDIATE``, registry/db/engine.py). A unique
index on ``seq`` refuses a fork should anything bypass the lock. On PostgreSQL, triggers
refuse UPDATE, DELETE and TRUNCATE of the table (migrations/versions/
2026_12_03_audit_chain.py).

``append``, ``list_entries`` and ``verify`` take the caller's session and never commit.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.db.models import AuditEvent, utcnow
from registry.errors import BadRequest

FORMAT = "agora.audit/1"
GENESIS = "0" * 64
# pg_advisory_xact_lock key: the first 8 bytes of sha256("agora.audit"), as a signed int.
CHAIN_LOCK_ID = int.from_bytes(hashlib.sha256(b"agora.audit").digest()[:8], "big", signed=True)
MAX_PAGE = 100
DEFAULT_PAGE = 50
# Column widths (registry/db/models.py): a longer value is a programming error.
_WIDTHS = {"actor": 100, "action": 40, "target": 200}


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` the hashes are computed over: keys sorted, no
    spaces, non-ASCII escaped, no NaN or infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def time_text(at: dt.datetime) -> str:
    """An entry's time as hashed and served: UTC, microseconds, ``Z``."""
    if at.tzinfo is None:
        raise ValueError("naive datetime in the audit log")
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    *,
    seq: int,
    at: str,
    actor: str,
    action: str,
    target: str,
    reason: str,
    detail: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """sha256 (hex) of the canonical JSON of the entry's fields and the previous hash."""
    document = {
        "format": FORMAT,
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "target": target,
        "reason": reason,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(document).encode("ascii")).hexdigest()


def _row_hash(row: AuditEvent) -> str:
    return entry_hash(
        seq=row.seq,
        at=time_text(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        reason=row.reason,
        detail=row.detail,
        prev_hash=row.prev_hash,
    )


def _lock_chain(session: Session) -> None:
    """Serialise appends until this transaction ends (PostgreSQL); SQLite's transactions
    already hold the database's write lock from their first statement."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK_ID)))


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    reason: str = "",
    detail: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one entry at the head of the chain; the caller commits. Call it last in a
    transaction: the chain stays locked until the transaction ends."""
    for name, value in (("actor", actor), ("action", action), ("target", target)):
        if not value or len(value) > _WIDTHS[name]:
            raise ValueError(f"audit {name} must be 1 to {_WIDTHS[name]} characters: {value!r}")
    # Stored as it is hashed: a value JSON cannot carry back (a tuple, an int key) is
    # normalised first, so the stored detail re-hashes to the same bytes.
    stored: dict[str, Any] = json.loads(canonical_json(dict(detail or {})))
    _lock_chain(session)
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).one_or_none()
    seq, prev_hash = (1, GENESIS) if head is None else (head.seq + 1, head.hash)
    # Taken under the lock, so times never go backwards along the chain (one clock).
    at = utcnow()
    event = AuditEvent(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        target=target,
        reason=reason,
        detail=stored,
        prev_hash=prev_hash,
        hash=entry_hash(
            seq=seq,
            at=time_text(at),
            actor=actor,
            action=action,
            target=target,
            reason=reason,
            detail=stored,
            prev_hash=prev_hash,
        ),
    )
    session.add(event)
    session.flush()
    return event


def entry_view(row: AuditEvent) -> dict[str, Any]:
    """An entry as the API serves it: exactly the hashed fields, so a reader can re-hash."""
    return {
        "seq": row.seq,
        "at": time_text(row.at),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "reason": row.reason,
        "detail": row.detail,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


# -- reading ---------------------------------------------------------------------------


def encode_cursor(before_seq: int) -> str:
    raw = json.dumps({"before": before_seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        before = json.loads(raw)["before"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor") from exc
    if type(before) is not int or not 1 <= before <= 2**31:
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor")
    return before


def _check_time(name: str, value: dt.datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise BadRequest(f"{name} needs a timezone, e.g. 2026-12-01T00:00:00Z", code="invalid_time")


def list_entries(
    *,
    session: Session,
    target: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> tuple[list[AuditEvent], str | None]:
    """Newest first, keyset-paginated on ``seq``. ``since`` is inclusive, ``until``
    exclusive; both need a timezone."""
    _check_time("since", since)
    _check_time("until", until)
    if since is not None and until is not None and since >= until:
        raise BadRequest("since must be earlier than until", code="invalid_time_range")
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}", code="invalid_limit")
    stmt = select(AuditEvent)
    if target is not None:
        stmt = stmt.where(AuditEvent.target == target)
    if actor is not None:
        stmt = stmt.where(AuditEvent.actor == actor)
    if action is not None:
        stmt = stmt.where(AuditEvent.action == action)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    if cursor:
        stmt = stmt.where(AuditEvent.seq < decode_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(AuditEvent.seq.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    return rows[:limit], next_cursor


# -- verifying -------------------------------------------------------------------------

SEQUENCE_GAP = "sequence_gap"
PREV_HASH_MISMATCH = "prev_hash_mismatch"
HASH_MISMATCH = "hash_mismatch"
# A value that is not of its column's type (SQLite stores whatever was written): a
# detail that is not JSON, a time that is not one.
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ChainBreak:
    """The first entry where the chain does not hold. ``position`` counts the entries
    read in sequence order from 1: it differs from ``seq`` after a deleted entry."""

    seq: int
    position: int
    problem: str
    expected: str
    found: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    # Entries that verified, in order, before the break (all of them when ok).
    count: int
    head_seq: int | None
    head_hash: str | None
    first_break: ChainBreak | None = None

    def to_json(self) -> dict[str, Any]:
        head = None if self.head_seq is None else {"seq": self.head_seq, "hash": self.head_hash}
        broken = self.first_break
        return {
            "ok": self.ok,
            "count": self.count,
            "head": head,
            "break": None
            if broken is None
            else {
                "seq": broken.seq,
                "position": broken.position,
                "problem": broken.problem,
                "expected": broken.expected,
                "found": broken.found,
                "detail": broken.detail,
            },
        }


def _hash_problem(row: AuditEvent, *, position: int, prev_hash: str) -> ChainBreak | None:
    if row.prev_hash != prev_hash:
        return ChainBreak(
            row.seq,
            position,
            PREV_HASH_MISMATCH,
            prev_hash,
            row.prev_hash,
            f"entry {row.seq} does not name the hash of the entry before it",
        )
    recomputed = _row_hash(row)
    if recomputed != row.hash:
        return ChainBreak(
            row.seq,
            position,
            HASH_MISMATCH,
            recomputed,
            row.hash,
            f"entry {row.seq}'s fields do not hash to its stored hash: it was altered",
        )
    return None


def _gap(row: AuditEvent, *, position: int, prev_seq: int) -> ChainBreak | None:
    if row.seq == prev_seq + 1:
        return None
    first, last = prev_seq + 1, row.seq - 1
    missing = f"entry {first}" if first == last else f"entries {first} to {last}"
    return ChainBreak(
        row.seq,
        position,
        SEQUENCE_GAP,
        str(prev_seq + 1),
        str(row.seq),
        f"{missing} missing before entry {row.seq}: deleted",
    )


def _unreadable(exc: Exception, *, position: int, prev_seq: int) -> ChainBreak:
    return ChainBreak(
        prev_seq + 1,
        position,
        UNREADABLE,
        "values of the log's column types",
        "a value that is not",
        f"the entry after entry {prev_seq} cannot be read: {exc}",
    )


def verify(*, session: Session, batch_size: int = 1000) -> VerifyReport:
    """Recompute the chain from entry 1 and report the first break: a gap in the
    sequence numbers (a deleted entry), a previous hash that is not the previous entry's
    hash, or a hash its fields do not give (an altered entry), or an entry that cannot
    be read at all. ``head`` is the newest stored entry, whether or not the chain holds
    up to it."""
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).one_or_none()
    head_seq, head_hash = (None, None) if head is None else (head.seq, head.hash)
    prev_hash, prev_seq, count = GENESIS, 0, 0
    rows = session.scalars(
        select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch_size)
    )
    position = 0
    while True:
        position += 1
        try:
            row = next(rows, None)
            if row is None:
                return VerifyReport(True, count, head_seq, head_hash)
            broken = _gap(row, position=position, prev_seq=prev_seq) or _hash_problem(
                row, position=position, prev_hash=prev_hash
            )
        except (ValueError, TypeError) as exc:
            broken = _unreadable(exc, position=position, prev_seq=prev_seq)
            rows.close()
            return VerifyReport(False, count, head_seq, head_hash, broken)
        if broken is not None:
            rows.close()
            return VerifyReport(False, count, head_seq, head_hash, broken)
        prev_hash, prev_seq, count = row.hash, row.seq, count + 1
