"""``agora worker``, and the in-process worker ``agora serve`` starts (``start_embedded``).

torch, modelcore and the worker package are imported when a worker starts, not here.
Without them (the SDK-only install) ``agora worker`` says what to install and
``agora serve`` runs without an in-process worker.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from agora.common import echo_err, missing_modules
from agora.remote import DEFAULT_URL

# How long ``agora serve``'s shutdown waits for the in-process worker's current job.
EMBEDDED_STOP_TIMEOUT_S = 10.0

log = logging.getLogger("agora.worker")


def model_deps_installed() -> bool:
    return not missing_modules("model")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    # httpx logs every request at INFO, the empty lease polls included: one line per job
    # (the worker's own log) is what an operator reads; failures still show as warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is available", param_hint="--device")
    return device


def worker(
    *,
    registry: Annotated[
        str, typer.Option("--registry", envvar="AGORA_REGISTRY_URL", help="Registry base URL.")
    ] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="AGORA_TOKEN", help="A worker (or admin) token."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="cuda, cpu, or auto (cuda when there is one).")
    ] = "auto",
    kinds: Annotated[
        list[str] | None,
        typer.Option(
            "--kinds",
            help="Job kinds to take: compose, evaluate, or exact kinds (compose.<method>, "
            "...); comma-separated or repeated. Default: all.",
        ),
    ] = None,
    lease_seconds: Annotated[
        float,
        typer.Option(
            "--lease-seconds", min=2, max=3600, help="Lease length; heartbeats every third."
        ),
    ] = 60.0,
    poll_interval: Annotated[
        float,
        typer.Option("--poll-interval", min=0.05, help="Seconds between polls of an empty queue."),
    ] = 2.0,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Verified download cache (default: AGORA_CACHE_DIR or ~/.cache/agora).",
        ),
    ] = None,
    max_jobs: Annotated[
        int | None, typer.Option("--max-jobs", min=1, help="Exit after this many jobs.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Lease owner name (default: host-pid).")
    ] = None,
    heartbeat_file: Annotated[
        Path | None,
        typer.Option(
            "--heartbeat-file",
            help="Touched at every poll and every lease heartbeat: its age tells a "
            "healthcheck the worker is still turning (docker-compose.yml).",
        ),
    ] = None,
) -> None:
    """Lease composition and evaluation jobs from a registry and compute them.

    SIGTERM (or Ctrl-C): take no more jobs, finish the current one, exit. A second one:
    hand the current job back to the queue at once and exit.
    """
    if not token:
        raise typer.BadParameter(
            "a worker token is needed (or set AGORA_TOKEN)", param_hint="--token"
        )
    if not model_deps_installed():
        echo_err("error: the worker needs torch and modelcore: pip install 'agora[model]'")
        raise typer.Exit(2)
    _setup_logging()
    from registry.client import Agora, AgoraError, Forbidden, Unauthenticated
    from worker.runner import Worker, expand_kinds

    try:
        expand_kinds(kinds)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kinds") from None
    resolved = _resolve_device(device)
    with Agora(registry, token=token, cache_dir=cache_dir) as agora:
        runner = Worker(
            agora,
            name=name,
            kinds=kinds,
            lease_seconds=lease_seconds,
            poll_interval=poll_interval,
            device=resolved,
            max_jobs=max_jobs,
            work_dir=agora.cache.root / "work",
            heartbeat_file=heartbeat_file,
        )
        signals = {"count": 0}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            signals["count"] += 1
            if signals["count"] == 1:
                log.info("signal %d: finishing the current job, then exiting", signum)
                runner.request_stop()
            else:
                log.info("signal %d again: releasing the current job and exiting", signum)
                runner.request_release()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            runner.run()
        except (Unauthenticated, Forbidden) as exc:
            echo_err(f"error: the registry refused this token: {exc}")
            raise typer.Exit(2) from None
        except AgoraError as exc:
            echo_err(f"error: {exc}")
            raise typer.Exit(1) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def start_embedded(url: str, token: str, data_dir: Path) -> Callable[[], None]:
    """``agora serve``'s in-process worker: one ``Worker`` in a daemon thread, its cache
    under ``data_dir/worker-cache``. Returns ``stop``: ask it to stop, hand back its job
    if it does not finish in time, and wait for the thread."""
    _setup_logging()
    import torch

    from registry.client import Agora
    from worker.runner import Worker, default_name

    cache = Path(data_dir) / "worker-cache"
    agora = Agora(url, token=token, cache_dir=cache)
    runner = Worker(
        agora,
        name=f"{default_name()}-embedded",
        device="cuda" if torch.cuda.is_available() else "cpu",
        poll_interval=1.0,
        work_dir=cache / "work",
    )

    def run() -> None:
        try:
            runner.run()
        except Exception:
            log.exception("the in-process worker stopped")

    thread = threading.Thread(target=run, name="agora-embedded-worker", daemon=True)
    thread.start()

    def stop() -> None:
        runner.request_stop()
        thread.join(timeout=EMBEDDED_STOP_TIMEOUT_S)
        if thread.is_alive():
            runner.request_release()
            thread.join(timeout=10)
        agora.close()

    return stop
