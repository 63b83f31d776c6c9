"""Server memory under the heaviest valid searches, with and without the search limits.

    .venv/bin/python benchmarks/search_memory.py                  # MiniLM, 16 concurrent
    .venv/bin/python benchmarks/search_memory.py --embedder hashing --concurrency 8

For each configuration, starts a real registry (``agora serve``: uvicorn, SQLite, local
blobs) in a temporary data directory, stores a small base and one expert through the SDK
(which also loads the embedder: the idle baseline is taken after that warm-up), then fires
``--concurrency`` clients at once, each sending one ``POST /v1/search`` of the largest size
the registry accepts (``search_max_texts`` texts, ``search_max_text_bytes`` of UTF-8 in
all), in three shapes:

  many-short   256 texts of 256 bytes: the most passages per request
  long         64 texts of 1 KiB: each at least as long as MiniLM's 256-token window
  one-long     one text of 64 KiB (cut to the window by the embedder)

The text is random lowercase "words", which the tokenizer splits into many sub-word
tokens: the most work per byte. Printed per shape: the server's peak RSS (psutil, sampled
every 20 ms, cross-checked with the kernel's VmHWM) against the idle baseline, the wall
time, the statuses the clients got, and ``GET /healthz`` latency sampled during the load.

Configurations:

  limited     the defaults: at most ``search_max_concurrent`` searches run at once, the
              others wait in a queue of ``search_max_queued`` (registry/api/limits.py)
  unlimited   AGORA_SEARCH_MAX_CONCURRENT=0: what the registry did before the limits
              (issue 14: 16 searches took 181 s and 1.6 GB RSS)

Each client connects from an address of its own (127.0.0.2, 127.0.0.3, ... on Linux's
loopback), as an attacker with many addresses would: the per-address limits let each one
search, so what differs between the configurations is the bound on concurrent searches.
A 503 (the queue is full) is an answer, not retried.

Nothing here asserts a number; docs/registry.md ("Limits") quotes what it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from transfer import (  # noqa: E402
    DATASHEET,
    RssSampler,
    admin_token,
    agora_cmd,
    expert_schema,
    free_port,
    write_base,
    write_expert,
)

from registry.client import Agora  # noqa: E402
from registry.settings import Settings  # noqa: E402

MiB = 1 << 20
# Each client connects from its own loopback address (127.0.0.2, 127.0.0.3, ...), as
# many users would, so the per-address limits see many clients. "unlimited" turns off
# the search limits, and the rate limits with them.
CONFIGS = {
    "limited": {},
    "unlimited": {
        "AGORA_SEARCH_MAX_CONCURRENT": "0",
        "AGORA_SEARCH_MAX_PER_CLIENT": "0",
        "AGORA_RATE_LIMIT_ANONYMOUS_PER_SECOND": "0",
        "AGORA_RATE_LIMIT_SEARCH_PER_SECOND": "0",
    },
}


def random_text(n_bytes: int, rng: random.Random) -> str:
    words: list[str] = []
    size = 0
    while True:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
        if size + len(word) + 1 > n_bytes:
            break
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def shapes(settings: Settings) -> dict[str, tuple[int, int]]:
    """name -> (number of texts, bytes per text), each at the size limit."""
    total = settings.search_max_text_bytes
    n = settings.search_max_texts
    return {"many-short": (n, total // n), "long": (64, total // 64), "one-long": (1, total)}


@contextmanager
def server(work: Path, env_extra: dict[str, str], embedder: str) -> Iterator[tuple[str, int]]:
    data_dir = work / "data"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGORA_")},
        "AGORA_DATA_DIR": str(data_dir),
        "AGORA_EMBEDDER": embedder,
        "AGORA_EMBEDDED_WORKER": "false",
        **env_extra,
    }
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            agora_cmd("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            cwd=work,
            stdout=log,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server not ready in 120 s")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def store_base(work: Path, url: str) -> str:
    """A small base and one expert (embedding its datasheet loads the embedder)."""
    schema = expert_schema(1 * MiB, d_model=64, n_layers=2)
    paths = write_base(work / "base", schema)
    token = admin_token(work / "data")
    with Agora(url, token=token, cache_dir=work / "cache") as agora:
        base = agora.upload_base_model(**paths)
        expert = work / "expert.safetensors"
        write_expert(expert, schema, base.revision)
        agora.submit_expert(expert, DATASHEET, base.revision)
    return base.revision


class HealthProbe:
    """GET /healthz every 100 ms on its own connection while the load runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.wait(0.1):
                start = time.perf_counter()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.failures += 1

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fire(url: str, body: bytes, concurrency: int) -> tuple[Counter[int], list[float]]:
    """``concurrency`` clients at once, each from its own address, one search each; their
    statuses and latencies."""
    barrier = threading.Barrier(concurrency)

    def one(i: int) -> tuple[int, float]:
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{2 + i}")
        with httpx.Client(base_url=url, timeout=3600, transport=transport) as client:
            barrier.wait()
            start = time.perf_counter()
            response = client.post(
                "/v1/search", content=body, headers={"Content-Type": "application/json"}
            )
            return response.status_code, time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    return Counter(s for s, _ in results), [t for _, t in results]


def run_config(name: str, args: argparse.Namespace, work: Path) -> None:
    settings = Settings()
    with server(work, CONFIGS[name], args.embedder) as (url, pid):
        process = psutil.Process(pid)
        started_rss = process.memory_info().rss
        revision = store_base(work, url)
        rng = random.Random(0)
        # One small search more, so the baseline holds what the first search allocates.
        httpx.post(
            f"{url}/v1/search",
            json={"texts": ["warm up"], "base_revision": revision},
            timeout=120,
        ).raise_for_status()
        baseline = RssSampler(process).rss()
        print(f"\n## {name} ({args.embedder}, {args.concurrency} concurrent clients)")
        print(
            f"server RSS: {started_rss / MiB:.0f} MiB at start, {baseline / MiB:.0f} MiB idle "
            f"after warm-up; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        header = (
            f"{'shape':<12}{'peak RSS':>10}{'growth':>9}{'VmHWM':>8}{'wall s':>8}"
            f"{'p50 s':>7}{'statuses':>22}{'healthz p50/max ms':>20}"
        )
        print(header)
        for shape, (n_texts, n_bytes) in shapes(settings).items():
            if args.shapes and shape not in args.shapes:
                continue
            texts = [random_text(n_bytes, rng) for _ in range(n_texts)]
            body = json.dumps({"texts": texts, "base_revision": revision, "k": 4}).encode()
            with RssSampler(process) as sampler, HealthProbe(url) as probe:
                start = time.perf_counter()
                statuses, latencies = fire(url, body, args.concurrency)
                wall = time.perf_counter() - start
            hwm = sampler.kernel_peak
            health = probe.latencies or [float("nan")]
            print(
                f"{shape:<12}{sampler.peak / MiB:>8.0f}Mi{(sampler.peak - baseline) / MiB:>+8.0f}"
                f"{(hwm or 0) / MiB:>7.0f}M{wall:>8.1f}{statistics.median(latencies):>7.1f}"
                f"{' '.join(f'{k}x{v}' for k, v in sorted(statuses.items())):>22}"
                f"{statistics.median(health) * 1e3:>12.0f}/{max(health) * 1e3:.0f}"
                + (f" ({probe.failures} failed)" if probe.failures else ""),
                flush=True,
            )
            # The next shape starts from a drained server: its peak is its own.
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (at most 250)")
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--shapes", nargs="*", default=None, help="default: all three")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()
    for name in args.configs:
        work = Path(tempfile.mkdtemp(prefix=f"agora-search-{name}-", dir=args.workdir))
        try:
            run_config(name, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
