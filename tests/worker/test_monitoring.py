"""Scheduled monitoring run by the real worker against the registry app (in-process,
SQLite and PostgreSQL): greedy continuations of a degenerate expert (its module forces one
token) are flagged for repetition while a working expert's and the base's are not, and a
new version that forgets its domain is flagged for the worsening (docs/governance.md,
"Monitoring"). Artifacts: the random tiny base and experts of tests/worker/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from helpers.artifacts import make_datasheet
from helpers.in_process import in_process_agora

from registry.client import Agora
from worker.runner import Worker

SAMPLES = [
    "def add(a, b):\n    return a + b\n" * 2,
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    from registry.app import create_app
    from registry.settings import Settings

    # Experts go active at once: monitoring measures active experts.
    settings = Settings(
        data_dir=tmp_path / "agora", database_url=database_url, arrival_checks=False
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def tokens(client: TestClient) -> dict[str, str]:
    from registry.services.tokens import create_token

    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    secrets: dict[str, str] = {}
    with runtime.sessions() as session, session.begin():
        for name, role in [
            ("admin", "admin"),
            ("alice", "contributor"),
            ("moderator", "moderator"),
            ("worker", "worker"),
        ]:
            _, secrets[name] = create_token(
                session=session, name=name, role=role, trusted=role == "worker"
            )
    return secrets


def sdk(client: TestClient, token: str, cache: Path) -> Agora:
    return in_process_agora(client, token, cache_dir=cache)


def degenerate_expert(tiny: dict[str, Any], out: Path, token: int = 100) -> Path:
    """Expert a's file with its modules rewritten to force one token: always routed to
    (a large router bias), and adding a large multiple of that token's output embedding
    whatever the input (w_in pairs +x and -x, so the sum of the GELUs is about |x| > 0)."""
    from modelcore.artifacts import load_base
    from modelcore.experts import load_expert, save_expert

    bundle = load_base(tiny["base"])
    direction_D = bundle.model.lm_head.weight[token].detach().clone()
    tensors, meta = load_expert(tiny["experts"]["a"])
    for name, value in list(tensors.items()):
        if name.endswith("router_bias"):
            tensors[name] = torch.full_like(value, 50.0)
        elif name.endswith("router_row"):
            tensors[name] = torch.zeros_like(value)
        elif name.endswith("w_in"):
            w_DF = torch.zeros_like(value)
            half = w_DF.shape[1] // 2
            for i in range(half):
                w_DF[i, i], w_DF[i, half + i] = 10.0, -10.0
            tensors[name] = w_DF
        elif name.endswith("w_out"):
            tensors[name] = torch.ones(value.shape[0], 1) * direction_D[None, :] * 50.0
    save_expert(out, tensors, base_revision=meta["base_revision"])
    return out


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def schedule(client: TestClient, token: str) -> list[str]:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    made = client.post("/v1/monitoring/schedules", json={"not_before": past}, headers=auth(token))
    assert made.status_code == 201, made.text
    return list(made.json()["jobs"])


def run_jobs(worker_sdk: Agora, n: int) -> None:
    worker = Worker(worker_sdk, name="w-monitor", poll_interval=0.05, lease_seconds=30)
    worker.max_jobs = n
    assert worker.run() == n
    assert worker.outcomes == ["succeeded"] * n


def runs_of(client: TestClient, token: str, expert_id: str) -> list[dict[str, Any]]:
    response = client.get(
        "/v1/monitoring/runs", params={"expert_id": expert_id}, headers=auth(token)
    )
    return list(response.json()["items"])


def registry_flags(client: TestClient, token: str) -> list[dict[str, Any]]:
    items = client.get("/v1/reports", headers=auth(token)).json()["items"]
    return [r for r in items if r["reporter"] == "registry"]


def test_monitoring_flags_a_degenerate_expert_and_a_forgetting_version(
    client: TestClient, tokens: dict[str, str], tiny: dict[str, Any], tmp_path: Path
) -> None:
    admin = sdk(client, tokens["admin"], tmp_path / "c1")
    base = tiny["base"]
    admin.upload_base_model(
        base / "config.json", base / "tokenizer.json", base / "model.safetensors"
    )
    alice = sdk(client, tokens["alice"], tmp_path / "c2")
    sheet = make_datasheet(name="Snippets", domain="Small programs.", samples=SAMPLES).decode()
    good = alice.submit_expert(tiny["experts"]["a"], sheet, tiny["revision"])
    stuck_file = degenerate_expert(tiny, tmp_path / "stuck.safetensors")
    stuck = alice.submit_expert(stuck_file, sheet, tiny["revision"])
    news = client.post(
        "/v1/text-sets",
        json={"name": "news", "date": "2026-12-01", "texts": ["SELECT name FROM users;"]},
        headers=auth(tokens["moderator"]),
    )
    assert news.status_code == 201, news.text
    worker_sdk = sdk(client, tokens["worker"], tmp_path / "c3")
    moderator = tokens["moderator"]

    schedule(client, moderator)
    run_jobs(worker_sdk, 2)
    (good_run,) = runs_of(client, moderator, good.id)
    (stuck_run,) = runs_of(client, moderator, stuck.id)
    # One token over and over: (48 - 4) of 45 4-grams repeat in each continuation.
    assert stuck_run["repetition"] == pytest.approx(44 / 45)
    # The random tiny base repeats itself too (measured: 0.7 of its 4-grams), so a rate
    # above the threshold alone flags nothing: the working expert repeats no more than
    # the base and is not flagged; the stuck one repeats more than both and is.
    assert good_run["repetition"] <= good_run["base_repetition"] < stuck_run["repetition"]
    assert good_run["base_repetition"] == stuck_run["base_repetition"]
    assert good_run["report_id"] is None
    (flag,) = registry_flags(client, moderator)
    assert flag["expert_id"] == stuck.id
    assert stuck_run["report_id"] == flag["id"]
    assert "repeat" in flag["reason"]
    numbers = json.loads(flag["evidence"])
    assert numbers["repetition"] == stuck_run["repetition"]
    assert numbers["base_repetition"] == stuck_run["base_repetition"]
    assert set(numbers["text_sets"]) == {"samples", "news@2026-12-01"}
    # Both own-domain numbers are each expert's first: its reference, no change.
    assert good_run["worsening"] == stuck_run["worsening"] == 0.0

    # The working expert's new version forgets its domain: measured on the samples of
    # its reference version, its bits per byte worsen, and it is flagged with the numbers.
    alice.submit_expert(stuck_file, sheet, tiny["revision"], expert_id=good.id)
    schedule(client, moderator)
    run_jobs(worker_sdk, 2)
    latest = runs_of(client, moderator, good.id)[0]
    assert latest["version"] == 2
    assert latest["reference_bits_per_byte"] == good_run["own_bits_per_byte"]
    assert latest["own_bits_per_byte"] > good_run["own_bits_per_byte"] * 1.02
    flagged = [f for f in registry_flags(client, moderator) if f["expert_id"] == good.id]
    assert len(flagged) == 1
    assert "worsened by" in flagged[0]["reason"]
    evidence = json.loads(flagged[0]["evidence"])
    assert evidence["worsening"] == pytest.approx(latest["worsening"])
    assert evidence["worsening"] > 0.02
