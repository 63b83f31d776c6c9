"""Concurrency: many writes at once against a real uvicorn, on SQLite and PostgreSQL.

Each test starts the app under uvicorn in a thread of this process (real HTTP, real
connection handling, the routes' thread pool) and fires its requests from a pool of
client threads released together by a barrier. What must hold, whatever the
interleaving (docs/reliability.md):

* every 2xx names bytes that download bit-exact, each digest is stored once, and
  ``agora admin fsck`` finds no damage and no orphan, staging file or pending key;
* an Idempotency-Key sent with different bodies at once is applied once: the others are
  refused (409) before they commit any blob (issue 14, defect 5); sent with the same
  body, every request answers the one stored outcome;
* an owner's identical submissions racing make one expert (the others answer it, 200);
* two contributors racing for the same new version (``version`` form field): one wins,
  the other gets 409 ``version_conflict``; without ``version``, racing versions get
  distinct, dense numbers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from helpers.adversarial import report, scaled
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from helpers.processes import free_port
from sqlalchemy import func, select

from registry.app import create_app
from registry.db.models import Blob, Expert, Job
from registry.runtime import Runtime
from registry.services.fsck import FsckReport, check_storage
from registry.services.gc import collect_garbage
from registry.services.tokens import create_token
from registry.settings import Settings
from registry.storage import digest_of_key

T = TypeVar("T")
BASE_FIELDS = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "weights": "model.safetensors",
}


@dataclass
class Live:
    """A registry served by uvicorn in this process, with its tokens and base revision."""

    url: str
    runtime: Runtime
    tokens: dict[str, str]
    revision: str
    schema: dict[str, Any]
    backend: str

    def client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        return httpx.Client(base_url=self.url, timeout=120, limits=limits)

    def expert(self, seed: int) -> bytes:
        return make_expert_bytes(self.schema, base_revision=self.revision, seed=seed)

    def fsck(self) -> FsckReport:
        with self.runtime.sessions() as session:
            return check_storage(
                session=session, store=self.runtime.store, staging=self.runtime.staging
            )

    def count(self, model: Any) -> int:
        with self.runtime.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _auth(token: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def submit(
    client: httpx.Client,
    live: Live,
    token: str,
    weights: bytes,
    sheet: bytes,
    *,
    expert_id: str | None = None,
    version: int | None = None,
    key: str | None = None,
) -> httpx.Response:
    data = {"base_revision": live.revision}
    if expert_id is not None:
        data["expert_id"] = expert_id
    if version is not None:
        data["version"] = str(version)
    return client.post(
        "/v1/experts",
        files={"weights": ("e.safetensors", weights), "datasheet": ("DATASHEET.md", sheet)},
        data=data,
        headers=_auth(token, key),
    )


def sheet(name: str) -> bytes:
    return make_datasheet(name=name, samples=[f"{name}: notes on tide pools and sea stars"])


def at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run every call in its own thread, all released together; results in call order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout=60)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        # Rate limits have tests of their own; here many requests come from few tokens.
        rate_limit_token_per_second=0,
        rate_limit_anonymous_per_second=0,
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            backlog=1024,
            # Longer than the test: uvicorn's 5 s default closed a pooled connection the
            # client was reusing for a download (a reset), a keep-alive race, not storage.
            timeout_keep_alive=300,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
        time.sleep(0.05)
    runtime: Runtime = app.state.runtime
    tokens: dict[str, str] = {}
    with runtime.sessions() as session, session.begin():
        for name, role in [
            ("admin", "admin"),
            ("alice", "contributor"),
            ("bob", "contributor"),
            ("carol", "contributor"),
            ("dave", "contributor"),
        ]:
            tokens[name] = create_token(session=session, name=name, role=role)[1]
    files = make_base_files()
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(
            "/v1/base-models",
            files={field: (name, files[name]) for field, name in BASE_FIELDS.items()},
            headers=_auth(tokens["admin"]),
        )
    assert response.status_code == 201, response.text
    body = response.json()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    try:
        yield Live(url, runtime, tokens, body["revision"], body["expert_schema"], backend)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def assert_no_leftovers(live: Live) -> FsckReport:
    found = live.fsck()
    assert found.clean, str(found)
    assert found.orphans == [], str(found)
    assert found.unreferenced_rows == [], str(found)
    assert found.staging == [], str(found)
    assert found.pending_keys == [], str(found)
    return found


def test_concurrent_uploads_are_stored_once_readable_and_leave_no_orphans(live: Live) -> None:
    n = scaled(200, 1000)
    contributors = ["alice", "bob", "carol", "dave"]
    shared = live.expert(seed=7)
    repeated_sheet = sheet("the same expert, sent again and again")
    plan: list[tuple[str, bytes, bytes]] = []  # (owner, weights, datasheet)
    for i in range(n // 2):  # distinct bytes
        plan.append((contributors[i % 4], live.expert(seed=1000 + i), sheet(f"distinct {i}")))
    for i in range(n // 4):  # identical bytes, distinct experts
        plan.append((contributors[i % 4], shared, sheet(f"shared weights {i}")))
    for i in range(n - len(plan)):  # one owner's identical submissions: one expert each
        plan.append((contributors[i % 2], shared, repeated_sheet))
    random.Random(14).shuffle(plan)

    with live.client() as client:
        started = time.monotonic()
        responses = at_once(
            [
                lambda o=owner, w=weights, s=datasheet: submit(client, live, live.tokens[o], w, s)
                for owner, weights, datasheet in plan
            ]
        )
        elapsed = time.monotonic() - started
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 201}, {
            code: next(r.text for r in responses if r.status_code == code) for code in statuses
        }
        for (_, weights, _), response in zip(plan, responses, strict=True):
            body = response.json()
            assert body["digest"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"

        def download(response: httpx.Response) -> bytes:
            body = response.json()
            got = client.get(
                f"/v1/experts/{body['id']}/weights", params={"version": body["version"]}
            )
            assert got.status_code == 200, got.text
            return got.content

        with ThreadPoolExecutor(max_workers=16) as pool:
            downloads = list(pool.map(download, responses))
        for (_, weights, _), content in zip(plan, downloads, strict=True):
            assert content == weights

    # An owner's repeats: one expert each, created once (201), answered to the others (200).
    for owner in contributors[:2]:
        mine = [
            r.json() | {"status_code": r.status_code}
            for (o, w, s), r in zip(plan, responses, strict=True)
            if o == owner and s == repeated_sheet
        ]
        assert len({b["id"] for b in mine}) == 1, mine
        assert sum(b["status_code"] == 201 for b in mine) == 1
    distinct_digests = {hashlib.sha256(w).hexdigest() for _, w, _ in plan}
    assert live.count(Expert) == n // 2 + n // 4 + 2
    # One blob per digest: the experts' and the base model's three files, nothing else.
    assert live.count(Blob) == len(distinct_digests) + 3
    objects = {blob.key for blob in live.runtime.store.list_blobs()}
    assert len(objects) == len(distinct_digests) + 3
    found = assert_no_leftovers(live)
    report(
        "concurrent uploads",
        backend=live.backend,
        uploads=n,
        accepted_2xx=sum(statuses.values()),
        created_201=statuses[201],
        repeats_200=statuses[200],
        server_errors=0,
        distinct_digests=len(distinct_digests),
        blob_rows=live.count(Blob),
        orphans=len(found.orphans),
        seconds=f"{elapsed:.1f}",
    )


def test_one_idempotency_key_with_different_bodies_commits_one_outcome_and_no_orphan(
    live: Live,
) -> None:
    n = scaled(20, 100)
    alice, admin = live.tokens["alice"], live.tokens["admin"]
    with live.client() as client:
        # Expert uploads: one key, n different bodies, all at once.
        bodies = [live.expert(seed=500 + i) for i in range(n)]
        responses = at_once(
            [
                lambda w=w: submit(client, live, alice, w, sheet("one key"), key="k-expert")
                for w in bodies
            ]
        )
        codes = Counter(r.status_code for r in responses)
        assert codes[201] == 1, codes
        assert codes[409] == n - 1, codes
        assert {r.json()["code"] for r in responses if r.status_code == 409} == {
            "idempotency_key_reused"
        }
        winner = next(i for i, r in enumerate(responses) if r.status_code == 201)
        # A refused request releases its key: the same key then carries a corrected one.
        broken = submit(client, live, alice, b"not safetensors", sheet("fixed"), key="k-fix")
        assert broken.status_code == 422, broken.text
        fixed = submit(client, live, alice, live.expert(seed=901), sheet("fixed"), key="k-fix")
        assert fixed.status_code == 201, fixed.text
        # The winner's body, sent again with the key, replays its answer.
        again = submit(client, live, alice, bodies[winner], sheet("one key"), key="k-expert")
        assert (again.status_code, again.json()) == (201, responses[winner].json())

        # The same body n times at once: one expert, every request answers it.
        same = live.expert(seed=900)
        echoes = at_once(
            [lambda: submit(client, live, alice, same, sheet("echo"), key="k-same")] * n
        )
        assert {r.status_code for r in echoes} == {201}, [r.text for r in echoes]
        assert len({json.dumps(r.json(), sort_keys=True) for r in echoes}) == 1

        # Base model uploads: one key, different bodies.
        bases = [make_base_files(seed=10 + i) for i in range(max(2, n // 4))]
        base_answers = at_once(
            [
                lambda f=f: client.post(
                    "/v1/base-models",
                    files={field: (name, f[name]) for field, name in BASE_FIELDS.items()},
                    headers=_auth(admin, "k-base"),
                )
                for f in bases
            ]
        )
        codes_base = Counter(r.status_code for r in base_answers)
        assert (codes_base[201], codes_base[409]) == (1, len(bases) - 1), codes_base

        # Compositions and evaluations: one key, different bodies; one job each.
        experts = [responses[winner].json()["id"], echoes[0].json()["id"]]
        jobs_before = live.count(Job)
        compositions = at_once(
            [
                lambda i=i: client.post(
                    "/v1/compositions",
                    json={
                        "base_revision": live.revision,
                        "method": "ensemble",
                        "experts": experts,
                        "texts": [f"tide pools, take {i}"],
                    },
                    headers=_auth(alice, "k-compose"),
                )
                for i in range(n)
            ]
        )
        evaluations = at_once(
            [
                lambda i=i: client.post(
                    "/v1/evaluations",
                    json={"expert_id": experts[0], "text_sets": {"news": [f"text {i}"]}},
                    headers=_auth(alice, "k-evaluate"),
                )
                for i in range(n)
            ]
        )
        for answers in (compositions, evaluations):
            codes_jobs = Counter(r.status_code for r in answers)
            assert (codes_jobs[202], codes_jobs[409]) == (1, n - 1), [r.text for r in answers]
        assert live.count(Job) == jobs_before + 2

    found = assert_no_leftovers(live)
    # Blobs: the fixture's base, the three experts and the winning base; nothing from the
    # refused requests.
    won_base = bases[next(i for i, r in enumerate(base_answers) if r.status_code == 201)]
    expected = {
        hashlib.sha256(data).hexdigest()
        for data in [
            *make_base_files().values(),
            *won_base.values(),
            bodies[winner],
            same,
            live.expert(seed=901),
        ]
    }
    with live.runtime.sessions() as session:
        assert set(session.scalars(select(Blob.digest))) == expected
    assert {digest_of_key(blob.key) for blob in live.runtime.store.list_blobs()} == expected
    report(
        "one Idempotency-Key, different bodies at once",
        backend=live.backend,
        requests=n * 4 + len(bases),
        applied=5,
        refused_409=(n - 1) * 3 + len(bases) - 1,
        server_errors=0,
        orphans=len(found.orphans),
    )


def test_racing_for_the_same_new_version_one_wins_the_other_gets_409(live: Live) -> None:
    rounds = scaled(4, 20)
    alice, admin = live.tokens["alice"], live.tokens["admin"]
    with live.client() as client:
        first = submit(client, live, alice, live.expert(seed=1), sheet("versioned"))
        assert first.status_code == 201, first.text
        expert_id = first.json()["id"]
        stored = {1: live.expert(seed=1)}
        # `version` is checked before any byte is stored: a number that is not next is a
        # 409, one that is no version number a 400.
        blobs = live.count(Blob)
        for bad, status, code in [
            ("3", 409, "version_conflict"),
            ("1", 409, "version_conflict"),
            ("0", 400, "invalid_version"),
            ("two", 400, "invalid_version"),
            (str(2**31), 400, "invalid_version"),
            ("-2", 400, "invalid_version"),
        ]:
            refused = client.post(
                "/v1/experts",
                files={
                    "weights": ("e.safetensors", live.expert(seed=2)),
                    "datasheet": ("DATASHEET.md", sheet("versioned")),
                },
                data={"base_revision": live.revision, "expert_id": expert_id, "version": bad},
                headers=_auth(alice),
            )
            assert (refused.status_code, refused.json()["code"]) == (status, code), bad
        new_expert_at_2 = submit(client, live, alice, live.expert(seed=2), sheet("x"), version=2)
        assert new_expert_at_2.json()["code"] == "invalid_version"
        assert live.count(Blob) == blobs
        conflicts = 0
        for r in range(rounds):
            target = len(stored) + 1
            candidates = {
                alice: live.expert(seed=100 + 2 * r),
                admin: live.expert(seed=101 + 2 * r),
            }
            answers = at_once(
                [
                    lambda t=t, w=w, v=target: submit(
                        client, live, t, w, sheet("versioned"), expert_id=expert_id, version=v
                    )
                    for t, w in candidates.items()
                ]
            )
            codes = sorted(a.status_code for a in answers)
            assert codes == [201, 409], [a.text for a in answers]
            lost = next(a for a in answers if a.status_code == 409)
            assert lost.json()["code"] == "version_conflict"
            won_by, won = next(
                (t, a) for t, a in zip(candidates, answers, strict=True) if a.status_code == 201
            )
            assert won.json()["version"] == target
            stored[target] = candidates[won_by]
            conflicts += 1

        # Without `version`, racing versions all land, with distinct, dense numbers.
        appends = [live.expert(seed=300 + i) for i in range(4)]
        answers = at_once(
            [
                lambda w=w: submit(client, live, alice, w, sheet("versioned"), expert_id=expert_id)
                for w in appends
            ]
        )
        assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
        numbers = sorted(a.json()["version"] for a in answers)
        assert numbers == list(range(len(stored) + 1, len(stored) + 5))
        for weights, answer in zip(appends, answers, strict=True):
            stored[answer.json()["version"]] = weights
        for number, weights in stored.items():
            got = client.get(f"/v1/experts/{expert_id}/weights", params={"version": number})
            assert got.content == weights

    # A loser may have committed its blob before losing: an orphan, never damage, and
    # the garbage collector removes it (grace 0 here).
    found = live.fsck()
    assert found.clean, str(found)
    orphans_after_race = len(found.orphans)
    assert orphans_after_race <= rounds
    with live.runtime.sessions() as session:
        collect_garbage(
            session=session,
            store=live.runtime.store,
            staging=live.runtime.staging,
            grace=dt.timedelta(0),
        )
    assert_no_leftovers(live)
    with live.client() as client:
        for number, weights in stored.items():
            got = client.get(f"/v1/experts/{expert_id}/weights", params={"version": number})
            assert got.content == weights
    report(
        "racing for one new version",
        backend=live.backend,
        rounds=rounds,
        won=rounds,
        refused_409=conflicts,
        orphans_left_by_losers=orphans_after_race,
        orphans_after_gc=0,
    )
