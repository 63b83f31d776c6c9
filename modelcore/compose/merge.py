"""Parameter averaging of experts: uniform, weighted, TIES; streamed tensor by tensor.

Shape legend: P experts being merged, S elements of one tensor.

Each method is a small registered object with a name and the paper it follows (as in
mergekit): a pure function from the P input tensors of one name (and their weights) to
the merged tensor. ``merge_tensors`` applies a method to in-memory state dicts;
``merge_files`` streams from the experts' safetensors files: it opens them with
``safe_open`` (memory-mapped) and holds one tensor per input at a time (uniform and
weighted read row blocks of it, so the working set stays in cache), and writes the output
file tensor by tensor behind a header computed up front, so the merged expert is never
whole in memory either.

Arithmetic is float64 and cast once at the end: a float32 sum of P identical values
divided by P is not always the value again, a float64 one is (P * x is exact for
P < 2^29), so averaging n copies of an expert returns it bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modelcore.experts import DTYPES, EXPERT_FORMAT, _atomic_write

MergeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    paper: str
    fn: MergeFn
    # Elementwise methods can merge any slice of a tensor on its own (streamed in blocks);
    # TIES needs whole tensors (its trim threshold is a per-tensor magnitude quantile).
    elementwise: bool
    params: Mapping[str, Any] = field(default_factory=dict)  # defaults of extra parameters

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        weights: torch.Tensor,
        reference: torch.Tensor | None = None,
        **params: Any,
    ) -> torch.Tensor:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"{self.name} takes no parameters {unknown}")
        return self.fn(tensors, weights, reference, **{**self.params, **params})


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    acc = tensors[0].to(torch.float64) * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:].tolist(), strict=True):
        acc.add_(t.to(torch.float64), alpha=w)
    return acc


def _linear(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, reference: torch.Tensor | None
) -> torch.Tensor:
    # Weights are normalised by the caller; the uniform ones are exactly 1/P (a power of
    # two or not, P * x / P is computed as a sum then one division below).
    if bool((weights == weights[0]).all()):
        acc = tensors[0].to(torch.float64).clone()
        for t in tensors[1:]:
            acc.add_(t.to(torch.float64))
        return acc.div_(len(tensors))
    return _weighted_sum(tensors, weights)


def _ties(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    reference: torch.Tensor | None,
    *,
    density: float,
    scale: float,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, section 3): per task vector ``tau = x - reference``,
    trim to the top ``density`` fraction by magnitude, elect each element's sign as the
    sign of the summed trimmed values, and average only the values that agree with it
    (a disjoint mean, weighted by the experts' weights); ``reference + scale * merged``.
    Trimming is per tensor, as mergekit does (the paper ranks the whole model at once,
    which a one-tensor-at-a-time stream cannot)."""
    if not 0 < density <= 1:
        raise ValueError("density must be in (0, 1]")
    ref = (
        torch.zeros_like(tensors[0], dtype=torch.float64)
        if reference is None
        else reference.to(torch.float64)
    )
    taus = []
    for t in tensors:
        tau = t.to(torch.float64) - ref
        keep = max(1, math.ceil(density * tau.numel()))
        if keep < tau.numel():
            flat = tau.flatten()
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[flat.abs().topk(keep).indices] = True
            tau = torch.where(mask, flat, 0.0).view_as(tau)
        taus.append(tau)
    w = weights.to(torch.float64)
    sign = torch.sign(sum(wi * tau for wi, tau in zip(w, taus, strict=True)))
    num = torch.zeros_like(ref)
    den = torch.zeros_like(ref)
    for wi, tau in zip(w.tolist(), taus, strict=True):
        agree = (torch.sign(tau) == sign) & (tau != 0)
        num.add_(torch.where(agree, tau, 0.0), alpha=wi)
        den.add_(agree.to(torch.float64), alpha=wi)
    merged = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
    return ref + scale * merged


UNIFORM = register(
    MergeMethod(
        "uniform",
        "Wortsman et al. 2022, Model soups (uniform soup); Li et al. 2022, "
        "Branch-Train-Merge (parameter average of expert LMs)",
        _linear,
        elementwise=True,
    )
)
WEIGHTED = register(
    MergeMethod(
        "weighted",
        "Li et al. 2022, Branch-Train-Merge section 4 (average weighted by the domain "
        "posterior); Matena & Raffel 2022 use the same linear form",
        _linear,
        elementwise=True,
    )
)
TIES = register(
    MergeMethod(
        "ties",
        "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
        _ties,
        elementwise=False,
        params={"density": 0.2, "scale": 1.0},
    )
)


def _check_weights_allowed(method: MergeMethod, weights: Sequence[float] | None) -> None:
    if method.name == "uniform" and weights is not None:
        raise ValueError("uniform averaging takes no weights (use the weighted method)")
    if method.name == "weighted" and weights is None:
        raise ValueError("weighted averaging needs weights")


def _canonical_order(weights: torch.Tensor, keys: Sequence[bytes]) -> list[int]:
    """One summation order whatever order the experts were given in: float addition is
    not associative, so permuted inputs would otherwise differ in the last bit. Sorted by
    weight, then by a prefix of the expert's bytes (equal prefixes: equal experts, in
    practice, whose order does not matter)."""
    return sorted(range(len(keys)), key=lambda i: (float(weights[i]), keys[i]))


def normalise_weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() != n:
        raise ValueError(f"{w.numel()} weights for {n} experts")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def merge_tensors(
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str = "uniform",
    *,
    weights: Sequence[float] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory experts (same names and shapes) into one; output in the first's dtype."""
    m = get_method(method)
    if not experts:
        raise ValueError("nothing to merge")
    _check_weights_allowed(m, weights)
    names = sorted(experts[0])
    for e in experts[1:]:
        if sorted(e) != names or any(e[n].shape != experts[0][n].shape for n in names):
            raise ValueError("experts to merge must have the same tensor names and shapes")
    w = normalise_weights(weights, len(experts))
    first = names[0]
    keys = [e[first].detach().reshape(-1)[:1024].cpu().numpy().tobytes() for e in experts]
    order = _canonical_order(w, keys)
    experts = [experts[i] for i in order]
    w = w[order]
    out = {}
    for name in names:
        ref = None if reference is None else reference[name]
        merged = m([e[name] for e in experts], w, ref, **params)
        out[name] = merged.to(experts[0][name].dtype)
    return out


# -- streaming over files -----------------------------------------------------------------
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_BLOCK_BYTES = 1 << 20  # rows per streamed block: ~1 MiB of each input, cache-resident


def _header(path: str) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    meta = doc.pop("__metadata__", {}) or {}
    return meta, {k: (v["dtype"], list(v["shape"])) for k, v in doc.items()}


def _data_prefix(path: str, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + size)
        return f.read(n)


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    method: str = "uniform",
    *,
    weights: Sequence[float] | None = None,
    reference: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    **params: Any,
) -> dict[str, str]:
    """Merge expert files into ``out`` (atomic: a failure leaves nothing), streaming.

    The inputs must be experts of one base (same ``base_revision``, names and shapes).
    Returns the output's metadata (the inputs', plus ``merge``: method, weights, params).
    """
    m = get_method(method)
    if not paths:
        raise ValueError("nothing to merge")
    _check_weights_allowed(m, weights)
    files = [os.fspath(p) for p in paths]
    headers = [_header(p) for p in files]
    meta0, tensors0 = headers[0]
    for p, (meta, tensors) in zip(files, headers, strict=True):
        if meta.get("format") != EXPERT_FORMAT:
            raise ValueError(f"{p} is not an {EXPERT_FORMAT} file")
        if meta.get("base_revision") != meta0.get("base_revision"):
            raise ValueError(f"{p} was trained against another base than {files[0]}")
        if {k: v[1] for k, v in tensors.items()} != {k: v[1] for k, v in tensors0.items()}:
            raise ValueError(f"{p} does not have the tensors of {files[0]}")
    if reference is not None:
        _, ref_tensors = _header(os.fspath(reference))
        if {k: v[1] for k, v in ref_tensors.items()} != {k: v[1] for k, v in tensors0.items()}:
            raise ValueError("the reference expert does not have the tensors of the inputs")
    out_dtype_name = dtype or meta0.get("dtype", "float32")
    if out_dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    out_dtype = DTYPES[out_dtype_name]
    given = normalise_weights(weights, len(files))  # in the caller's order, for metadata
    order = _canonical_order(given, [_data_prefix(p) for p in files])
    files, w = [files[i] for i in order], given[order]
    merged_params = {**m.params, **params}
    metadata = {
        **{
            k: v
            for k, v in meta0.items()
            if k in ("format", "base_revision", "layers", "n_modules")
        },
        "dtype": out_dtype_name,
        "merge": json.dumps(
            {"method": m.name, "weights": given.tolist(), "params": merged_params}, sort_keys=True
        ),
        **(extra_metadata or {}),
    }
    names = sorted(tensors0)
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        shape = tensors0[name][1]
        nbytes = math.prod(shape) * itemsize
        entries[name] = {
            "dtype": _ST_DTYPE[out_dtype],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned

    def write(tmp: str) -> None:
        handles = [safe_open(p, framework="pt") for p in files]
        ref_handle = safe_open(os.fspath(reference), framework="pt") if reference else None
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name in names:
                shape = tensors0[name][1]
                if m.elementwise and len(shape) >= 1:
                    rows = max(1, _BLOCK_BYTES // max(1, 4 * math.prod(shape[1:])))
                    for r0 in range(0, shape[0], rows):
                        r1 = min(shape[0], r0 + rows)
                        parts = [h.get_slice(name)[r0:r1] for h in handles]
                        ref = ref_handle.get_slice(name)[r0:r1] if ref_handle else None
                        _write_tensor(f, m(parts, w, ref, **params).to(out_dtype))
                else:
                    parts = [h.get_tensor(name) for h in handles]
                    ref = ref_handle.get_tensor(name) if ref_handle else None
                    _write_tensor(f, m(parts, w, ref, **params).to(out_dtype))
                    del parts, ref

    _atomic_write(Path(out), write)
    return metadata


def _write_tensor(f: Any, t: torch.Tensor) -> None:
    t = t.contiguous()
    # Raw little-endian bytes (the safetensors layout) without a Python-level copy.
    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
