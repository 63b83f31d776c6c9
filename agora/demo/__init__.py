"""``agora demo``: the whole system on this machine's own text (docs/demo.md).

1. training.py: the multi-domain corpus, a base trained on its general domains, one expert
   per other domain and one per discovered cluster, honest datasheets; cached by content.
2. flow.py: a registry (its own ``agora serve``, or ``--registry URL``), through the SDK:
   publish, then per domain search, ensemble, average and distillation through the job
   queue, evaluations on held-out text; then a disable and the registry's proof of
   forgetting.
3. report.py: one table and the forgetting check (or ``--json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agora.demo import flow
from agora.demo.training import DemoError, Plan, train_all


@dataclass(frozen=True)
class Options:
    root: Path
    registry: str | None  # None: the demo's own embedded registry
    token: str | None
    disable: str | None  # the domain whose expert is disabled; None: no forgetting check
    restore: bool
    forget_again: bool
    distill_steps: int
    progress: bool


def preflight(url: str, token: str | None) -> None:
    """Before minutes of training: the registry answers and the token is an admin's (the
    demo uploads a base and disables an expert; listing tokens needs the same role)."""
    from registry.client import Agora
    from registry.client.errors import AgoraError, Forbidden, Unauthenticated

    try:
        with Agora(url, token=token, max_retries=1) as agora:
            agora.tokens.list()
    except (Unauthenticated, Forbidden) as exc:
        raise DemoError(
            f"{url} refused the token ({exc.code}): the demo needs an admin token "
            "(agora admin create-token --role admin where that registry runs)"
        ) from None
    except AgoraError as exc:
        raise DemoError(f"cannot use the registry at {url}: {exc.detail} ({exc.code})") from None


def run(
    plan: Plan, options: Options, say: Callable[[str], None]
) -> tuple[flow.Outcome, dict[str, float]]:
    """Train (or find in the cache), publish, compose, evaluate, forget."""
    from registry.client import Agora

    started = time.perf_counter()
    if options.registry is not None:
        preflight(options.registry, options.token)
    options.root.mkdir(parents=True, exist_ok=True)
    trained = train_all(plan, options.root, progress=options.progress, say=say)
    timings = dict(trained.timings)
    timings["training"] = time.perf_counter() - started

    embedded = None
    if options.registry is None:
        embedded = flow.Embedded(options.root / "registry", options.root / "logs" / "registry.log")
        say("starting the demo's registry (agora serve, SQLite, its in-process worker)")
        url = embedded.start()
        token: str | None = embedded.token()
        state_key = "embedded"
    else:
        url, token, state_key = options.registry, options.token, options.registry
    say(f"registry: {url}")
    state = flow.State(options.root / "state.json", state_key)
    notes: list[str] = []
    try:
        with Agora(url, token=token) as agora:
            step = time.perf_counter()
            common = {"progress": options.progress, "say": say, "registry_url": url}
            published = flow.publish(agora, trained, state, **common)  # type: ignore[arg-type]
            for p in published:
                if p.status != "active":
                    notes.append(
                        f"{p.expert.name} ({p.expert_id}) is {p.status} after its check on "
                        "arrival: search does not offer it"
                    )
            timings["publish"] = time.perf_counter() - step
            step = time.perf_counter()
            runs = flow.compose_all(
                agora,
                trained,
                published,
                state,
                distill_steps=options.distill_steps,
                notes=notes,
                **common,  # type: ignore[arg-type]
            )
            timings["compose"] = time.perf_counter() - step
            step = time.perf_counter()
            flow.evaluate_all(agora, trained, runs, state, **common)  # type: ignore[arg-type]
            timings["evaluate"] = time.perf_counter() - step
            forgetting = None
            if options.disable is not None:
                step = time.perf_counter()
                forgetting = flow.forget(
                    agora,
                    trained,
                    published,
                    runs,
                    state=state,
                    domain=options.disable,
                    restore=options.restore,
                    again=options.forget_again,
                    **common,  # type: ignore[arg-type]
                )
                timings["forget"] = time.perf_counter() - step
    finally:
        if embedded is not None:
            embedded.stop()
    timings["total"] = time.perf_counter() - started
    outcome = flow.Outcome(
        trained.revision, published, runs, forgetting, notes, list(plan.unlabeled)
    )
    return outcome, timings


__all__ = ["Options", "Plan", "run"]
