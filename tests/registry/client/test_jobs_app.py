"""The SDK's compositions, evaluations and worker calls against the real registry app.

The test plays the worker through the SDK (lease, heartbeat, complete, fail) so each step
is explicit; the artifacts are real ``modelcore`` files (a random tiny base and experts), so
``load_composed`` returns a model that must compute exactly what ``ComposedModel`` computes
from the original files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_datasheet
from helpers.tiny_models import TEXTS, make_tiny_base
from typer.testing import CliRunner

from registry.client import (
    Agora,
    Composition,
    CompositionWarning,
    Job,
    JobFailed,
    LeasedJob,
    LeaseLost,
    NotFound,
    UnavailableForLegalReasons,
)
from registry.client.composed import load_composed_dir
from registry.protocol import AVERAGE_CAUTION

torch = pytest.importorskip("torch")


def digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random tiny base bundle and three experts that visibly change its predictions."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_base(tmp_path_factory.mktemp("sdk-model"))
    finally:
        torch.set_num_threads(previous)


SHEETS = {
    "a": ("Python snippets", "Small Python functions.", ["def add(a, b): return a + b"]),
    "b": ("Pangrams", "English pangram sentences.", ["The quick brown fox jumps."]),
    "c": ("SQL", "SQL queries over user tables.", ["SELECT name FROM users;"]),
}


def submit(agora: Agora, model_files: dict[str, Any], name: str, tmp_path: Path) -> Any:
    title, domain, samples = SHEETS[name]
    sheet = make_datasheet(name=title, domain=domain, samples=samples)
    return agora.submit_expert(
        model_files["experts"][name], sheet.decode(), model_files["revision"]
    )


@pytest.fixture
def world(make_agora, tokens, model_files, tmp_path: Path) -> dict[str, Any]:
    admin = make_agora(tokens.admin)
    base = model_files["base"]
    admin.upload_base_model(
        base / "config.json", base / "tokenizer.json", base / "model.safetensors"
    )
    alice = make_agora(tokens.alice)
    experts = {name: submit(alice, model_files, name, tmp_path) for name in "ab"}
    return {
        "alice": alice,
        "worker": make_agora(tokens.worker, cache_dir=tmp_path / "worker-cache"),
        "moderator": make_agora(tokens.moderator),
        "experts": experts,
        "revision": model_files["revision"],
    }


def composed_from_originals(model_files: dict[str, Any], manifest: dict[str, Any]) -> Any:
    from modelcore.compose.composed import ComposedModel

    originals = {digest(p): p for p in model_files["experts"].values()}
    return ComposedModel.from_manifest(manifest, model_files["base"], originals)


def token_batch(model: Any) -> Any:
    ids = model.tokenizer.encode(TEXTS[0]).ids[:16]
    return torch.tensor([ids])


def test_compose_wait_with_progress_then_load_the_model(
    world: dict[str, Any], model_files: dict[str, Any], wire, tmp_path: Path
) -> None:
    alice, worker = world["alice"], world["worker"]
    a, b = world["experts"]["a"], world["experts"]["b"]

    handle = alice.compose(
        "ensemble", experts=[a.id, f"{b.id}@1"], texts=TEXTS[:2], idempotency_key="cmp-1"
    )
    again = alice.compose(
        "ensemble", experts=[a.id, f"{b.id}@1"], texts=TEXTS[:2], idempotency_key="cmp-1"
    )
    assert (again.job_id, again.composition_id) == (handle.job_id, handle.composition_id)
    assert alice.get_composition(handle.composition_id).status == "pending"
    # Nothing runnable for a worker that only evaluates.
    assert worker.lease_job("w1", kinds=["evaluate"]) is None

    seen: list[Job] = []
    lease_lost: list[LeaseLost] = []

    def drive_the_worker(job: Job) -> None:
        """Each poll of alice's wait() advances the worker one step."""
        seen.append(job)
        if len(seen) == 1:
            leased = worker.lease_job("w1", kinds=["compose.ensemble"], lease_seconds=30)
            assert leased is not None
            assert leased.id == handle.job_id
            payload = leased.payload
            assert payload["composition_id"] == handle.composition_id
            assert payload["base_revision"] == world["revision"]
            assert [(r["id"], r["version"], r["digest"]) for r in payload["experts"]] == [
                (a.id, 1, a.digest),
                (b.id, 1, b.digest),
            ]
            assert payload["texts"] == TEXTS[:2]
            worker.heartbeat_job(leased.id, leased.fencing_token, progress={"done": 1, "total": 2})
            with pytest.raises(LeaseLost) as err:
                worker.heartbeat_job(leased.id, leased.fencing_token + 1)
            lease_lost.append(err.value)
            drive_the_worker.leased = leased  # type: ignore[attr-defined]
        elif len(seen) == 2:
            leased = drive_the_worker.leased  # type: ignore[attr-defined]
            result = {
                "weights": [0.25, 0.75],
                "metrics": {"base_bits_per_byte": 3.5, "bits_per_byte": 3.25, "bytes": 120},
                "details": {"prior_windows": 8},
            }
            done = worker.complete_job(leased.id, leased.fencing_token, result)
            assert done.status == "succeeded"
            # The same completion again is answered with the same job, not applied twice.
            assert worker.complete_job(leased.id, leased.fencing_token, result).id == done.id

    composition = handle.wait(poll=0.01, progress=drive_the_worker)

    assert [(j.status, j.progress) for j in seen] == [
        ("queued", None),
        ("leased", {"done": 1, "total": 2}),
        ("succeeded", seen[-1].progress),
    ]
    assert lease_lost[0].code == "lease_lost"
    assert isinstance(composition, Composition)
    assert composition.status == "ready"
    manifest = composition.manifest
    assert manifest is not None
    assert manifest.format == "agora.composition/1"
    assert [(e.id, e.version, e.digest, e.weight) for e in manifest.experts] == [
        (a.id, 1, a.digest, 0.25),
        (b.id, 1, b.digest, 0.75),
    ]
    assert manifest.metrics == {"base_bits_per_byte": 3.5, "bits_per_byte": 3.25, "bytes": 120}

    model = alice.load_composed(composition.id)
    reference = composed_from_originals(
        model_files, manifest.model_dump(mode="json", exclude_unset=True)
    )
    assert model.method == "ensemble"
    ids = token_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(ids), reference.log_probs(ids))
    scored = model.bits_per_byte(TEXTS[:1])
    assert scored["bytes"] == len(TEXTS[0].encode())
    assert scored["bits_per_byte"] > 0

    fetched = len(wire.weights())
    alice.load_composed(composition)  # everything is cached now
    assert len(wire.weights()) == fetched

    out = tmp_path / "offline"
    alice.download_composition(composition, out)
    assert sorted(p.name for p in (out / "experts").iterdir()) == sorted(
        [f"{a.id}-v1.safetensors", f"{b.id}-v1.safetensors"]
    )
    offline = load_composed_dir(out)
    with torch.no_grad():
        torch.testing.assert_close(offline.log_probs(ids), reference.log_probs(ids))


def test_load_composed_follows_the_manifests_with_base(
    world: dict[str, Any], model_files: dict[str, Any], tmp_path: Path
) -> None:
    """The default ensemble has the base as a path and loads with it, at the base weight
    the worker reported; a manifest from before (no with_base) loads as it always did."""
    from modelcore.artifacts import load_base
    from modelcore.compose.composed import ComposedModel
    from modelcore.experts import load_expert

    alice, worker = world["alice"], world["worker"]
    a, b = world["experts"]["a"], world["experts"]["b"]
    handle = alice.compose("ensemble", experts=[a.id, b.id], texts=TEXTS[:1])
    leased = worker.lease_job("w1")
    assert leased is not None
    assert leased.payload["params"]["with_base"] is True
    result = {"weights": [0.25, 0.25], "base_weight": 0.5, "with_base": True}
    worker.complete_job(leased.id, leased.fencing_token, result)
    composition = handle.wait(poll=0.01)
    assert composition.manifest is not None
    assert (composition.manifest.with_base, composition.manifest.base_weight) == (True, 0.5)

    experts = [load_expert(model_files["experts"][n])[0] for n in "ab"]

    def reference(**kwargs: Any) -> Any:
        return ComposedModel(load_base(model_files["base"]), "ensemble", experts, **kwargs)

    model = alice.load_composed(composition)
    assert model.ensemble is not None
    assert model.ensemble.n_paths == 3
    ids = token_batch(model)
    with_base = reference(weights=[0.25, 0.25], with_base=True, base_weight=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(ids), with_base.log_probs(ids))

    out = tmp_path / "legacy"
    alice.download_composition(composition, out)
    legacy = json.loads((out / "manifest.json").read_text())
    assert legacy["with_base"] is True
    del legacy["with_base"], legacy["base_weight"]
    for ref in legacy["experts"]:
        ref["weight"] = 0.5
    (out / "manifest.json").write_text(json.dumps(legacy))
    old = load_composed_dir(out)
    assert old.ensemble is not None
    assert old.ensemble.n_paths == 2
    without = reference(weights=[0.5, 0.5], with_base=False)
    with torch.no_grad():
        torch.testing.assert_close(old.log_probs(ids), without.log_probs(ids))
        assert not torch.allclose(old.log_probs(ids), model.log_probs(ids))


def test_average_uploads_the_new_expert_and_load_composed_uses_it(
    world: dict[str, Any], model_files: dict[str, Any]
) -> None:
    alice, worker = world["alice"], world["worker"]
    a, b = world["experts"]["a"], world["experts"]["b"]
    with pytest.warns(CompositionWarning, match="average_may_harm"):
        handle = alice.compose("average", experts=[a.id, b.id], params={"merge": "uniform"})
    assert [(w.code, w.detail) for w in handle.warnings] == [
        (AVERAGE_CAUTION.code, AVERAGE_CAUTION.detail)
    ]
    leased = worker.lease_job("w1")
    assert leased is not None
    assert leased.kind == "compose.average"
    merged = model_files["experts"]["c"]  # stands in for the merge output
    worker.complete_job(
        leased.id,
        leased.fencing_token,
        {"weights": None, "metrics": None, "details": {"merge": "uniform"}},
        weights=merged,
    )
    composition = handle.wait(poll=0.01)
    assert composition.warnings == handle.warnings
    assert composition.manifest is not None
    output = composition.manifest.output
    assert output is not None
    assert output.digest == digest(merged)
    assert composition.expert_id == output.id
    new_expert = alice.get_expert(output.id)
    assert new_expert.owner == "alice"
    assert alice.download(output.id).read_bytes() == merged.read_bytes()

    model = alice.load_composed(composition.id)
    reference = composed_from_originals(
        {**model_files, "experts": {"c": merged}},
        composition.manifest.model_dump(mode="json", exclude_unset=True),
    )
    ids = token_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(ids), reference.log_probs(ids))


def test_a_permanent_failure_reaches_wait_as_job_failed(world: dict[str, Any]) -> None:
    alice, worker = world["alice"], world["worker"]
    handle = alice.compose("mixture", experts=[world["experts"]["a"].id])
    leased = worker.lease_job("w1")
    assert leased is not None
    failed = worker.fail_job(
        leased.id, leased.fencing_token, "ValueError: bad params", retryable=False
    )
    assert failed.status == "failed"
    with pytest.raises(JobFailed) as err:
        handle.wait(poll=0.01)
    assert err.value.code == "job_failed"
    assert "bad params" in err.value.detail
    # The lease is gone with the failure: a late completion is refused.
    with pytest.raises(LeaseLost):
        worker.complete_job(leased.id, leased.fencing_token, {"weights": None})


def test_released_job_goes_back_to_the_queue_without_using_an_attempt(
    world: dict[str, Any],
) -> None:
    alice, worker = world["alice"], world["worker"]
    handle = alice.compose("mixture", experts=[world["experts"]["a"].id])
    first = worker.lease_job("w1")
    assert first is not None
    released = worker.fail_job(first.id, first.fencing_token, "SIGTERM", release=True)
    assert released.status == "queued"
    second = worker.lease_job("w2")
    assert second is not None
    assert second.id == handle.job_id
    assert second.fencing_token != first.fencing_token
    with pytest.raises(LeaseLost):
        worker.heartbeat_job(first.id, first.fencing_token)


def test_evaluate_an_expert_and_list_its_evaluations(world: dict[str, Any]) -> None:
    alice, worker = world["alice"], world["worker"]
    a = world["experts"]["a"]
    handle = alice.evaluate({"held_out": TEXTS}, expert_id=a.id)
    leased = worker.lease_job("w1", kinds=["evaluate"])
    assert leased is not None
    subject = leased.payload["subject"]
    assert subject["kind"] == "expert"
    assert (subject["expert"]["id"], subject["expert"]["digest"]) == (a.id, a.digest)
    assert leased.payload["text_sets"] == {"held_out": TEXTS}
    score = {"bits_per_byte": 2.5, "base_bits_per_byte": 2.75, "tokens": 40, "bytes": 150}
    worker.complete_job(leased.id, leased.fencing_token, {"results": {"held_out": score}})

    scores = handle.wait(poll=0.01)
    assert scores["held_out"].bits_per_byte == 2.5
    assert scores["held_out"].base_bits_per_byte == 2.75
    (stored,) = alice.list_evaluations(expert_id=a.id)
    assert (stored.text_set, stored.bits_per_byte, stored.version, stored.job_id) == (
        "held_out",
        2.5,
        1,
        handle.job_id,
    )


def test_refusals_arrive_typed(world: dict[str, Any]) -> None:
    alice, moderator = world["alice"], world["moderator"]
    with pytest.raises(NotFound) as unknown:
        alice.compose("mixture", experts=["ex_" + "Z" * 26])
    assert unknown.value.code == "expert_not_found"
    b = world["experts"]["b"]
    moderator.disable_expert(b.id, "licence complaint")
    with pytest.raises(UnavailableForLegalReasons) as disabled:
        alice.compose("mixture", experts=[world["experts"]["a"].id, b.id])
    assert disabled.value.code == "expert_disabled"


def test_a_ready_composition_with_a_disabled_expert_is_not_served(
    world: dict[str, Any],
) -> None:
    alice, worker, moderator = world["alice"], world["worker"], world["moderator"]
    a = world["experts"]["a"]
    handle = alice.compose("mixture", experts=[a.id])
    leased = worker.lease_job("w1")
    assert leased is not None
    worker.complete_job(leased.id, leased.fencing_token, {"weights": None, "metrics": None})
    handle.wait(poll=0.01)
    moderator.disable_expert(a.id, "withdrawn")
    with pytest.raises(UnavailableForLegalReasons):
        alice.load_composed(handle.composition_id)


# --------------------------------------------------------------------------- the CLI


@dataclass
class CliWorld:
    url: str
    alice: str
    worker: str
    experts: dict[str, Any]
    env: dict[str, str]


@pytest.fixture
def cli_world(live_server, model_files: dict[str, Any], tmp_path: Path) -> CliWorld:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    with runtime.sessions() as session, session.begin():
        _, admin_token = create_token(session=session, name="admin", role="admin")
        _, alice_token = create_token(session=session, name="alice", role="contributor")
        # The operator's own worker: trusted, its outputs go active unchecked.
        _, worker_token = create_token(session=session, name="w", role="worker", trusted=True)
    base = model_files["base"]
    with Agora(live_server.url, token=admin_token, cache_dir=tmp_path / "c1") as admin:
        admin.upload_base_model(
            base / "config.json", base / "tokenizer.json", base / "model.safetensors"
        )
    with Agora(live_server.url, token=alice_token, cache_dir=tmp_path / "c2") as alice:
        experts = {name: submit(alice, model_files, name, tmp_path) for name in "ab"}
    env = {
        "AGORA_REGISTRY_URL": live_server.url,
        "AGORA_TOKEN": alice_token,
        "AGORA_CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    return CliWorld(live_server.url, alice_token, worker_token, experts, env)


@contextmanager
def one_job_worker(
    world: CliWorld, cache: Path, handle: Callable[[Agora, LeasedJob], None]
) -> Iterator[list[dict[str, Any]]]:
    """A worker thread that leases one job, hands it to ``handle``, and stops; yields the
    payloads it leased."""
    payloads: list[dict[str, Any]] = []
    stop = threading.Event()

    def work() -> None:
        with Agora(world.url, token=world.worker, cache_dir=cache) as worker:
            while not stop.is_set():
                leased = worker.lease_job("cli-test-worker")
                if leased is None:
                    stop.wait(0.05)
                    continue
                payloads.append(leased.payload)
                handle(worker, leased)
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield payloads
    finally:
        stop.set()
        thread.join(timeout=30)


def complete_with_given_weights(worker: Agora, leased: LeasedJob) -> None:
    worker.heartbeat_job(leased.id, leased.fencing_token, progress={"done": 1, "total": 1})
    result = {
        "weights": leased.payload["weights"],
        "metrics": {"base_bits_per_byte": 4.0, "bits_per_byte": 3.5, "bytes": 99},
        "details": {},
    }
    worker.complete_job(leased.id, leased.fencing_token, result)


def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> Any:
    from agora.cli import build_app

    return CliRunner().invoke(build_app(), args, env=env, input=stdin, catch_exceptions=False)


def test_cli_compose_by_text_writes_an_offline_directory(
    cli_world: CliWorld, model_files: dict[str, Any], tmp_path: Path
) -> None:
    experts, env = cli_world.experts, cli_world.env
    base = model_files["base"]
    texts = tmp_path / "domain.txt"
    texts.write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
    out = tmp_path / "composition"
    with one_job_worker(cli_world, tmp_path / "c3", complete_with_given_weights) as payloads:
        result = cli(
            [
                "compose",
                "--texts",
                str(texts),
                "--method",
                "ensemble",
                "-k",
                "2",
                "--out",
                str(out),
            ],
            env,
        )
    assert result.exit_code == 0, result.output

    (payload,) = payloads
    # Passages are the file's blank-line separated paragraphs, kept as written.
    assert payload["texts"] == [
        "def add(a, b):\n    return a + b",
        "def sub(a, b):\n    return a - b",
    ]
    assert {r["id"] for r in payload["experts"]} == {e.id for e in experts.values()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "ensemble"
    assert [r["weight"] for r in manifest["experts"]] == payload["weights"]
    for ref in manifest["experts"]:
        path = out / "experts" / f"{ref['id']}-v{ref['version']}.safetensors"
        assert digest(path) == ref["digest"]
        assert f"{ref['weight']:.3f}" in result.stdout
        assert ref["id"] in result.stdout
    assert (out / "base" / "model.safetensors").read_bytes() == (
        base / "model.safetensors"
    ).read_bytes()
    assert manifest["id"] in result.stdout
    assert "bits_per_byte" in result.stdout
    assert "3.5000" in result.stdout
    assert "-0.5000 bits/byte" in result.stdout  # the composition against the base

    model = load_composed_dir(out)
    assert model.method == "ensemble"

    job_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("job "))
    shown = cli(["job", "get", job_id, "--wait"], env)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["status"] == "succeeded"


def test_cli_compose_of_named_experts_from_stdin_reports_a_failed_job(
    cli_world: CliWorld, tmp_path: Path
) -> None:
    def fail(worker: Agora, leased: LeasedJob) -> None:
        worker.fail_job(leased.id, leased.fencing_token, "ValueError: no texts", retryable=False)

    a, b = cli_world.experts["a"], cli_world.experts["b"]
    args = ["compose", "--texts", "-", "--experts", f"{a.id},{b.id}@1", "--method", "mixture"]
    with one_job_worker(cli_world, tmp_path / "c3", fail) as payloads:
        result = cli(
            [*args, "--out", str(tmp_path / "out")],
            cli_world.env,
            stdin="first passage\n\nsecond passage\n",
        )
    (payload,) = payloads
    assert [(r["id"], r["version"]) for r in payload["experts"]] == [(a.id, 1), (b.id, 1)]
    assert payload["texts"] == ["first passage", "second passage"]
    assert result.exit_code == 1
    assert "[job_failed] ValueError: no texts" in result.stderr
    assert "failed after 1 attempt(s)" in result.stderr
    assert not (tmp_path / "out").exists()

    job_id = result.stderr.split("queued job ", 1)[1].split()[0]
    shown = cli(["job", "get", job_id], cli_world.env)
    assert shown.exit_code == 1
    assert json.loads(shown.stdout)["error"] == "ValueError: no texts"


def test_cli_compose_refusals(cli_world: CliWorld, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    neither = cli(["compose", "--out", out], cli_world.env)
    assert neither.exit_code == 2
    assert "give --texts, --experts, or both" in neither.output
    bad_param = cli(["compose", "--experts", "ex_x", "--param", "steps", "--out", out], {})
    assert bad_param.exit_code == 2
    assert "is not key=value" in bad_param.output
    unknown = cli(["compose", "--experts", "ex_" + "Z" * 26, "--out", out], cli_world.env)
    assert unknown.exit_code == 1
    assert "[expert_not_found]" in unknown.stderr
    assert "(HTTP 404)" in unknown.stderr


def test_cli_compose_with_and_without_the_base(
    cli_world: CliWorld, model_files: dict[str, Any], tmp_path: Path
) -> None:
    a, b = cli_world.experts["a"], cli_world.experts["b"]
    args = ["compose", "--experts", f"{a.id},{b.id}", "--method", "ensemble"]

    def complete_with_base(worker: Agora, leased: LeasedJob) -> None:
        result = {"weights": [0.25, 0.125], "base_weight": 0.625, "with_base": True}
        worker.complete_job(leased.id, leased.fencing_token, result)

    with one_job_worker(cli_world, tmp_path / "c3", complete_with_base) as payloads:
        shown = cli([*args, "--out", str(tmp_path / "with")], cli_world.env)
    assert shown.exit_code == 0, shown.output
    assert "warning:" not in shown.stderr  # an ensemble comes with no caution
    assert payloads[0]["params"]["with_base"] is True
    base_row = next(line for line in shown.stdout.splitlines() if "base (no expert)" in line)
    assert "0.625" in base_row
    assert json.loads((tmp_path / "with" / "manifest.json").read_text())["with_base"] is True

    def complete_alone(worker: Agora, leased: LeasedJob) -> None:
        result = {"weights": [0.5, 0.5], "with_base": False}
        worker.complete_job(leased.id, leased.fencing_token, result)

    with one_job_worker(cli_world, tmp_path / "c4", complete_alone) as payloads:
        alone = cli([*args, "--without-base", "--out", str(tmp_path / "alone")], cli_world.env)
    assert alone.exit_code == 0, alone.output
    assert payloads[0]["params"]["with_base"] is False
    assert "base (no expert)" not in alone.stdout
    manifest = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    assert manifest["with_base"] is False
    model = load_composed_dir(tmp_path / "alone")
    assert model.ensemble is not None
    assert model.ensemble.n_paths == 2

    for method, flag in (("mixture", "--without-base"), ("average", "--with-base")):
        wrong = cli(
            ["compose", "--experts", a.id, "--method", method, flag, "--out", str(tmp_path / "x")],
            cli_world.env,
        )
        assert wrong.exit_code == 2
        assert flag in wrong.output
        assert not (tmp_path / "x").exists()
    helped = cli(["compose", "--help"], {"COLUMNS": "200"})
    assert "--without-base" in helped.stdout
    assert "ensemble: prior_windows, with_base, base_weight" in helped.stdout


def test_cli_compose_average_prints_the_caution_on_stderr(
    cli_world: CliWorld, model_files: dict[str, Any], tmp_path: Path
) -> None:
    a, b = cli_world.experts["a"], cli_world.experts["b"]

    def complete_average(worker: Agora, leased: LeasedJob) -> None:
        result = {"weights": None, "details": {"merge": "uniform"}}
        worker.complete_job(
            leased.id, leased.fencing_token, result, weights=model_files["experts"]["c"]
        )

    out = tmp_path / "averaged"
    args = ["compose", "--experts", f"{a.id},{b.id}", "--method", "average", "--out", str(out)]
    with one_job_worker(cli_world, tmp_path / "c3", complete_average):
        result = cli(args, cli_world.env)
    assert result.exit_code == 0, result.output
    assert f"warning: [average_may_harm] {AVERAGE_CAUTION.detail}" in result.stderr
    # stdout is as for any composition: the summary lines, no warning among them.
    assert "warning" not in result.stdout
    assert result.stdout.splitlines()[1].endswith("(average, ready)")
    assert "new expert" in result.stdout


def test_docs_compose_snippet_runs_as_written_with_a_real_worker(
    cli_world: CliWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """docs/sdk.md's compositions example, against a live registry and the real worker
    (worker.runner.Worker, as `agora worker` runs it) in a thread."""
    from worker.runner import Worker

    docs = Path(__file__).resolve().parents[3] / "docs" / "sdk.md"
    section = docs.read_text().split("### Compositions, evaluations and jobs", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'agora.compose("ensemble", texts=texts, k=4)' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000", cli_world.url).replace(
        '"agora_..."', repr(cli_world.alice)
    )
    monkeypatch.setenv("AGORA_CACHE_DIR", str(tmp_path / "snippet-cache"))
    with Agora(cli_world.url, token=cli_world.worker, cache_dir=tmp_path / "wc") as agora:
        worker = Worker(agora, name="docs-worker", poll_interval=0.05, lease_seconds=30)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            exec(compile(snippet, str(docs), "exec"), {"__name__": "snippet"})
        finally:
            worker.request_stop()
            thread.join(timeout=60)
    assert worker.outcomes == ["succeeded", "succeeded"]  # the composition, the evaluation
    printed = capsys.readouterr().out.splitlines()
    experts = {e.id for e in cli_world.experts.values()}
    assert {line.split()[0] for line in printed if line.split()[0] in experts} == experts
    # The model loaded locally scores the texts exactly as the worker did for the manifest.
    line = next(x for x in printed if "'bits_per_byte'" in x)
    local, _, reported = line.partition(" ")
    assert float(local) == pytest.approx(ast.literal_eval(reported)["bits_per_byte"], rel=1e-5)


def test_cli_evaluate_prints_bits_per_byte_per_text_set(
    cli_world: CliWorld, tmp_path: Path
) -> None:
    def score(worker: Agora, leased: LeasedJob) -> None:
        results = {
            name: {
                "bits_per_byte": 1.25,
                "base_bits_per_byte": 1.5,
                "tokens": 7,
                "bytes": sum(len(t.encode()) for t in texts),
            }
            for name, texts in leased.payload["text_sets"].items()
        }
        worker.complete_job(leased.id, leased.fencing_token, {"results": results})

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("SELECT 1;\n\nSELECT 2;\n")
    a = cli_world.experts["a"]
    with one_job_worker(cli_world, tmp_path / "c3", score) as payloads:
        result = cli(["evaluate", f"held_out={held_out}", "--expert", a.id], cli_world.env)
    assert result.exit_code == 0, result.output
    (payload,) = payloads
    assert payload["text_sets"] == {"held_out": ["SELECT 1;", "SELECT 2;"]}
    assert payload["subject"]["expert"]["id"] == a.id
    row = next(line for line in result.stdout.splitlines() if "held_out" in line)
    assert "1.2500" in row
    assert "1.5000" in row
    assert "-16.67%" in row  # (1.25 - 1.5) / 1.5: the change against the base
    assert "18" in row
    with Agora(cli_world.url, token=cli_world.alice, cache_dir=tmp_path / "c4") as alice:
        (stored,) = alice.list_evaluations(expert_id=a.id)
    assert (stored.text_set, stored.bits_per_byte) == ("held_out", 1.25)
