"""Differential fuzzing of the safetensors framing check against the ``safetensors`` library.

The claim (registry/validation/safetensors_format.py): whatever ``read_header`` accepts, the
library reads identically: the same tensor names, dtypes, shapes and bytes, and the same
``__metadata__``, through ``safetensors.deserialize`` (bytes, every dtype), ``safe_open``
(a file, framework numpy) and ``safetensors.numpy.load`` (bytes; tensors of the dtypes numpy
has, so not bfloat16 or float8). Our parser may refuse more than the library; the reverse
is a disagreement: an accepted expert that a worker could not load, or would load as
something else than what was validated.

Two drivers share ``differential_check``:

- atheris (libFuzzer, coverage-guided over ``registry.validation``) in a subprocess, bounded
  by ``-max_total_time`` (a few seconds in CI, minutes with AGORA_ADVERSARIAL=heavy), from
  a seed corpus of valid files, a dictionary of the header's tokens and a structure-aware
  mutator (``mutate``: a header's numbers and strings swapped for the spellings where
  parsers part ways, the offsets re-tiled so the mutant reaches the checks that matter).
  This file is the fuzz target itself when run as a script (see ``main``).
- hypothesis, in-process: headers assembled from the values where JSON parsers and size
  arithmetic part ways (``-0``, ``1e2``, lone surrogate escapes, zero dims beside huge
  ones, more than 32 dims, integers past 2**64), which a byte fuzzer reaches rarely.

Heavier run by hand (docs/reliability.md)::

    AGORA_ADVERSARIAL=heavy .venv/bin/pytest -s tests/adversarial/test_differential_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
STATS_ENV = "AGORA_FUZZ_STATS"


class Disagreement(AssertionError):
    """Our parser accepted a file that the safetensors library reads differently (or not)."""


def as_file(data: bytes) -> bytes:
    """A fuzzer input -> the file to check.

    An input that starts with ``{`` is a header and its data section separated by the first
    NUL byte (a JSON header holds none), and gets its 8-byte length prefix written for it:
    mutations then explore headers instead of mostly breaking the length. Any other input
    is the whole file, length prefix included.
    """
    if data[:1] == b"{":
        header, _, body = data.partition(b"\x00")
        return struct.pack("<Q", len(header)) + header + body
    return data


def differential_check(file: bytes, scratch: Path) -> bool:
    """Whether our parser accepts ``file``; raise ``Disagreement`` if it does and the
    library reads it differently. ``scratch`` is a path safe_open may write the file to."""
    import safetensors
    import safetensors.numpy

    from registry.errors import ValidationFailed
    from registry.validation.safetensors_format import read_header_from

    try:
        header = read_header_from(io.BytesIO(file), len(file))
    except ValidationFailed:
        return False  # any other exception propagates: the validator itself failed
    ours = {
        t.name: (
            t.dtype,
            t.shape,
            file[header.data_start + t.begin : header.data_start + t.end],
        )
        for t in header.tensors
    }
    try:
        theirs = {
            name: (entry["dtype"], tuple(entry["shape"]), bytes(entry["data"]))
            for name, entry in safetensors.deserialize(file)
        }
    except Exception as exc:  # SafetensorError, or anything the binding raises
        raise Disagreement(f"accepted, but safetensors.deserialize fails: {exc}") from None
    if theirs != ours:
        raise Disagreement(f"deserialize reads {_summary(theirs)}; we read {_summary(ours)}")
    scratch.write_bytes(file)
    try:
        with safetensors.safe_open(str(scratch), framework="numpy") as f:
            names = set(f.keys())
            metadata = f.metadata() or {}
            arrays = {n: f.get_tensor(n) for n in names if ours[n][0] in NUMPY_DTYPES}
    except Exception as exc:
        raise Disagreement(f"accepted, but safe_open fails: {exc}") from None
    if names != set(ours):
        raise Disagreement(f"safe_open lists {sorted(names)}; we read {sorted(ours)}")
    if metadata != dict(header.metadata):
        raise Disagreement(f"safe_open metadata {metadata!r}; we read {dict(header.metadata)!r}")
    _same_arrays(arrays, ours, "safe_open")
    if all(dtype in NUMPY_DTYPES for dtype, _, _ in ours.values()):
        try:
            loaded = safetensors.numpy.load(file)
        except Exception as exc:
            raise Disagreement(f"accepted, but safetensors.numpy.load fails: {exc}") from None
        if set(loaded) != set(ours):
            raise Disagreement(f"numpy.load lists {sorted(loaded)}; we read {sorted(ours)}")
        _same_arrays(loaded, ours, "safetensors.numpy.load")
    return True


# The safetensors dtypes numpy represents (the library's numpy framework refuses the others).
NUMPY_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}


def _same_arrays(
    arrays: dict[str, np.ndarray], ours: dict[str, tuple[str, tuple[int, ...], bytes]], via: str
) -> None:
    for name, array in arrays.items():
        dtype, shape, data = ours[name]
        if array.dtype != np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<"):
            raise Disagreement(f"{via}: {name!r} is {array.dtype}, we read {dtype}")
        if tuple(array.shape) != shape:
            raise Disagreement(f"{via}: {name!r} has shape {array.shape}, we read {shape}")
        if array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes() != data:
            raise Disagreement(f"{via}: {name!r} holds other bytes than we read")


def _summary(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    return repr({n: (d, s, len(b)) for n, (d, s, b) in sorted(tensors.items())})[:600]


# --------------------------------------------------------------------------- seeds


def seed_files() -> list[bytes]:
    """Valid files, written by the safetensors library and by the test factories."""
    from helpers.artifacts import (
        RawTensor,
        base_revision,
        bf16,
        encode_safetensors,
        make_base_files,
        make_expert_bytes,
        make_expert_schema,
    )
    from safetensors.numpy import save

    schema = make_expert_schema(n_layers=2, d_model=4, d_ffn=6)
    revision = base_revision(make_base_files(schema))
    rng = np.random.default_rng(0)
    return [
        save({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}),
        save(
            {
                "w": rng.standard_normal((3, 2)).astype(np.float16),
                "i": np.arange(4, dtype=np.int64),
                "empty": np.zeros((0, 3), dtype=np.float32),
                "scalar": np.array(1.5, dtype=np.float64),
            },
            metadata={"format": "pt", "note": "naïve ✓"},
        ),
        encode_safetensors(
            {
                "b": bf16(np.ones((2, 2), np.float32)),
                "f8": RawTensor("F8_E4M3", (3,), b"\x01\x02\x03"),
                "c": RawTensor("C64", (1,), b"\0" * 8),
            },
            {"k": "v"},
        ),
        make_expert_bytes(schema, base_revision=revision),
        encode_safetensors({}, {}),
    ]


def structured(file: bytes) -> bytes:
    """The ``as_file`` input form of a valid file: its header, a NUL, its data section."""
    (n,) = struct.unpack("<Q", file[:8])
    return file[8 : 8 + n].rstrip(b" ") + b"\x00" + file[8 + n :]


# Tokens libFuzzer splices into inputs: the header's keys, every dtype (ours, the library's
# extra ones and misspellings), and the numbers, escapes and bytes where parsers part ways.
DICTIONARY: list[bytes] = [
    b'"dtype"',
    b'"shape"',
    b'"data_offsets"',
    b'"__metadata__"',
    *(
        b'"%s"' % d
        for d in [
            b"BOOL", b"U8", b"I8", b"F8_E4M3", b"F8_E5M2", b"F8_E8M0", b"F8_E4M3FNUZ",
            b"F8_E5M2FNUZ", b"F4", b"F6_E2M3", b"F6_E3M2", b"I16", b"U16", b"F16", b"BF16",
            b"I32", b"U32", b"F32", b"I64", b"U64", b"F64", b"C64", b"f32", b"F128",
        ]
    ),
    b"-0", b"-1", b"0.0", b"1e2", b"1E400", b"18446744073709551616", b"9223372036854775808",
    b"4611686018427387904", b"NaN", b"Infinity", b"null", b"true", b"[]", b"{}", b"[0,0]",
    b'"\\ud800"', b'"\\udfff"', b'"\\ud83d\\ude00"', b'"\\u0000"', b"\\u005f", b'""',
    b"\\t", b"\\n", b"\\r", b"\\\\", b"\\/", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\xc0\x80",
]  # fmt: skip


def write_dictionary(path: Path) -> None:
    """libFuzzer's dictionary format: one quoted token a line, bytes escaped as \\xNN."""
    lines = [
        '"'
        + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)
        + '"'
        for token in DICTIONARY
    ]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- atheris driver


# The header's tokens, for the structure-aware mutations (a JSON string, or a JSON number).
_TOKEN = re.compile(rb'"(?:[^"\\\x00]|\\.)*"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?')
_ENTRY = re.compile(rb'"(?:[^"\\\x00]|\\.)*"\s*:\s*\{[^{}]*\}')
_OFFSETS = re.compile(rb'"data_offsets"\s*:\s*\[[^\]]*\]')
_NUMBERS = [b"0", b"1", b"2", b"3", b"4", b"8", b"-0", b"-1", b"1.0", b"1e0", b"0e0", b"01",
            b"18446744073709551615", b"18446744073709551616", b"9223372036854775808",
            b"4611686018427387904", b"2305843009213693952", b"1099511627776", b"1" + b"0" * 30,
            b"1e400"]  # fmt: skip
_STRINGS = [
    *(d for d in DICTIONARY if d.startswith(b'"') and d.endswith(b'"') and len(d) > 1),
    b'"a"', b'"b"', b'"x\\udc00"', b'"\\u005f_metadata__"', b'"\xc3\xa9"', b'"\xed\xa0\x80"',
    b'"a\\u0000"', b'"\\u0061"',
]  # fmt: skip


def _retile(header: bytes) -> tuple[bytes, int] | None:
    """Rewrite every ``data_offsets`` so the entries tile a data section in text order, as
    their dtypes and shapes say (other spellings are left as they are); None if the header
    is not a JSON object of such entries."""
    from registry.validation.safetensors_format import DTYPE_ITEMSIZE

    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    sizes = []
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            return None
        numel = 1
        for dim in entry["shape"]:
            numel *= dim if isinstance(dim, int) else 1
        size = numel * DTYPE_ITEMSIZE.get(str(entry.get("dtype")), 1)
        sizes.append(size if 0 <= size <= 1024 else 0)
    spans = list(_OFFSETS.finditer(header))
    if len(spans) != len(sizes):
        return None
    out, cursor, offset = [], 0, 0
    for span, size in zip(spans, sizes, strict=True):
        out.append(header[cursor : span.start()])
        out.append(b'"data_offsets":[%d,%d]' % (offset, offset + size))
        cursor, offset = span.end(), offset + size
    out.append(header[cursor:])
    return b"".join(out), offset


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's byte mutations, and for ``{``-inputs token-level ones: a number or string
    swapped for a spelling where parsers differ, an escape inserted, an entry duplicated or
    dropped, a dimension added; then, often, the offsets and data re-tiled to fit, so the
    mutant gets past the size checks to the values that matter."""
    import random

    import atheris

    rng = random.Random(seed)
    if data[:1] != b"{" or rng.random() < 0.25:
        return bytes(atheris.Mutate(data, max_size))
    header, _, body = data.partition(b"\x00")
    tokens = list(_TOKEN.finditer(header))
    entries = list(_ENTRY.finditer(header))
    op = rng.randrange(6)
    if op <= 1 and tokens:
        t = rng.choice(tokens)
        if t.group().startswith(b'"'):
            new = rng.choice(_STRINGS)
        elif rng.random() < 0.5:
            new = rng.choice(_NUMBERS)
        else:
            try:
                value = int(t.group())
            except ValueError:  # 1.0, 1e2, or past int()'s digit limit
                value = 0
            new = b"%d" % max(0, value + rng.randint(-2, 2))
        header = header[: t.start()] + new + header[t.end() :]
    elif op == 2 and tokens:
        strings = [t for t in tokens if t.group().startswith(b'"')] or tokens
        t = rng.choice(strings)
        at = rng.randint(t.start() + 1, max(t.start() + 1, t.end() - 1))
        escape = rng.choice([b"\\ud800", b"\\udfff", b"\\ud83d\\ude00", b"\\u0000", b"\\n"])
        header = header[:at] + escape + header[at:]
    elif op == 3 and entries:
        e = rng.choice(entries)
        copy = e.group()
        if rng.random() < 0.5:  # the same entry under a new name
            copy = rng.choice(_STRINGS) + copy[copy.index(b":") :]
        header = header[: e.end()] + b"," + copy + header[e.end() :]
    elif op == 4 and entries:
        e = rng.choice(entries)
        header = header[: e.start()] + header[e.end() :].removeprefix(b",")
    elif op == 5:
        header = header.replace(b'"shape":[', b'"shape":[' + rng.choice(_NUMBERS) + b",", 1)
    if rng.random() < 0.7:
        tiled = _retile(header)
        if tiled is not None:
            header, size = tiled
            body = (body + bytes(rng.getrandbits(8) for _ in range(size)))[:size]
    out = header + b"\x00" + body
    return out[:max_size]


def main(argv: list[str]) -> None:
    """The atheris fuzz target: ``python test_differential_fuzz.py CORPUS -max_total_time=S``
    with the repository and tests/ on PYTHONPATH.

    Counts go to the file named by AGORA_FUZZ_STATS (libFuzzer exits without running
    Python's atexit handlers): executions, inputs our parser accepted and the library
    agreed on.
    """
    import atheris

    with atheris.instrument_imports(include=["registry.validation"]):
        import registry.validation.safetensors_format
        import registry.validation.strict_json  # noqa: F401
    import safetensors.numpy  # noqa: F401

    stats_path = Path(os.environ[STATS_ENV])
    scratch = stats_path.with_name("candidate.safetensors")
    counts = {"executions": 0, "accepted": 0}
    last_flush = [0.0]

    def flush() -> None:
        stats_path.write_text(json.dumps(counts))
        last_flush[0] = time.monotonic()

    def one_input(data: bytes) -> None:
        counts["executions"] += 1
        if differential_check(as_file(data), scratch):
            counts["accepted"] += 1
        if time.monotonic() - last_flush[0] > 0.2:
            flush()

    flush()
    atheris.Setup(argv, one_input, custom_mutator=mutate)
    atheris.Fuzz()


def _fuzz_seconds() -> int:
    from helpers.adversarial import scaled

    return scaled(6, 300)


def _rss_limit_mb(headroom_mb: int = 2048) -> int:
    """libFuzzer's out-of-memory limit for the fuzzer process: ``headroom_mb`` above this
    process's peak RSS. libFuzzer measures the peak (getrusage's ru_maxrss), and Linux
    carries a process's peak across fork and exec, so the child starts at the parent's:
    a whole-suite pytest process already holds more than 2 GB when this test runs."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return peak_mb + headroom_mb


def test_atheris_finds_no_disagreement(tmp_path: Path) -> None:
    """Coverage-guided fuzzing: every input our parser accepts, the library reads the same."""
    pytest.importorskip("atheris", reason="atheris (libFuzzer for Python) is not installed")
    from helpers.adversarial import report

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seed_files()):
        assert differential_check(seed, tmp_path / "seed.safetensors"), f"seed {i} is refused"
        (corpus / f"raw{i}").write_bytes(seed)
        (corpus / f"structured{i}").write_bytes(structured(seed))
    dictionary = tmp_path / "header.dict"
    write_dictionary(dictionary)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    stats = tmp_path / "stats.json"
    seconds = _fuzz_seconds()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        str(corpus),
        f"-max_total_time={seconds}",
        f"-dict={dictionary}",
        f"-artifact_prefix={artifacts}/",
        "-max_len=4096",
        f"-rss_limit_mb={_rss_limit_mb()}",
        "-print_final_stats=1",
    ]
    env = {**os.environ, STATS_ENV: str(stats), "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    log = done.stdout + done.stderr
    findings = sorted(p.name for p in artifacts.iterdir())
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    counts = json.loads(stats.read_text()) if stats.exists() else {}
    report(
        "differential fuzz (atheris)",
        seconds=seconds,
        executions=runs.group(1) if runs else "?",
        accepted=counts.get("accepted", "?"),
        disagreements=len(findings),
    )
    assert not findings, f"disagreements {findings}:\n{log[-6000:]}"
    assert done.returncode == 0, f"atheris exited {done.returncode}:\n{log[-6000:]}"
    assert runs is not None, log[-3000:]
    # The run explored: it executed inputs and the accepted ones were compared.
    assert int(runs.group(1)) > 1000
    assert counts["accepted"] > 0


# --------------------------------------------------------------------------- hypothesis driver

# JSON texts for one value each, where our parser and serde_json (or numpy) may part ways.
_COUNT_TEXTS = ["0", "1", "2", "3", "4", "-0", "-1", "1.0", "1e0", "4E0", "0.5", "true", "null",
                '"2"', "[2]", "01", "18446744073709551616", "18446744073709551615",
                "9223372036854775807", "9223372036854775808", "4611686018427387904",
                "2305843009213693952", "1" + "0" * 30]  # fmt: skip
_NAME_TEXTS = ['"a"', '"b"', '"w.0"', '"\\u0061"', '"\\ud800"', '"x\\udfff"', '"\\ud83d\\ude00"',
               '"\\u0000"', '""', '"__metadata__"', '"naïve"', '"\\"q\\""', '"a\\/b"']  # fmt: skip
_DTYPE_TEXTS = [
    '"F32"',
    '"F16"',
    '"BF16"',
    '"I8"',
    '"U8"',
    '"BOOL"',
    '"C64"',
    '"F64"',
    '"I64"',
    '"F8_E4M3"',
    '"F8_E8M0"',
    '"F4"',
    '"F8_E4M3FNUZ"',
    '"f32"',
    "32",
    "null",
]
_METADATA_TEXTS = ["", '"__metadata__":{},', '"__metadata__":{"k":"v"},', '"__metadata__":null,',
                   '"__metadata__":{"k":"\\ud800"},', '"__metadata__":{"\\udc00":"v"},',
                   '"__metadata__":{"k":1},', '"__metadata__":{"k":"-0"},']  # fmt: skip


def _itemsize(dtype_text: str) -> int:
    from registry.validation.safetensors_format import DTYPE_ITEMSIZE

    try:
        return DTYPE_ITEMSIZE.get(json.loads(dtype_text), 1)
    except (ValueError, TypeError):
        return 1


def _header_strategy() -> Any:
    """(header JSON text, data section): a valid header of up to four plain entries in which
    at most one site (a name, a dtype, a dim, an offset's spelling, the metadata, the
    whitespace after the header) holds a tricky value, the data sized to fit."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Any) -> tuple[str, bytes]:
        n = draw(st.integers(0, 4))
        names = [f'"t{i}"' for i in range(n)]
        dtypes = [draw(st.sampled_from(['"F32"', '"U8"', '"BF16"', '"I64"'])) for _ in names]
        shapes = [draw(st.lists(st.integers(0, 4).map(str), max_size=3)) for _ in names]
        spellings = [""] * n
        metadata = draw(st.sampled_from(_METADATA_TEXTS[:3]))
        trailer = draw(st.sampled_from(["", "  "]))
        site = draw(st.sampled_from(["none", "meta", "trailer", *(["entry"] * 4 if n else [])]))
        if site == "meta":
            metadata = draw(st.sampled_from(_METADATA_TEXTS))
        elif site == "trailer":
            trailer = draw(st.sampled_from(["\t\n", "\r", "\x00", " x", "\u00a0"]))
        elif site == "entry":
            k = draw(st.integers(0, n - 1))
            what = draw(st.sampled_from(["name", "dtype", "dim", "rank", "offsets"]))
            if what == "name":
                names[k] = draw(st.sampled_from(_NAME_TEXTS))
            elif what == "dtype":
                dtypes[k] = draw(st.sampled_from(_DTYPE_TEXTS))
            elif what == "dim":
                at = draw(st.integers(0, len(shapes[k])))
                shapes[k] = [*shapes[k][:at], draw(st.sampled_from(_COUNT_TEXTS)), *shapes[k][at:]]
            elif what == "rank":
                shapes[k] = ["1"] * draw(st.sampled_from([32, 33, 64, 65]))
            else:
                spellings[k] = draw(st.sampled_from(["-0", "1e0", "junk", "gap"]))
        parts, offset, data = [], 0, b""
        for name, dtype, shape, spelling in zip(names, dtypes, shapes, spellings, strict=True):
            numel = 1  # as json.loads reads the dims (-0 is 0); sizes of other types: 1
            for dim in shape:
                try:
                    value = json.loads(dim)
                except ValueError:  # 01: not JSON at all
                    value = 1
                numel *= value if isinstance(value, int) and not isinstance(value, bool) else 1
            size = numel * _itemsize(dtype)
            size = size if 0 <= size <= 64 else 0
            begin, end = offset, offset + size
            begin_text = str(begin)
            if spelling == "-0" and begin == 0:
                begin_text = "-0"
            elif spelling == "1e0":
                begin_text = f"{begin}e0"
            elif spelling == "junk":
                begin_text = f'"{begin}"'
            elif spelling == "gap":
                begin, end = begin + 1, end + 1
                begin_text = str(begin)
            parts.append(
                f'{name}:{{"dtype":{dtype},"shape":[{",".join(shape)}],'
                f'"data_offsets":[{begin_text},{end}]}}'
            )
            data += draw(st.binary(min_size=end - offset, max_size=end - offset))
            offset = end
        text = ("{" + metadata + ",".join(parts)).rstrip(",") + "}" + trailer
        return text, data

    return build()


def test_hypothesis_headers_agree_with_the_library(tmp_path: Path) -> None:
    """Structured differential test: the spellings a byte fuzzer rarely builds."""
    from helpers.adversarial import report, scaled
    from hypothesis import HealthCheck, given, settings

    scratch = tmp_path / "candidate.safetensors"
    counts = {"tried": 0, "accepted": 0}

    @settings(
        max_examples=scaled(400, 20_000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )
    @given(_header_strategy())
    def check(case: tuple[str, bytes]) -> None:
        text, data = case
        raw = text.encode("utf-8")
        counts["tried"] += 1
        if differential_check(struct.pack("<Q", len(raw)) + raw + data, scratch):
            counts["accepted"] += 1

    check()
    report("differential (hypothesis headers)", tried=counts["tried"], accepted=counts["accepted"])
    # Not vacuous: a share of the candidates passed our parser and were compared.
    assert counts["accepted"] >= counts["tried"] // 20


# Headers our parser accepted before the fuzzers found them, and which reader fails on each.
FOUND = {
    "negative zero offset": (
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}',
        4,
        "deserialize",
    ),
    "negative zero dim": (
        '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}',
        0,
        "deserialize",
    ),
    "lone surrogate name": (
        '{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        1,
        "deserialize",
    ),
    "lone surrogate metadata key": ('{"__metadata__":{"\\udc00":"v"}}', 0, "deserialize"),
    "lone surrogate metadata value": ('{"__metadata__":{"k":"x\\ud83d"}}', 0, "deserialize"),
    "zero dim beside 2**62": (
        '{"a":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}',
        0,
        "numpy",
    ),
    "size arithmetic overflow": (
        '{"a":{"dtype":"U8","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}',
        0,
        "deserialize",
    ),
    "dim past 2**64 beside a zero": (
        '{"a":{"dtype":"U8","shape":[0,18446744073709551616],"data_offsets":[0,0]}}',
        0,
        "deserialize",
    ),
    "65 dims": (
        '{"a":{"dtype":"U8","shape":[' + ",".join(["1"] * 65) + '],"data_offsets":[0,1]}}',
        1,
        "numpy",
    ),
    # numpy before 2.0 holds at most 32 dimensions (pyproject allows numpy>=1.26).
    "33 dims": (
        '{"a":{"dtype":"U8","shape":[' + ",".join(["1"] * 33) + '],"data_offsets":[0,1]}}',
        1,
        "numpy<2",
    ),
}


@pytest.mark.parametrize("label", sorted(FOUND))
def test_disagreements_found_by_fuzzing_are_refused(tmp_path: Path, label: str) -> None:
    """Each was accepted by our parser and is not readable by the library (or numpy)."""
    import safetensors
    import safetensors.numpy

    from registry.errors import ValidationFailed
    from registry.validation.safetensors_format import read_header_from

    text, data, reader = FOUND[label]
    raw = text.encode()
    file = struct.pack("<Q", len(raw)) + raw + b"\x01" * data
    with pytest.raises(ValidationFailed) as info:
        read_header_from(io.BytesIO(file), len(file))
    assert info.value.status == 422
    # The problem body quotes header content; it must be encodable as a response.
    json.dumps(info.value.problem(), ensure_ascii=False).encode("utf-8")
    if reader == "deserialize":
        with pytest.raises(safetensors.SafetensorError):
            safetensors.deserialize(file)
    elif reader == "numpy":
        with pytest.raises(ValueError, match=r"too big|dimension"):
            safetensors.numpy.load(file)
    assert differential_check(file, tmp_path / "c.safetensors") is False


def test_the_oracle_detects_a_disagreement(tmp_path: Path, monkeypatch) -> None:
    """``differential_check`` is not vacuous: a parser that misreads a shape is caught."""
    from dataclasses import replace

    import registry.validation.safetensors_format as fmt

    real = fmt._check_entries

    def misread(header: dict[str, Any]) -> tuple[fmt.TensorInfo, ...]:
        return tuple(replace(t, shape=(*t.shape, 1)) for t in real(header))

    monkeypatch.setattr(fmt, "_check_entries", misread)
    with pytest.raises(Disagreement, match="deserialize reads"):
        differential_check(seed_files()[0], tmp_path / "c.safetensors")


if __name__ == "__main__":
    main(sys.argv)
