"""Checks on arrival (docs/governance.md, "Checks on arrival"), on SQLite and PostgreSQL.

A submitted expert is quarantined until a real worker (the SDK's ``Worker`` over the
in-process app) has measured it on its own datasheet samples against the base. The tiny
random experts of tests/helpers/tiny_models.py move the base's numbers both ways: with
seed 0, expert ``b`` lowers the bits per byte of SQL text (helps: it becomes active) and
expert ``a`` raises those of a pangram (hurts: it is flagged). The tests read the measured
numbers back rather than assume them, and check the decision against them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers.artifacts import make_datasheet
from helpers.in_process import in_process_agora
from helpers.tiny_models import make_tiny_base
from pydantic import ValidationError
from sqlalchemy import select

from registry.client import Agora
from registry.db.models import Evaluation
from registry.settings import Settings

torch = pytest.importorskip("torch")

# Samples each tiny expert helps or hurts (measured through the worker below).
HELPED = ["SELECT name FROM users;", "SELECT name FROM users WHERE id = 3;"]
HURT = ["The quick brown fox jumps.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_base(tmp_path_factory.mktemp("arrival-model"))
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def min_gain() -> float:
    return 0.0


@pytest.fixture
def settings(database_url: str, tmp_path: Path, min_gain: float) -> Settings:
    # The suite runs with the checks off (tests/conftest.py); these tests turn them on.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        arrival_checks=True,
        arrival_min_gain=min_gain,
    )


@pytest.fixture
def world(client: TestClient, tokens: Any, tiny: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    made: list[Agora] = []

    def sdk(token: str) -> Agora:
        agora = in_process_agora(client, token, cache_dir=tmp_path / f"cache-{len(made)}")
        made.append(agora)
        return agora

    base = tiny["base"]
    sdk(tokens.admin).upload_base_model(
        base / "config.json", base / "tokenizer.json", base / "model.safetensors"
    )
    yield World(client, tokens, tiny, sdk)
    for agora in made:
        agora.close()


class World:
    def __init__(
        self, client: TestClient, tokens: Any, tiny: dict[str, Any], sdk: Callable[[str], Agora]
    ) -> None:
        self.client = client
        self.tokens = tokens
        self.tiny = tiny
        self.revision: str = tiny["revision"]
        self.alice = sdk(tokens.alice)
        self.worker = sdk(tokens.worker)

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self.tokens, who)}"}

    def submit(self, name: str, samples: list[str], expert_id: str | None = None) -> Any:
        sheet = make_datasheet(name=f"expert {name}", domain=f"domain {name}", samples=samples)
        return self.alice.submit_expert(
            self.tiny["experts"][name], sheet.decode(), self.revision, expert_id=expert_id
        )

    def expert(self, expert_id: str, who: str = "alice") -> dict[str, Any]:
        response = self.client.get(f"/v1/experts/{expert_id}", headers=self.h(who))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def run_check(self) -> None:
        """A real worker leases the queued arrival job and runs it."""
        from worker.runner import Worker

        leased = self.worker.lease_job("w-arrival", kinds=["evaluate"])
        assert leased is not None
        assert leased.payload["purpose"] == "arrival"
        assert list(leased.payload["text_sets"]) == ["samples"]
        outcome = Worker(self.worker, name="w-arrival", device="cpu").run_job(leased)
        assert outcome == "succeeded", outcome

    def reports(self) -> list[dict[str, Any]]:
        response = self.client.get("/v1/reports", headers=self.h("moderator"))
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def audit(self, action: str) -> list[dict[str, Any]]:
        response = self.client.get(
            "/v1/audit", params={"action": action}, headers=self.h("moderator")
        )
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def stored_score(self, expert_id: str) -> Evaluation:
        runtime = self.client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.sessions() as session:
            return session.scalars(
                select(Evaluation).where(Evaluation.expert_id == expert_id)
            ).one()


def _visible_to_others(world: World, expert_id: str) -> dict[str, int]:
    """What bob (another contributor) gets: listed, searched, composed, downloaded."""
    c, bob = world.client, world.h("bob")
    listed = {e["id"] for e in c.get("/v1/experts", headers=bob).json()["items"]}
    found = c.post(
        "/v1/search",
        json={"texts": HELPED, "base_revision": world.revision, "k": 8},
        headers=bob,
    )
    assert found.status_code == 200, found.text
    composed = c.post(
        "/v1/compositions",
        json={"method": "ensemble", "base_revision": world.revision, "experts": [expert_id]},
        headers=bob,
    )
    weights = c.get(f"/v1/experts/{expert_id}/weights", headers=bob)
    return {
        "listed": int(expert_id in listed),
        "searched": int(expert_id in {r["expert_id"] for r in found.json()["results"]}),
        "compose": composed.status_code,
        "weights": weights.status_code,
    }


def test_a_helpful_expert_is_quarantined_until_a_worker_checks_it_then_active(
    world: World,
) -> None:
    submitted = world.submit("b", HELPED)
    assert submitted.status == "quarantined"
    pending = world.expert(submitted.id)
    assert pending["status"] == "quarantined"
    arrival = pending["arrival"]
    assert (arrival["version"], arrival["state"], arrival["job_status"]) == (1, "pending", "queued")
    assert arrival["bits_per_byte"] is None

    # Nobody else lists, searches, composes or downloads it meanwhile.
    hidden = _visible_to_others(world, submitted.id)
    assert hidden == {"listed": 0, "searched": 0, "compose": 409, "weights": 409}
    composed = world.client.post(
        "/v1/compositions",
        json={"method": "ensemble", "base_revision": world.revision, "experts": [submitted.id]},
        headers=world.h("bob"),
    )
    assert composed.json()["code"] == "expert_quarantined"
    # Its owner, moderators and workers read it.
    for who in ("alice", "moderator", "worker"):
        weights = world.client.get(f"/v1/experts/{submitted.id}/weights", headers=world.h(who))
        assert weights.status_code == 200, (who, weights.text)

    world.run_check()

    done = world.alice.wait_for_arrival(submitted.id, timeout=5)
    assert done.status == "active"
    check = done.arrival
    assert check is not None
    assert check.state == "passed"
    stored = world.stored_score(submitted.id)
    assert stored.text_set == "samples"
    assert check.bits_per_byte == stored.bits_per_byte
    assert check.base_bits_per_byte == stored.base_bits_per_byte
    assert check.relative_change is not None
    assert check.relative_change < 0
    assert math.isclose(
        check.relative_change,
        (stored.bits_per_byte - stored.base_bits_per_byte) / stored.base_bits_per_byte,
    )
    assert check.min_gain == 0.0
    assert check.report_id is None
    # Recorded, by the registry; no report.
    (entry,) = world.audit("expert.arrival_pass")
    assert (entry["actor"], entry["target"]) == ("registry", f"expert:{submitted.id}")
    assert entry["detail"]["relative_change"] == check.relative_change
    assert world.reports() == []
    # Everyone's now, search included (this replica's index took it at the commit).
    shown = _visible_to_others(world, submitted.id)
    assert shown == {"listed": 1, "searched": 1, "compose": 202, "weights": 200}


def test_a_new_version_quarantines_the_expert_until_its_own_check(world: World) -> None:
    first = world.submit("b", HELPED)
    world.run_check()
    assert world.expert(first.id)["status"] == "active"

    # Version 2 (expert c's weights) raises the bits per byte of SQL: it is flagged, and
    # the expert stays out of everyone else's reach, version 1 included.
    second = world.submit("c", HELPED, expert_id=first.id)
    assert (second.version, second.status) == (2, "quarantined")
    assert world.expert(first.id)["arrival"]["version"] == 2
    pinned = world.client.post(
        "/v1/compositions",
        json={"method": "ensemble", "base_revision": world.revision, "experts": [f"{first.id}@1"]},
        headers=world.h("bob"),
    )
    assert (pinned.status_code, pinned.json()["code"]) == (409, "expert_quarantined")
    world.run_check()
    view = world.expert(first.id)
    assert view["status"] == "quarantined"
    assert view["arrival"]["state"] == "flagged"
    assert view["arrival"]["relative_change"] > 0
    (report,) = world.reports()
    assert report["expert_id"] == first.id
    assert json.loads(report["evidence"])["version"] == 2


def test_a_harmful_expert_is_flagged_with_its_numbers_and_a_dismissal_releases_it(
    world: World,
) -> None:
    submitted = world.submit("a", HURT)
    world.run_check()

    view = world.expert(submitted.id)
    assert view["status"] == "quarantined"
    check = view["arrival"]
    assert check["state"] == "flagged"
    assert check["relative_change"] > 0
    # The moderators' queue holds the registry's report, with the numbers.
    (report,) = world.reports()
    assert (report["expert_id"], report["reporter"], report["status"]) == (
        submitted.id,
        "registry",
        "open",
    )
    assert report["id"] == check["report_id"]
    numbers = json.loads(report["evidence"])
    assert numbers["bits_per_byte"] == check["bits_per_byte"]
    assert numbers["base_bits_per_byte"] == check["base_bits_per_byte"]
    assert numbers["relative_change"] == check["relative_change"]
    assert numbers["min_gain"] == 0.0
    assert "does not help its own samples" in report["reason"]
    assert _visible_to_others(world, submitted.id)["weights"] == 409
    # The SDK's wait returns the decided check; the expert is not active.
    waited = world.alice.wait_for_arrival(submitted.id, timeout=5)
    assert (waited.status, waited.arrival.state) == ("quarantined", "flagged")  # type: ignore[union-attr]

    resolved = world.client.post(
        f"/v1/reports/{report['id']}/resolve",
        json={"resolution": "dismiss", "note": "a small domain, fine"},
        headers=world.h("moderator"),
    )
    assert resolved.status_code == 200, resolved.text
    released = world.expert(submitted.id)
    assert (released["status"], released["arrival"]["state"]) == ("active", "released")
    (entry,) = world.audit("expert.arrival_release")
    assert entry["actor"] == "moderator"
    assert _visible_to_others(world, submitted.id)["weights"] == 200


@pytest.mark.parametrize("min_gain", [0.5])
def test_the_threshold_is_honoured_and_a_disable_resolves_the_flag(
    world: World, min_gain: float
) -> None:
    submitted = world.submit("b", HELPED)
    world.run_check()
    check = world.expert(submitted.id)["arrival"]
    # It helps, but by less than half: flagged.
    assert -min_gain < check["relative_change"] < 0
    assert (check["state"], check["min_gain"]) == ("flagged", min_gain)
    (report,) = world.reports()
    assert json.loads(report["evidence"])["min_gain"] == min_gain

    resolved = world.client.post(
        f"/v1/reports/{report['id']}/resolve",
        json={"resolution": "disable"},
        headers=world.h("moderator"),
    )
    assert resolved.status_code == 200, resolved.text
    assert world.expert(submitted.id)["status"] == "disabled"


def test_a_withdrawal_cancels_the_check_and_a_restore_queues_it_again(world: World) -> None:
    submitted = world.submit("b", HELPED)
    first_job = world.expert(submitted.id)["arrival"]["job_id"]
    world.alice.withdraw_expert(submitted.id, reason="one more look")
    cancelled = world.expert(submitted.id)
    assert cancelled["status"] == "withdrawn"
    assert (cancelled["arrival"]["state"], cancelled["arrival"]["job_status"]) == (
        "cancelled",
        "cancelled",
    )
    assert world.worker.lease_job("w-arrival", kinds=["evaluate"]) is None

    world.alice.restore_expert(submitted.id)
    restored = world.expert(submitted.id)
    assert restored["status"] == "quarantined"
    assert restored["arrival"]["state"] == "pending"
    assert restored["arrival"]["job_id"] != first_job
    world.run_check()
    assert world.expert(submitted.id)["status"] == "active"


def test_a_check_that_fails_flags_the_expert_with_the_error(world: World) -> None:
    submitted = world.submit("b", HELPED)
    leased = world.worker.lease_job("w-arrival", kinds=["evaluate"])
    assert leased is not None
    world.worker.fail_job(
        leased.id, leased.fencing_token, "out of memory on the worker", retryable=False
    )
    view = world.expert(submitted.id)
    assert view["status"] == "quarantined"
    check = view["arrival"]
    assert check["state"] == "failed"
    assert "out of memory on the worker" in check["error"]
    (report,) = world.reports()
    assert report["id"] == check["report_id"]
    assert "could not run" in report["reason"]
    assert "out of memory" in json.loads(report["evidence"])["error"]


def test_bad_settings_are_refused_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (-0.1, 1.0, 5.0, math.nan):
        with pytest.raises(ValidationError, match="arrival_min_gain"):
            Settings(arrival_min_gain=value)
    for name, raw in (("AGORA_ARRIVAL_MIN_GAIN", "lots"), ("AGORA_ARRIVAL_CHECKS", "maybe")):
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(name)
    monkeypatch.setenv("AGORA_ARRIVAL_MIN_GAIN", "0.02")
    monkeypatch.setenv("AGORA_ARRIVAL_CHECKS", "true")
    assert (Settings().arrival_checks, Settings().arrival_min_gain) == (True, 0.02)
    # Production default: on, strictly better than the base.
    monkeypatch.delenv("AGORA_ARRIVAL_CHECKS")
    monkeypatch.delenv("AGORA_ARRIVAL_MIN_GAIN")
    assert (Settings().arrival_checks, Settings().arrival_min_gain) == (True, 0.0)


@pytest.fixture
def live_url(app: Any, client: TestClient) -> Iterator[str]:
    """The app (already started by ``client``) behind a real uvicorn, for the CLI."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn exited"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_cli_submit_says_quarantined_and_wait_exits_by_the_outcome(
    world: World, live_url: str, tmp_path: Path
) -> None:
    import threading

    from typer.testing import CliRunner

    from agora.cli import build_app
    from worker.runner import Worker

    def submit(name: str, samples: list[str], *extra: str) -> Any:
        sheet = tmp_path / f"{name}-{len(extra)}.md"
        sheet.write_bytes(
            make_datasheet(name=f"expert {name}", domain=f"domain {name}", samples=samples)
        )
        args = ["expert", "submit", str(world.tiny["experts"][name]), "--datasheet", str(sheet)]
        env = {"AGORA_REGISTRY_URL": live_url, "AGORA_TOKEN": world.tokens.alice}
        return CliRunner().invoke(build_app(), [*args, "--base", world.revision, *extra], env=env)

    # Without --wait: quarantined, naming the job; nothing runs it yet.
    plain = submit("b", HELPED)
    assert plain.exit_code == 0, plain.output
    assert "(quarantined)" in plain.output
    assert "quarantined until its check on arrival (job job_" in plain.output

    # With --wait and a worker running: 0 once active, 1 with the numbers once flagged.
    worker_sdk = Agora(live_url, token=world.tokens.worker, cache_dir=tmp_path / "wc")
    worker = Worker(worker_sdk, name="w-cli", device="cpu", poll_interval=0.05, max_jobs=3)
    running = threading.Thread(target=worker.run, daemon=True)
    running.start()
    try:
        helped = submit("b", HELPED[:1], "--wait", "--timeout", "60")
        hurt = submit("a", HURT, "--wait", "--timeout", "60")
    finally:
        worker.request_stop()
        running.join(timeout=30)
        worker_sdk.close()
    assert helped.exit_code == 0, helped.output
    assert "check on arrival passed:" in helped.output
    assert "bits/byte on its samples" in helped.output
    assert "is active" in helped.output
    assert hurt.exit_code == 1, hurt.output
    assert "check on arrival flagged:" in hurt.output
    assert "is quarantined: flagged to moderators (report" in hurt.output
