"""Paths and names: hostile ids, names and keys never reach the filesystem or S3 keys.

Every string of ``hostile()`` (path traversal plain and percent-encoded, backslashes, NUL,
Unicode look-alikes of '.' and '/', 10,000-character strings...) is sent wherever the API
takes an id or a name: expert, base revision, composition and job ids in paths (fully
percent-encoded, and with '/' and '%' left raw), query parameters, upload form fields
(``base_revision``, ``expert_id``, a base model's ``name``), a datasheet's ``name`` and
``domain``, ``Idempotency-Key`` headers and JSON bodies. What must hold, on SQLite and
PostgreSQL, with the local blob store and with S3 (moto's server on loopback):

* no answer is a 5xx;
* every object the blob store holds afterwards has a key ``sha256/<2 hex>/<62 hex>``
  (``registry.storage.digest_of_key``), however many hostile-named uploads were accepted;
* nothing on disk is named after any of the strings: each carries a marker unique to the
  run, and no entry under the test's directory, the data directory, the working
  directory, /tmp or / holds it; the data directory holds only the database, blobs/ and
  staging/, and no staging file is left.

``AGORA_ADVERSARIAL=heavy`` sends every string to every target (the CI run sends a
deterministic sample) and prints the figures.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.adversarial import HEAVY, report
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from helpers.databases import empty_tables

from registry.app import create_app
from registry.settings import Settings
from registry.storage import BlobStore, digest_of_key

MARK = f"agoraprobe{uuid.uuid4().hex[:8]}"
BASE_FIELDS = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "weights": "model.safetensors",
}


def hostile(mark: str = MARK) -> list[str]:
    """Names an attacker would try, each holding ``mark`` (so a file named after one is
    found by name)."""
    return [
        f"../{mark}",
        f"../../../../../../tmp/{mark}",
        f"..%2f..%2f{mark}",
        f"%2e%2e%2f%2e%2e%2f{mark}",
        f"%2E%2E/{mark}",
        f"%252e%252e%252f{mark}",
        f"..%c0%af{mark}",
        f"..\\..\\{mark}",
        f"C:\\{mark}",
        f"\\\\server\\share\\{mark}",
        f"/{mark}",
        f"//{mark}",
        f"{mark}/../..",
        f"{mark}\x00.safetensors",
        f"{mark}%00",
        f"sha256/aa/{mark}",
        f"s3://bucket/{mark}",
        f"\uff0e\uff0e\uff0f{mark}",  # fullwidth ．．／
        f"..\u2215..\u2215{mark}",  # DIVISION SLASH
        f"\u2025/{mark}",  # TWO DOT LEADER
        f"..\u2044{mark}",  # FRACTION SLASH
        f"{mark}\u202e",  # RIGHT-TO-LEFT OVERRIDE
        f"{mark}\n../{mark}",
        f"~/{mark}",
        f"$HOME/{mark}",
        f"{mark}'\"<>;`|&",
        f"{mark}?x=1#frag",
        f"ex_{mark}",
        mark + "a" * 10_000,
        "../" * 3_000 + mark,
    ]


@dataclass
class Probe:
    app: FastAPI
    client: TestClient
    headers: dict[str, dict[str, str]]
    revision: str
    schema: dict[str, Any]
    expert_id: str
    statuses: Counter[int] = field(default_factory=Counter)
    unsendable: int = 0
    server_errors: list[str] = field(default_factory=list)
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def send(self, method: str, url: str, *, role: str | None = None, **kwargs: Any) -> None:
        headers = {**(self.headers[role] if role else {}), **kwargs.pop("headers", {})}
        try:
            response = self.client.request(method, url, headers=headers, **kwargs)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError, ValueError):
            self.unsendable += 1  # the client library refuses to put it on the wire
            return
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{method} {url[:120]} -> {response.status_code}")

    def upload(
        self,
        *,
        datasheet: bytes | None = None,
        headers: dict[str, str] | None = None,
        **fields: str,
    ) -> None:
        weights = make_expert_bytes(self.schema, base_revision=self.revision, seed=next(self.seeds))
        self.send(
            "POST",
            "/v1/experts",
            role="alice",
            files={
                "weights": ("expert.safetensors", weights),
                "datasheet": ("DATASHEET.md", datasheet or make_datasheet()),
            },
            data={"base_revision": self.revision, **fields},
            headers=headers or {},
        )


def _encodings(s: str) -> list[str]:
    """The string as a path segment: fully percent-encoded, and with '/' and '%' raw (so
    '../' and '%2e%2e' reach the server as such, after the client's own normalisation)."""
    return [quote(s, safe=""), quote(s, safe="/%")]


def _targets(p: Probe, *, writes_only: bool = False) -> list[Callable[[str], None]]:
    """Where the strings go; ``writes_only``: the uploads alone (what writes blobs)."""
    ex, rev = p.expert_id, p.revision

    def paths(template: str, role: str | None = None, method: str = "GET") -> Callable[[str], None]:
        def go(s: str) -> None:
            for segment in _encodings(s):
                p.send(method, template.format(x=segment), role=role)

        return go

    def query(url: str, name: str, role: str | None = None) -> Callable[[str], None]:
        return lambda s: p.send("GET", url, role=role, params={name: s})

    def json_body(url: str, role: str | None, make: Callable[[str], Any]) -> Callable[[str], None]:
        return lambda s: p.send("POST", url, role=role, json=make(s))

    def idempotency(s: str) -> None:
        for value in (s, s.encode("utf-8")):
            p.upload(headers={"Idempotency-Key": value})

    def base_named(s: str) -> None:
        files = make_base_files(seed=next(p.seeds))
        p.send(
            "POST",
            "/v1/base-models",
            role="admin",
            files={f: (name, files[name]) for f, name in BASE_FIELDS.items()},
            data={"name": s},
        )

    writes: list[Callable[[str], None]] = [
        lambda s: p.upload(base_revision=s),
        lambda s: p.upload(expert_id=s),
        lambda s: p.upload(datasheet=make_datasheet(name=s)),
        lambda s: p.upload(datasheet=make_datasheet(domain=s, name="Tide pools")),
        idempotency,
        base_named,
    ]
    if writes_only:
        return writes
    return [
        *writes,
        paths("/v1/experts/{x}"),
        paths("/v1/experts/{x}/versions"),
        paths("/v1/experts/{x}/datasheet"),
        paths("/v1/experts/{x}/weights"),
        paths("/v1/experts/{x}/weights", method="HEAD"),
        paths("/v1/experts/{x}/evaluations"),
        paths("/v1/experts/{x}/moderation", role="moderator"),
        paths("/v1/base-models/{x}"),
        paths("/v1/base-models/{x}/files/weights"),
        paths(f"/v1/base-models/{rev}/files/{{x}}"),
        paths("/v1/compositions/{x}"),
        paths("/v1/compositions/{x}/evaluations"),
        paths("/v1/jobs/{x}", role="worker"),
        paths("/v1/jobs/{x}/heartbeat", role="worker", method="POST"),
        paths("/v1/experts/{x}/disable", role="moderator", method="POST"),
        query("/v1/experts", "q"),
        query("/v1/experts", "base_revision"),
        query("/v1/experts", "cursor"),
        query("/v1/experts", "status", role="moderator"),
        query("/v1/jobs", "kind", role="admin"),
        json_body("/v1/search", None, lambda s: {"texts": [s], "base_revision": s}),
        json_body("/v1/search", None, lambda s: {"texts": [s], "base_revision": rev}),
        json_body(
            "/v1/compositions",
            "alice",
            lambda s: {"method": "average", "base_revision": rev, "experts": [s, ex]},
        ),
        json_body("/v1/evaluations", "alice", lambda s: {"expert_id": s, "text_sets": {s: [s]}}),
        json_body(
            "/v1/evaluations", "alice", lambda s: {"composition_id": s, "text_sets": {"a": ["t"]}}
        ),
        json_body(f"/v1/experts/{ex}/disable", "moderator", lambda s: {"reason": s}),
        json_body("/v1/jobs/lease", "worker", lambda s: {"worker": s, "kinds": [s]}),
    ]


def _entries_named_after_the_mark(roots: list[tuple[Path, bool]]) -> list[str]:
    found = []
    for root, recursive in roots:
        if not root.is_dir():
            continue
        entries = root.rglob("*") if recursive else root.iterdir()
        found += [str(e) for e in entries if MARK in e.name]
    return found


def _run(
    settings: Settings, *, writes_only: bool = False, extra: int = 0
) -> tuple[Probe, BlobStore]:
    """Send the strings to the targets: all pairs when heavy, else every target and every
    string once plus ``extra`` pairs drawn at random (a fixed seed)."""
    from registry.services.tokens import create_token

    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        runtime = app.state.runtime
        with runtime.sessions() as session, session.begin():
            secrets = {
                name: create_token(session=session, name=name, role=role)[1]
                for name, role in [
                    ("admin", "admin"),
                    ("alice", "contributor"),
                    ("moderator", "moderator"),
                    ("worker", "worker"),
                ]
            }
        headers = {name: {"Authorization": f"Bearer {s}"} for name, s in secrets.items()}
        files = make_base_files()
        base = client.post(
            "/v1/base-models",
            files={f: (name, files[name]) for f, name in BASE_FIELDS.items()},
            headers=headers["admin"],
        )
        assert base.status_code == 201, base.text
        revision, schema = base.json()["revision"], base.json()["expert_schema"]
        first = client.post(
            "/v1/experts",
            files={
                "weights": ("e", make_expert_bytes(schema, base_revision=revision)),
                "datasheet": ("d", make_datasheet()),
            },
            data={"base_revision": revision},
            headers=headers["alice"],
        )
        assert first.status_code == 201, first.text
        probe = Probe(app, client, headers, revision, schema, first.json()["id"])
        targets = _targets(probe, writes_only=writes_only)
        strings = hostile()
        pairs = list(itertools.product(range(len(targets)), range(len(strings))))
        if not HEAVY:
            # Every target and every string at least once, then a fixed sample of the rest.
            rng = random.Random(14)
            covered = {(t, t % len(strings)) for t in range(len(targets))}
            covered |= {(s % len(targets), s) for s in range(len(strings))}
            rest = [pair for pair in pairs if pair not in covered]
            pairs = sorted(covered | set(rng.sample(rest, k=min(len(rest), extra))))
        for t, s in pairs:
            targets[t](strings[s])
        # Every staging file is gone by the time the app has answered.
        assert runtime.staging.files() == []
    return probe, runtime.store


def _check_disk(settings: Settings, tmp: Path) -> None:
    data = settings.data_dir
    allowed = {"agora.db", "agora.db-wal", "agora.db-shm", "agora.db-journal", "blobs", "staging"}
    assert {e.name for e in data.iterdir()} <= allowed
    assert [p for p in (data / "staging").rglob("*") if p.name.startswith("upload-")] == []
    assert (
        _entries_named_after_the_mark(
            [
                (tmp, True),
                (tmp.parent, False),
                (Path.cwd(), False),
                (Path("/tmp"), False),
                (Path("/"), False),
            ]
        )
        == []
    )


@pytest.fixture
def clean_database(migrated_database_url: str) -> Iterator[str]:
    empty_tables(migrated_database_url)
    yield migrated_database_url
    empty_tables(migrated_database_url)


def _finish(probe: Probe, name: str, keys: list[str]) -> None:
    bad_keys = [k for k in keys if digest_of_key(k) is None]
    tried = sum(probe.statuses.values())
    accepted = sum(n for status, n in probe.statuses.items() if status < 300)
    report(
        name,
        tried=tried,
        accepted=accepted,
        unsendable=probe.unsendable,
        server_errors=len(probe.server_errors),
        objects=len(keys),
        non_digest_keys=len(bad_keys),
    )
    assert probe.server_errors == []
    assert bad_keys == []
    assert accepted > 0  # hostile names that are valid names were stored, under digests


def test_local_store_keys_and_files(clean_database: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "agora",
        database_url=clean_database,
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )
    probe, store = _run(settings, extra=40)
    root = Path(store.location)
    keys = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    _finish(
        probe, f"paths_and_names local {'sqlite' if settings.is_sqlite else 'postgresql'}", keys
    )
    _check_disk(settings, tmp_path)


def test_s3_store_keys(
    clean_database: str, tmp_path: Path, s3_server: str, s3_storage_url: str
) -> None:
    import boto3

    settings = Settings(
        data_dir=tmp_path / "agora",
        database_url=clean_database,
        storage_url=s3_storage_url + "/registry",
        s3_endpoint_url=s3_server,
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )
    probe, _ = _run(settings, writes_only=True)
    bucket = s3_storage_url.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for obj in page.get("Contents", [])
    ]
    # Every object of the bucket, not only those under the store's prefix.
    assert all(k.startswith("registry/") for k in keys), keys[:5]
    _finish(
        probe,
        f"paths_and_names s3 {'sqlite' if settings.is_sqlite else 'postgresql'}",
        [k.removeprefix("registry/") for k in keys],
    )
    _check_disk(settings, tmp_path)


def test_the_marker_search_finds_a_file_named_after_a_hostile_string(tmp_path: Path) -> None:
    """The disk check is not vacuous: a file named after a string is found."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"x{MARK}").write_bytes(b"")
    assert _entries_named_after_the_mark([(tmp_path, True)]) != []
    assert all(MARK in s for s in hostile())
    assert os.sep == "/"  # the traversal strings above are written for POSIX paths
