"""Retrieval rows in the database: expert vectors, the change counter, the change log.

Keyword-only functions over a caller's session; none of them commits (the caller owns the
transaction, as every service of the registry).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from registry.db.models import Expert, ExpertVector, ExpertVersion, RetrievalChange, RetrievalState
from registry.retrieval.embedders import Vectors

STATE_ROW = 1


@dataclass(frozen=True)
class ExpertEntry:
    """What search needs of an expert, beside its vectors."""

    id: str
    version: int
    name: str
    domain: str
    base_revision: str
    active: bool


@dataclass(frozen=True)
class LoadedExpert:
    entry: ExpertEntry
    ids: NDArray[np.int64]
    vectors: Vectors  # (V, D), empty when this embedder has none for the latest version


def encode_vector(vector: NDArray[np.floating]) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def decode_vector(raw: bytes, dim: int) -> Vectors:
    out = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if out.shape != (dim,):
        raise ValueError(f"a stored vector has {out.size} values, its row says {dim}")
    return out


def current_version(*, session: Session) -> int:
    value = session.scalar(select(RetrievalState.version).where(RetrievalState.id == STATE_ROW))
    return int(value or 0)


def bump(*, session: Session, expert_id: str) -> int:
    """Record that ``expert_id`` changed; returns the new counter value.

    The UPDATE takes the row's lock until the caller commits, so concurrent writers get
    consecutive values in commit order: a replica that reads value v has seen every change
    up to v committed."""
    new = session.scalar(
        update(RetrievalState)
        .where(RetrievalState.id == STATE_ROW)
        .values(version=RetrievalState.version + 1)
        .returning(RetrievalState.version)
    )
    if new is None:
        # The row is gone (a wiped table): recreate it above anything in the change log.
        last = session.scalar(
            select(RetrievalChange.version).order_by(RetrievalChange.version.desc())
        )
        new = int(last or 0) + 1
        session.add(RetrievalState(id=STATE_ROW, version=new))
        session.flush()
    session.add(RetrievalChange(version=int(new), expert_id=expert_id))
    session.flush()
    return int(new)


def changed_experts(*, session: Session, after: int, upto: int) -> set[str]:
    return set(
        session.scalars(
            select(RetrievalChange.expert_id).where(
                RetrievalChange.version > after, RetrievalChange.version <= upto
            )
        )
    )


def store_vectors(
    *, session: Session, expert_id: str, version: int, embedder: str, vectors: Vectors
) -> None:
    """Replace the expert's vectors (of every embedder: they describe an older version, or
    are about to be re-made) by ``vectors`` of ``version`` made by ``embedder``."""
    session.execute(delete(ExpertVector).where(ExpertVector.expert_id == expert_id))
    _insert_vectors(
        session=session, expert_id=expert_id, version=version, embedder=embedder, vectors=vectors
    )


def replace_vectors_of_embedder(
    *, session: Session, expert_id: str, version: int, embedder: str, vectors: Vectors
) -> bool:
    """Re-embedding: replace only this embedder's vectors, leaving other embedders' rows
    (another replica may still run that embedder during a rolling change).

    Refused (False) when the expert has moved past ``version`` since its datasheet was
    read: the new version's own vectors must not be replaced by the old one's. The expert's
    row is locked (PostgreSQL) so a submission cannot slip in between."""
    latest = session.scalar(
        select(Expert.latest_version).where(Expert.id == expert_id).with_for_update()
    )
    if latest != version:
        return False
    session.execute(
        delete(ExpertVector).where(
            ExpertVector.expert_id == expert_id, ExpertVector.embedder == embedder
        )
    )
    _insert_vectors(
        session=session, expert_id=expert_id, version=version, embedder=embedder, vectors=vectors
    )
    return True


def _insert_vectors(
    *, session: Session, expert_id: str, version: int, embedder: str, vectors: Vectors
) -> None:
    session.add_all(
        ExpertVector(
            expert_id=expert_id,
            version=version,
            embedder=embedder,
            ordinal=ordinal,
            dim=int(vector.shape[0]),
            vector=encode_vector(vector),
        )
        for ordinal, vector in enumerate(vectors)
    )
    session.flush()


def experts_missing_vectors(
    *, session: Session, embedder: str, expert_ids: Collection[str] | None = None
) -> list[tuple[str, int]]:
    """(expert id, latest version) of experts whose latest version has no vector from
    ``embedder``: made by another embedder, or never embedded."""
    have = (
        select(ExpertVector.id)
        .where(
            ExpertVector.expert_id == Expert.id,
            ExpertVector.embedder == embedder,
            ExpertVector.version == Expert.latest_version,
        )
        .exists()
    )
    stmt = select(Expert.id, Expert.latest_version).where(~have).order_by(Expert.id)
    if expert_ids is not None:
        stmt = stmt.where(Expert.id.in_(list(expert_ids)))
    return [(row[0], int(row[1])) for row in session.execute(stmt)]


def datasheets(*, session: Session, versions: Collection[tuple[str, int]]) -> dict[str, str]:
    """expert id -> the datasheet of the given version (a batch at a time: they are large)."""
    out: dict[str, str] = {}
    for expert_id, version in versions:
        row = session.get(ExpertVersion, (expert_id, version))
        if row is not None:
            out[expert_id] = row.datasheet
    return out


def load_experts(
    *, session: Session, embedder: str, expert_ids: Collection[str] | None = None
) -> Iterator[LoadedExpert]:
    """Every (or the given) expert with its latest version's vectors from ``embedder``."""
    experts = select(
        Expert.id,
        Expert.latest_version,
        Expert.name,
        Expert.domain,
        Expert.base_revision,
        Expert.status,
    ).order_by(Expert.id)
    vectors = (
        select(ExpertVector.expert_id, ExpertVector.id, ExpertVector.dim, ExpertVector.vector)
        .join(Expert, Expert.id == ExpertVector.expert_id)
        .where(ExpertVector.embedder == embedder, ExpertVector.version == Expert.latest_version)
        .order_by(ExpertVector.expert_id, ExpertVector.ordinal)
    )
    if expert_ids is not None:
        wanted = list(expert_ids)
        experts = experts.where(Expert.id.in_(wanted))
        vectors = vectors.where(ExpertVector.expert_id.in_(wanted))
    by_expert: dict[str, list[tuple[int, Vectors]]] = {}
    for expert_id, vector_id, dim, raw in session.execute(vectors):
        by_expert.setdefault(expert_id, []).append((int(vector_id), decode_vector(raw, dim)))
    for expert_id, version, name, domain, base, status in session.execute(experts):
        rows = by_expert.get(expert_id, [])
        entry = ExpertEntry(
            id=expert_id,
            version=int(version),
            name=name,
            domain=domain,
            base_revision=base,
            active=status == "active",
        )
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        vecs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, 0), dtype=np.float32)
        yield LoadedExpert(entry=entry, ids=ids, vectors=vecs)
