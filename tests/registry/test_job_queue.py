"""The queue under concurrency, at the service level: many workers leasing at once each
get a different job, and every job is leased exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.db.engine import make_engine, make_sessionmaker
from registry.services import jobs
from registry.services.tokens import create_token


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture
def token_id(sessions: sessionmaker[Session]) -> int:
    """A worker token: a lease records the bearer token that holds it."""
    with sessions() as session, session.begin():
        token, _ = create_token(session=session, name="w", role="worker")
        return token.id


def test_concurrent_leases_never_hand_out_a_job_twice(
    sessions: sessionmaker[Session], token_id: int
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
                        session=session,
                        worker=name,
                        token_id=token_id,
                        kinds=["evaluate"],
                        lease_seconds=60,
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


def test_kind_filter_and_fifo_order(sessions: sessionmaker[Session], token_id: int) -> None:
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
            job = jobs.lease(
                session=session, worker="w", token_id=token_id, kinds=["evaluate"], lease_seconds=60
            )
            assert job is not None
            order.append(job.id)
    assert order == [first, second]
    with sessions() as session, session.begin():
        none = jobs.lease(
            session=session, worker="w", token_id=token_id, kinds=["evaluate"], lease_seconds=60
        )
        assert none is None
        job = jobs.lease(
            session=session, worker="w", token_id=token_id, kinds=None, lease_seconds=60
        )
        assert job is not None
        assert job.id == compose


def _worker_token(sessions: sessionmaker[Session], name: str) -> int:
    with sessions() as session, session.begin():
        token, _ = create_token(session=session, name=name, role="worker")
        return token.id


def test_a_job_excluding_a_token_is_leased_by_another(
    sessions: sessionmaker[Session], token_id: int
) -> None:
    """``exclude_token_id``: the check of a worker's output is run by a different worker."""
    other = _worker_token(sessions, "other")
    with sessions() as session, session.begin():
        job = jobs.create_job(
            session=session, kind="evaluate", payload={}, created_by="t", max_attempts=2
        )
        job.exclude_token_id = token_id
        excluded = job.id
    with sessions() as session, session.begin():
        assert (
            jobs.lease(session=session, worker="w", token_id=token_id, kinds=None, lease_seconds=60)
            is None
        )
    with sessions() as session, session.begin():
        leased = jobs.lease(
            session=session, worker="o", token_id=other, kinds=None, lease_seconds=60
        )
        assert leased is not None
        assert (leased.id, leased.lease_token_id) == (excluded, other)
    # Not even once its lease expired: the excluded token never gets it.
    past = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    with sessions() as session, session.begin():
        assert (
            jobs.lease(
                session=session,
                worker="w",
                token_id=token_id,
                kinds=None,
                lease_seconds=60,
                now=past,
            )
            is None
        )


def test_the_lease_holder_is_recorded_and_cleared_when_the_lease_ends(
    sessions: sessionmaker[Session], token_id: int
) -> None:
    other = _worker_token(sessions, "other")
    policy = jobs.JobPolicy(
        lease_seconds=60, max_attempts=2, backoff_base_seconds=0, backoff_max_seconds=0
    )
    with sessions() as session, session.begin():
        job_id = jobs.create_job(
            session=session, kind="evaluate", payload={}, created_by="t", max_attempts=2
        ).id
    with sessions() as session, session.begin():
        job = jobs.lease(
            session=session, worker="w", token_id=token_id, kinds=None, lease_seconds=60
        )
        assert job is not None
        assert job.lease_token_id == token_id
        fencing = job.fencing_token
    # Released: nobody holds it.
    with sessions() as session, session.begin():
        released = jobs.fail(
            session=session,
            job_id=job_id,
            fencing_token=fencing,
            token_id=token_id,
            error="",
            retryable=True,
            release=True,
            policy=policy,
        )
        assert (released.status, released.lease_token_id) == ("queued", None)
    # Leased by another, expired twice over its last attempt: dead, and nobody holds it.
    later = dt.datetime.now(dt.UTC)
    for holder in (other, token_id):
        later += dt.timedelta(seconds=120)
        with sessions() as session, session.begin():
            job = jobs.lease(
                session=session,
                worker="w",
                token_id=holder,
                kinds=None,
                lease_seconds=60,
                now=later,
            )
            assert job is not None
            assert job.lease_token_id == holder
            assert job.fencing_token != fencing
            fencing = job.fencing_token
    with sessions() as session, session.begin():
        assert jobs.reap_expired(session=session, now=later + dt.timedelta(seconds=120)) == [job_id]
    with sessions() as session, session.begin():
        dead = jobs.get_job(session=session, job_id=job_id)
        assert (dead.status, dead.lease_token_id) == ("dead", None)
