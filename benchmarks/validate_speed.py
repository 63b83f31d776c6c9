"""How fast is strict expert validation compared with just reading the file?

Writes a float32 expert of about --size-mib MiB (default 1 GiB) that is valid for its
schema, then times, in the same run and on the same file:

  read       a plain buffered read of the whole file (8 MiB chunks), the baseline
  validate   registry.validation.validate_expert: framing, schema, dtype and a NaN/inf
             scan of every value

and prints MB/s for each, their ratio, and the process RSS (the data section is scanned
through one reusable 8 MiB buffer, so validation adds a few MiB whatever the file size).
Both passes read from the page cache once the file is written; run with a file larger
than RAM, or after dropping caches, to measure against the disk instead.

    .venv/bin/python benchmarks/validate_speed.py [--size-mib 1024] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from registry.validation import validate_expert

ST = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the peak measured is validation's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def write_expert(path: Path, size_mib: int, dtype: str) -> tuple[dict, str]:
    """A one-module expert whose layers add up to ~size_mib, written 8 MiB at a time."""
    st, itemsize = ST[dtype]
    d_model, d_ffn = 1024, 4096
    per_layer = 2 * d_model * d_ffn * itemsize + d_model * itemsize
    n_layers = max(1, round(size_mib * 2**20 / per_layer))
    tensors = []
    for i in range(n_layers):
        tensors += [
            {"name": f"layers.{i}.moe.module.w_in", "shape": [d_ffn, d_model]},
            {"name": f"layers.{i}.moe.module.w_out", "shape": [d_model, d_ffn]},
            {"name": f"layers.{i}.moe.router_row", "shape": [1, d_model]},
        ]
    schema = {"format": "agora.expert/1", "dtypes": [dtype], "tensors": tensors}
    revision = "ab" * 32
    header: dict = {
        "__metadata__": {
            "format": "agora.expert/1",
            "base_revision": revision,
            "layers": json.dumps(list(range(n_layers))),
            "n_modules": "1",
            "dtype": dtype,
        }
    }
    offset = 0
    for t in tensors:
        n = int(np.prod(t["shape"])) * itemsize
        header[t["name"]] = {"dtype": st, "shape": t["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(2**21, dtype=np.float32) * 0.02).astype(
        np.float16 if dtype == "float16" else np.float32
    )
    block_bytes = block.tobytes()
    if dtype == "bfloat16":
        block_bytes = (block.view(np.uint32) >> 16).astype("<u2").tobytes()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        remaining = offset
        while remaining:
            chunk = block_bytes[: min(remaining, len(block_bytes))]
            f.write(chunk)
            remaining -= len(chunk)
    return schema, revision


def plain_read(path: Path) -> None:
    buf = bytearray(8 * 2**20)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(ST), default="float32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the file (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "expert.safetensors"
        schema, revision = write_expert(path, args.size_mib, args.dtype)
        size = path.stat().st_size
        plain_read(path)  # warm the page cache so both passes see the same storage
        t_read = best_of(args.repeat, lambda: plain_read(path))
        rss_before = status_mib("VmRSS")
        reset = reset_peak_rss()
        t_val = best_of(
            args.repeat,
            lambda: validate_expert(path, expert_schema=schema, base_revision=revision),
        )
        peak = status_mib("VmHWM")
        mb = size / 1e6
        print(
            f"file          {size / 2**20:.0f} MiB {args.dtype} ({len(schema['tensors'])} tensors)"
        )
        print(f"plain read    {mb / t_read:8.0f} MB/s  ({t_read:.3f} s, best of {args.repeat})")
        print(f"validate      {mb / t_val:8.0f} MB/s  ({t_val:.3f} s, best of {args.repeat})")
        print(f"ratio         {t_read / t_val:8.2f} x plain-read throughput")
        scope = "during validation" if reset else "of the whole run, writing included"
        print(f"RSS           {rss_before:.0f} MiB before; peak {peak:.0f} MiB {scope}")


if __name__ == "__main__":
    main()
