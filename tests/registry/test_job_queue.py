"""The queue under concurrency, at the service level: many workers leasing at once each
get a different job, and every job is leased exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.db.engine import make_engine, make_sessionmaker
from registry.services import jobs


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def test_concurrent_leases_never_hand_out_a_job_twice(
    sessions: sessionmaker[Session],
) -> None:
    n_jobs, n_workers = 40, 6
    with sessions() as session, session.begin():
        created = {
            jobs.create_job(
                session=session,
                kind="evaluate",
                payload={"n": i},
                created_by="t",
                max_attempts=3,
            ).id
            for i in range(n_jobs)
        }
    leased: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n_workers)

    def worker(name: str) -> None:
        try:
            start.wait()
            while True:
                with sessions() as session, session.begin():
                    job = jobs.lease(
                        session=session, worker=name, kinds=["evaluate"], lease_seconds=60
                    )
                    if job is None:
                        return
                    job_id = job.id
                with lock:
                    leased.append((name, job_id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    ids = [job_id for _, job_id in leased]
    assert len(ids) == n_jobs
    assert set(ids) == created
    with sessions() as session, session.begin():
        rows = [jobs.get_job(session=session, job_id=i) for i in created]
        assert {r.status for r in rows} == {"leased"}
        assert {r.attempts for r in rows} == {1}


def test_kind_filter_and_fifo_order(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        first = jobs.create_job(
            session=session, kind="evaluate", payload={}, created_by="t", max_attempts=1
        ).id
        compose = jobs.create_job(
            session=session, kind="compose.mixture", payload={}, created_by="t", max_attempts=1
        ).id
        second = jobs.create_job(
            session=session, kind="evaluate", payload={}, created_by="t", max_attempts=1
        ).id
    order = []
    for _ in range(2):
        with sessions() as session, session.begin():
            job = jobs.lease(session=session, worker="w", kinds=["evaluate"], lease_seconds=60)
            assert job is not None
            order.append(job.id)
    assert order == [first, second]
    with sessions() as session, session.begin():
        assert jobs.lease(session=session, worker="w", kinds=["evaluate"], lease_seconds=60) is None
        job = jobs.lease(session=session, worker="w", kinds=None, lease_seconds=60)
        assert job is not None
        assert job.id == compose
