"""The demo's registry half, through the SDK only: publish the base and the experts, then
for each domain search, compose (ensemble, average, distill) and evaluate through the job
queue, and finally disable one expert and read the registry's proof of forgetting
(docs/demo.md).

Every request is made once per content: its key (the sha256 of what it asks) is sent as
the ``Idempotency-Key`` and kept, with what the registry answered, in ``state.json`` next
to the cache. A second run against the same registry finds each expert, composition and
evaluation by that key and only reads it back; the one thing it does again is the disable
(a moderation action is an event: its forgetting measurement is never replayed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agora.demo.training import DemoError, Trained, TrainedExpert, content_key
from registry.client.errors import NotFound
from registry.protocol import AVERAGE, DISTILL, ENSEMBLE

READY_TIMEOUT_S = 180.0
# A job queued this long without a worker taking it: say how to start one.
STALL_HINT_S = 60.0
POLL_S = 0.5
SINGLE_K = 3  # experts each domain's compositions take, best first
SEARCH_K = 32  # results read to find them among the derived experts of earlier runs


# -- the registry: its own embedded one, or one given by URL ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agora(*args: str) -> list[str]:
    return [sys.executable, "-m", "agora.cli", *args]


@dataclass
class Embedded:
    """``agora serve`` on a free loopback port over ``data_dir`` (SQLite, local blobs, its
    in-process worker), logging to ``log``."""

    data_dir: Path
    log: Path
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in [n for n in env if n.startswith("AGORA_")]:
            del env[name]  # the demo's registry is its own, whatever the shell points at
        env["AGORA_DATA_DIR"] = str(self.data_dir)
        # The in-process worker's downloads stay in the demo's directory too.
        env["AGORA_CACHE_DIR"] = str(self.data_dir.parent / "worker-cache")
        return env

    def token(self) -> str:
        """An admin token of this registry: the one minted on an earlier run, or a new one
        (kept owner-readable only, next to the registry's data)."""
        path = self.data_dir / "demo-admin-token"
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(  # noqa: S603 - this interpreter and fixed arguments
            _agora("admin", "create-token", "--role", "admin", "--name", "agora-demo"),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise DemoError(f"could not mint an admin token:\n{done.stderr.strip()}")
        token = done.stdout.strip().splitlines()[-1]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
        return token

    def start(self) -> str:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
                _agora("serve", "--host", "127.0.0.1", "--port", str(port)),
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(
                    f"the demo's registry exited ({self.process.returncode}); its log, "
                    f"{self.log}, ends:\n{_tail(self.log)}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise DemoError(f"the demo's registry was not ready in {READY_TIMEOUT_S:.0f} s: {self.log}")

    def stop(self) -> None:
        """SIGTERM (the server stops its worker first), then SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- what was asked before: state.json -------------------------------------------------------


class State:
    """Request key -> what the registry answered, per registry (``state.json``)."""

    def __init__(self, path: Path, registry: str) -> None:
        self.path = path
        self.registry = registry
        try:
            self._all: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._all = {}
        self._mine: dict[str, Any] = self._all.setdefault(registry, {})

    def get(self, key: str) -> Any:
        return self._mine.get(key)

    def put(self, key: str, value: Any) -> None:
        self._mine[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._all, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)


# -- waiting for jobs ------------------------------------------------------------------------


@dataclass
class Pending:
    label: str
    job_id: str
    done: bool = False


def wait_jobs(
    agora: Any,
    pending: Sequence[Pending],
    title: str,
    *,
    progress: bool,
    say: Callable[[str], None],
    registry_url: str,
) -> None:
    """Poll the jobs until all end, with one progress bar; ``DemoError`` naming the first
    that failed (its error as the worker reported it)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [p for p in pending if not p.done]
    started = time.monotonic()
    hinted = False
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[now]}"),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task(title, total=len(pending), completed=len(pending) - len(todo), now="")
        while todo:
            for item in list(todo):
                job = agora.get_job(item.job_id)
                if job.status == "succeeded":
                    item.done = True
                    todo.remove(item)
                    bar.advance(task)
                elif job.status in {"failed", "dead", "cancelled"}:
                    raise DemoError(
                        f"{item.label}: job {job.id} {job.status}: {job.error or 'no error given'}"
                    )
                elif job.status == "leased":
                    shown = job.progress or {}
                    message = shown.get("message") or ""
                    bar.update(task, now=f"{item.label} {message}"[:40])
            if todo and not hinted and time.monotonic() - started > STALL_HINT_S:
                statuses = {agora.get_job(p.job_id).status for p in todo}
                if statuses == {"queued"}:
                    hinted = True
                    say(
                        f"no worker has taken a job for {STALL_HINT_S:.0f} s: start one with "
                        f"`agora worker --registry {registry_url} --token TOKEN`"
                    )
            if todo:
                time.sleep(POLL_S)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Published:
    expert_id: str
    expert: TrainedExpert
    status: str
    arrival_bpb: float | None = None
    arrival_base_bpb: float | None = None


@dataclass
class DomainRun:
    domain: str
    found: list[tuple[str, float]] = field(default_factory=list)  # (expert id, weight)
    compositions: dict[str, str] = field(default_factory=dict)  # method -> composition id
    jobs: dict[str, str] = field(default_factory=dict)  # column -> evaluation job id
    scores: dict[str, float] = field(default_factory=dict)  # column -> bits per byte
    base: float | None = None
    best_single: str | None = None  # expert id


@dataclass
class Forgetting:
    expert_id: str
    name: str
    action_id: int
    reports: list[Any]
    still_found: bool
    restored: bool
    reused: bool = False  # read back from an earlier run's identical measurement


@dataclass
class Outcome:
    revision: str
    published: list[Published]
    domains: list[DomainRun]
    forgetting: Forgetting | None
    notes: list[str]
    unlabeled: list[str] = field(default_factory=list)  # rows whose experts are clusters


def publish(
    agora: Any,
    trained: Trained,
    state: State,
    *,
    progress: bool,
    say: Callable[[str], None],
    registry_url: str,
) -> list[Published]:
    """The base (idempotent by content) and every expert (found by its weights' digest, or
    submitted), then each expert's check on arrival."""
    base = trained.base_dir
    revision = agora.upload_base_model(
        base / "config.json",
        base / "tokenizer.json",
        base / "model.safetensors",
        name="agora demo base",
    ).revision
    if revision != trained.revision:
        raise DemoError(f"the registry stored the base as {revision}, not {trained.revision}")
    out = []
    for item in trained.experts:
        key = content_key(what="submit", sha256=item.sha256, datasheet=_sha(item.datasheet))
        known = state.get(key)
        expert = None
        if known:
            try:
                expert = agora.get_expert(known)
            except NotFound:
                expert = None  # not on this registry any more (its data was reset): submit
        if expert is not None and expert.status == "disabled":
            # An earlier run's forgetting check, kept with --keep-disabled: this run starts
            # from where the first one did.
            agora.enable_expert(expert.id, "agora demo: enabled again for a new run")
            say(f"enabled {expert.id} ({item.name}) again: an earlier run left it disabled")
            expert = agora.get_expert(expert.id)
        if expert is None:
            sub = agora.submit_expert(
                item.weights, item.datasheet, revision, idempotency_key=key[:64]
            )
            state.put(key, sub.id)
            expert = agora.get_expert(sub.id)
        out.append(Published(expert.id, item, expert.status))
    checks = []
    for p in out:
        arrival = agora.get_expert(p.expert_id).arrival
        if p.status == "quarantined" and arrival is not None and arrival.job_id:
            checks.append(Pending(f"arrival {p.expert.name}", arrival.job_id))
    wait_jobs(
        agora,
        checks,
        "checks on arrival",
        progress=progress,
        say=say,
        registry_url=registry_url,
    )
    for p in out:
        expert = agora.get_expert(p.expert_id)
        if expert.status == "quarantined" and expert.arrival is not None and expert.arrival.pending:
            expert = agora.wait_for_arrival(p.expert_id, timeout=900)
        p.status = expert.status
        if expert.arrival is not None:
            p.arrival_bpb = expert.arrival.bits_per_byte
            p.arrival_base_bpb = expert.arrival.base_bits_per_byte
    return out


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _quiet_cautions(notes: list[str]) -> Iterator[None]:
    """The SDK warns a method's cautions (``average_may_harm``); the demo lists each once
    under its table instead of in the middle of the progress bars."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in notes:
            notes.append(text)


METHODS = (ENSEMBLE.name, AVERAGE.name, DISTILL.name)


def compose_all(
    agora: Any,
    trained: Trained,
    published: list[Published],
    state: State,
    *,
    distill_steps: int,
    progress: bool,
    say: Callable[[str], None],
    registry_url: str,
    notes: list[str],
) -> list[DomainRun]:
    """For each domain's query text: a search, then the three compositions of the experts
    it found (all queued first, so the workers never wait on the demo).

    The compositions name the experts search found among the ones the demo contributed:
    an average or a distillation is an expert too, searchable once made, and composing
    one run's derived experts into the next would make every run compose different
    experts (and never reuse what the last one computed)."""
    contributed = {p.expert_id: p.expert.name for p in published if p.status == "active"}
    runs = []
    pending: list[Pending] = []
    for domain, text in trained.texts.items():
        run = DomainRun(domain)
        found = agora.search(text.query, trained.revision, k=SEARCH_K)
        ours = [r for r in found.results if r.expert_id in contributed][:SINGLE_K]
        if len(ours) < 2:
            raise DemoError(
                f"search found {len(ours)} of the demo's experts for {domain}: an average "
                "needs two (are the others quarantined? see the notes of `agora expert get`)"
            )
        # Renormalised over the demo's experts, to four decimals: the weights the ensemble
        # is given, and part of the request's key, which must not change with the last bit
        # of a distance when the index holds more experts than last time.
        total = sum(r.weight for r in ours)
        run.found = [(r.expert_id, round(r.weight / total, 4)) for r in ours]
        shown = ", ".join(f"{contributed[e]} {w:.2f}" for e, w in run.found)
        say(f"search {domain}: {shown} ({found.embedder})")
        ids = [e for e, _ in run.found]
        for method in METHODS:
            params = {"steps": distill_steps} if method == DISTILL.name else None
            # The ensemble's prior is retrieval's weights (c-BTM); the average is uniform and
            # the distillation's teacher estimates its prior on the query text.
            weights = [w for _, w in run.found] if method == ENSEMBLE.name else None
            key = content_key(
                what="compose",
                method=method,
                base=trained.revision,
                texts=text.query,
                experts=ids,
                weights=weights,
                params=params,
            )
            known = state.get(key)
            if known:
                run.compositions[method] = known["composition_id"]
                pending.append(Pending(f"{method} {domain}", known["job_id"]))
                continue
            with _quiet_cautions(notes):
                handle = agora.compose(
                    method,
                    base_revision=trained.revision,
                    experts=ids,
                    weights=weights,
                    texts=text.query,
                    params=params,
                    idempotency_key=key[:64],
                )
            state.put(key, {"composition_id": handle.composition_id, "job_id": handle.job_id})
            run.compositions[method] = handle.composition_id
            pending.append(Pending(f"{method} {domain}", handle.job_id))
        runs.append(run)
    wait_jobs(agora, pending, "compositions", progress=progress, say=say, registry_url=registry_url)
    # An untrusted worker's average or distillation waits for a second worker's check
    # (docs/architecture.md, "Workers that lie"): wait for those checks too.
    checks = []
    for run in runs:
        for method, cid in run.compositions.items():
            composition = agora.get_composition(cid)
            check = composition.verification or {}
            if composition.status == "verifying" and check.get("job_id"):
                checks.append(Pending(f"check {method} {run.domain}", str(check["job_id"])))
    if checks:
        say(
            f"{len(checks)} output(s) of an untrusted worker token wait for a check by another "
            "worker's token (or mint the worker token with --trusted)"
        )
        wait_jobs(agora, checks, "checks", progress=progress, say=say, registry_url=registry_url)
    for run in runs:
        for method, cid in run.compositions.items():
            composition = agora.composition(cid).wait(timeout=120)
            if composition.status != "ready":
                raise DemoError(
                    f"{method} for {run.domain}: composition {cid} is {composition.status}"
                )
    return runs


def evaluate_all(
    agora: Any,
    trained: Trained,
    runs: list[DomainRun],
    state: State,
    *,
    progress: bool,
    say: Callable[[str], None],
    registry_url: str,
) -> None:
    """Bits per byte on each domain's evaluation text (never seen by search, composition or
    training): each expert retrieval found, alone with the base, and each composition."""
    from registry.client.jobs import EvaluationHandle

    pending: list[Pending] = []
    for run in runs:
        text = trained.texts[run.domain].eval
        subjects: list[tuple[str, dict[str, str]]] = [
            (f"single:{eid}", {"expert_id": eid}) for eid, _ in run.found
        ]
        subjects += [(m, {"composition_id": run.compositions[m]}) for m in METHODS]
        for column, subject in subjects:
            key = content_key(what="evaluate", texts=text, **subject)
            job_id = state.get(key)
            if job_id is None:
                handle = agora.evaluate({"eval": text}, idempotency_key=key[:64], **subject)
                job_id = handle.job_id
                state.put(key, job_id)
            run.jobs[column] = job_id
            pending.append(Pending(f"{column.split(':')[0]} {run.domain}", job_id))
    wait_jobs(agora, pending, "evaluations", progress=progress, say=say, registry_url=registry_url)
    for run in runs:
        for column, job_id in run.jobs.items():
            score = EvaluationHandle(agora.jobs, job_id).wait(timeout=60)["eval"]
            run.scores[column] = score.bits_per_byte
            run.base = score.base_bits_per_byte
        singles = {c: v for c, v in run.scores.items() if c.startswith("single:")}
        if singles:
            best = min(singles, key=lambda c: singles[c])
            run.best_single = best.split(":", 1)[1]
            run.scores["best"] = singles[best]


def forget(
    agora: Any,
    trained: Trained,
    published: list[Published],
    runs: list[DomainRun],
    *,
    state: State,
    domain: str,
    restore: bool,
    again: bool,
    progress: bool,
    say: Callable[[str], None],
    registry_url: str,
) -> Forgetting:
    """Disable ``domain``'s expert through the moderation API, wait for the forgetting
    measurements the registry queues, search again, and (``restore``) enable it again.

    The measurement is a function of the expert's version and the compositions that used
    it: when an earlier run measured exactly these (and enabled the expert again), its
    reports are read back instead (``again`` disables and measures anew)."""
    target = next((p for p in published if p.expert.name == domain), None)
    if target is None:
        raise DemoError(f"no expert of the {domain} domain was published")
    expert = agora.get_expert(target.expert_id)
    used = sorted(
        cid
        for run in runs
        if target.expert_id in {e for e, _ in run.found}
        for cid in run.compositions.values()
    )
    key = content_key(
        what="forget", expert=target.expert_id, version=expert.latest_version, used=used
    )
    known = state.get(key)
    if known and restore and not again and expert.status == "active":
        reports = _reports(agora, target.expert_id, int(known["action_id"]))
        if reports and all(r.status != "pending" for r in reports):
            say(
                f"forgetting of {target.expert_id} ({domain}): measured at moderation action "
                f"{known['action_id']} on these compositions; read back (--forget-again to "
                "disable and measure anew)"
            )
            return Forgetting(
                target.expert_id,
                domain,
                int(known["action_id"]),
                reports,
                bool(known["still_found"]),
                True,
                reused=True,
            )
    if expert.status == "disabled":  # an earlier run kept it disabled: start from enabled
        agora.enable_expert(target.expert_id, "agora demo: enabled before the forgetting check")
    action = agora.disable_expert(target.expert_id, "agora demo: the forgetting check")
    say(f"disabled {target.expert_id} ({domain}); the registry measures what it took away")
    # The disable queues its measurements in its own transaction: they are all listed now.
    reports = _reports(agora, target.expert_id, action.id)
    wait_jobs(
        agora,
        [Pending(f"forgetting {r.method}", r.job_id) for r in reports],
        "forgetting",
        progress=progress,
        say=say,
        registry_url=registry_url,
    )
    deadline = time.monotonic() + 60
    while any(r.status == "pending" for r in reports) and time.monotonic() < deadline:
        time.sleep(POLL_S)  # a report is settled as its job's result is stored
        reports = _reports(agora, target.expert_id, action.id)
    found = agora.search(trained.texts[domain].query, trained.revision, k=SEARCH_K)
    still = target.expert_id in found.expert_ids
    if restore:
        agora.enable_expert(target.expert_id, "agora demo: restored after the forgetting check")
        state.put(key, {"action_id": action.id, "still_found": still})
    return Forgetting(target.expert_id, domain, action.id, reports, still, restore)


def _reports(agora: Any, expert_id: str, action_id: int) -> list[Any]:
    return [r for r in agora.moderation.forgetting(expert_id) if r.moderation_action == action_id]
