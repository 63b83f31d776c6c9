"""Small CPU kernels in C, compiled on first use with the system C compiler.

Torch's eager CPU ops each make a pass over memory and compute exp with a
general-purpose vectorised routine; a kernel that fuses a whole row's work (and uses a
shorter polynomial for the float32 range it needs) is several times faster for the
log-space mixture of ``modelcore.compose.ensemble.log_mix``. Like Triton's launcher
stubs, the source ships with the package and is built on the machine that runs it, here
with ``cc -O3 -march=native``, into ``$AGORA_NATIVE_CACHE`` (default
``$XDG_CACHE_HOME/agora/native`` or ``~/.cache/agora/native``), keyed by the source, the
compiler and the CPU, so a cache shared between machines never loads code built for
another CPU. Building takes about a second, once.

Nothing here is required: without a C compiler (or with ``AGORA_NATIVE=0``) ``logmix()``
returns None and callers keep their torch path, with one warning in the log saying why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("logmix.c")
# -march=native only: built for a generic target the kernel's 8-lane vectors are split
# into pairs of 4 and it is slower than torch's ops, so then the torch path is better.
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
_lock = threading.Lock()
_loaded: dict[str, LogMixKernel | None] = {}


def cache_dir() -> Path:
    explicit = os.environ.get("AGORA_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "agora" / "native"


def enabled() -> bool:
    return os.environ.get("AGORA_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _cpu_identity() -> str:
    """What -march=native depends on: the machine, and on Linux the CPU model and flags."""
    parts = [platform.machine(), platform.system()]
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in {"model name", "flags", "Features", "CPU part", "vendor_id"}:
            parts.append(line)
            if key in {"flags", "Features"}:
                break  # the first core's line is enough
    return "\n".join(parts)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 (our own argv: the compiler found on PATH or $CC)
            [cc, "--version"], check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def build(source: Path = _SOURCE) -> Path:
    """Compile ``source`` into the cache (if not there already); returns the library's path.

    Raises RuntimeError (with the compiler's message) when it does not compile.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    command = [cc, *_FLAGS]
    key = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                " ".join(command).encode(),
                _compiler_version(cc).encode(),
                _cpu_identity().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(  # noqa: S603 (our own argv: compiler, fixed flags, our paths)
            [*command, "-o", tmp, str(source)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            error = done.stderr.strip()[-2000:]
        else:
            os.replace(tmp, target)  # atomic: a concurrent build just replaces it
            log.info("built %s with %s", target, " ".join(command))
            return target
    except (OSError, subprocess.SubprocessError) as e:
        error = str(e)
    finally:
        Path(tmp).unlink(missing_ok=True)
    raise RuntimeError(f"could not compile {source.name} ({' '.join(command)}):\n{error}")


class LogMixKernel:
    """``agora_log_mix_rows`` from logmix.c: rows r0..r1 of a log-space mixture."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # CDLL calls release the GIL while they run
        fn = lib.agora_log_mix_rows
        fn.restype = None
        fn.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),  # xs: P row pointers
            ctypes.c_int64,  # P
            ctypes.c_void_p,  # w (N x P)
            ctypes.c_void_p,  # out (N x V)
            ctypes.c_int64,  # V
            ctypes.c_int64,  # r0
            ctypes.c_int64,  # r1
            ctypes.c_int,  # accumulate
            ctypes.c_int,  # finish
            ctypes.c_void_p,  # scratch ((GROUP + 1) V floats, GROUP = 4)
        ]
        self._fn = fn
        self.path = path

    @staticmethod
    def accepts(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()

    def bind(
        self,
        xs: list[torch.Tensor],
        w_NP: torch.Tensor,
        out: torch.Tensor,
        *,
        accumulate: bool,
        finish: bool,
    ) -> RowMixer:
        """Check shapes and layouts once; the returned callable runs row ranges."""
        if not xs:
            raise ValueError("no logit matrices")
        N, V = out.shape
        for t in (*xs, w_NP, out):
            if not self.accepts(t):
                raise ValueError("native log_mix takes contiguous float32 CPU tensors")
        if any(x.shape != (N, V) for x in xs) or w_NP.shape != (N, len(xs)):
            raise ValueError("logit matrices, weights and output must agree on (N, V)")
        return RowMixer(self._fn, xs, w_NP, out, accumulate=accumulate, finish=finish)


class RowMixer:
    """One bound mixture: ``run(r0, r1, scratch)`` fills rows r0..r1 of ``out``."""

    def __init__(
        self,
        fn: ctypes._CFunctionType,
        xs: list[torch.Tensor],
        w_NP: torch.Tensor,
        out: torch.Tensor,
        *,
        accumulate: bool,
        finish: bool,
    ) -> None:
        self._fn = fn
        self._keep = (xs, w_NP, out)  # the pointers below stay valid while this lives
        self._ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
        self._args = (
            len(xs),
            w_NP.data_ptr(),
            out.data_ptr(),
            out.shape[1],
        )
        self._flags = (int(accumulate), int(finish))
        self.V = int(out.shape[1])

    def scratch(self) -> torch.Tensor:
        return torch.empty(5 * self.V, dtype=torch.float32)

    def run(self, r0: int, r1: int, scratch: torch.Tensor) -> None:
        if scratch.numel() < 5 * self.V or not LogMixKernel.accepts(scratch):
            raise ValueError(f"scratch must be {5 * self.V} contiguous float32 values")
        P, w, out, V = self._args
        self._fn(self._ptrs, P, w, out, V, r0, r1, *self._flags, scratch.data_ptr())


def logmix() -> LogMixKernel | None:
    """The compiled log-mix kernel, or None (disabled, no compiler, or it failed to build:
    logged once as a warning)."""
    if not enabled():
        return None
    key = str(cache_dir())
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = LogMixKernel(build())
            except (RuntimeError, OSError) as e:
                log.warning("native log_mix kernel unavailable, using torch ops: %s", e)
                _loaded[key] = None
        return _loaded[key]
