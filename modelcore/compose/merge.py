"""Parameter averaging of experts: uniform, weighted, TIES; streamed tensor by tensor.

Shape legend: P experts being merged, S elements of one tensor.

Each method is a small registered object with a name and the paper it follows (as in
mergekit): a pure function from the P input tensors of one name (and their weights) to
the merged tensor. ``merge_tensors`` applies a method to in-memory state dicts;
``merge_files`` streams from the experts' safetensors files. Uniform and weighted combine
row blocks of ~1 MiB per input, each read through a mapping of just that block's bytes
(no copy; ``pread`` into buffers where there is no mmap), while the block is in cache,
on a few threads (``modelcore.threads.run_blocks``), each block written with ``pwrite`` at its
offset behind a header computed up front. TIES reads one whole tensor per input, as its
trim needs. Neither the inputs nor the merged expert are ever whole in memory.

Uniform and weighted averaging are running means in float32 (exact for identical inputs,
see ``_linear``); TIES works in float64 and casts once at the end. Inputs are summed in a
canonical order (``_canonical_order``), so permuting the experts (with their weights)
gives the same bits.

Experts may cover different MoE layers (docs/composition.md, "Experts in some layers
only"). Each layer is merged over the experts that cover it, with their weights
renormalised over them (``_layer_plan``), so the ratios between those experts are the
ones given; a layer one expert covers is that expert's (for uniform and weighted, bit
for bit). The merged expert covers the union of the layers, less any layer whose
experts all have weight 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcore.experts import DTYPES, EXPERT_FORMAT, _atomic_write
from modelcore.threads import default_workers, run_blocks, single_thread

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
        *,
        out: torch.Tensor | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """``out``: a float32 buffer for the result, elementwise methods only."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"{self.name} takes no parameters {unknown}")
        if out is not None:
            if not self.elementwise:
                raise ValueError(f"{self.name} does not write into a given buffer")
            return self.fn(tensors, weights, reference, out=out, **{**self.params, **params})
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


def _linear(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    reference: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean as a running mean, ``m <- lerp(m, x_k, w_k / (w_1 + ... + w_k))``.

    One fused float32 op per input on a cache-resident block (a float64 sum ran at a
    quarter of that speed: mixed-dtype adds take TensorIterator's casting path), and exact
    where exactness is noticed: for identical inputs ``x_k - m`` is 0, so averaging n
    copies of an expert returns it bit for bit (a sum then a division by n does not:
    3 * x / 3 != x for some floats). Weights are already normalised; zeros are skipped.

    ``out``: a float32 buffer of the inputs' shape to hold the mean (the streamed merge
    reuses one per thread); the first step writes it as ``lerp(x_1, x_k, ...)`` instead
    of copying ``x_1`` first, with the same bits.
    """
    ws = weights.tolist()
    seen = float(ws[0])
    mean: torch.Tensor | None = None
    for t, w in zip(tensors[1:], ws[1:], strict=True):
        if w == 0.0:
            continue
        seen += w
        x = t if t.dtype == torch.float32 else t.to(torch.float32)
        if mean is None:
            start = tensors[0] if tensors[0].dtype == torch.float32 else tensors[0].float()
            if out is None:
                mean = torch.lerp(start, x, w / seen)
            else:
                mean = torch.lerp(start, x, w / seen, out=out)
        else:
            mean.lerp_(x, w / seen)
    if mean is None:  # one input, or every other weight zero
        if out is None:
            return tensors[0].to(torch.float32, copy=True)
        return out.copy_(tensors[0])
    return mean


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
            # The keep-th largest magnitude by selection in linear time (numpy's
            # introselect beat torch's kthvalue, docs/composition.md, "Averaging"; the
            # same value, selection being exact). Values tied with it are kept too.
            magnitude = tau.abs()
            kth = magnitude.numel() - keep
            threshold = float(np.partition(magnitude.reshape(-1).numpy(), kth)[kth])
            tau = torch.where(magnitude >= threshold, tau, 0.0)
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


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return None if m is None else int(m.group(1))


@dataclass(frozen=True)
class _Part:
    """One tensor of the merged expert: which inputs hold it and their weights there."""

    holders: list[int]  # indices into the (canonically ordered) inputs
    weights: torch.Tensor  # float64, summing to 1 over the holders


def _layer_plan(
    shapes: Sequence[Mapping[str, Sequence[int]]], w: torch.Tensor, labels: Sequence[str]
) -> tuple[dict[str, _Part], list[int]]:
    """Per tensor of the merged expert, the experts that cover its layer and their weights
    renormalised over them (all experts: ``w`` itself, so full experts merge as before);
    and the merged expert's layers. Within a layer every expert that covers it must hold
    the same names and shapes. A layer whose experts all have weight 0 is left out."""
    groups: list[dict[int | None, dict[str, list[int]]]] = []
    for tensors in shapes:
        by_layer: dict[int | None, dict[str, list[int]]] = {}
        for name, shape in tensors.items():
            by_layer.setdefault(_layer_of(name), {})[name] = list(shape)
        groups.append(by_layer)
    every = sorted({k for g in groups for k in g}, key=lambda k: -1 if k is None else k)
    plan: dict[str, _Part] = {}
    layers: list[int] = []
    for layer in every:
        holders = [e for e, g in enumerate(groups) if layer in g]
        first = groups[holders[0]][layer]
        for e in holders[1:]:
            if groups[e][layer] != first:
                where = "outside the layers" if layer is None else f"in layer {layer}"
                raise ValueError(
                    f"{labels[e]} does not have the tensors of {labels[holders[0]]} {where}"
                )
        if len(holders) == len(shapes):
            part_w = w
        else:
            sub = w[holders]
            total = float(sub.sum())
            if total <= 0:
                continue  # only experts of weight 0 cover it: nothing to average there
            part_w = sub / total
        for name in first:
            plan[name] = _Part(holders, part_w)
        if layer is not None:
            layers.append(layer)
    if not plan:
        raise ValueError("nothing to merge: every tensor has weight 0")
    return plan, layers


def _per_layer_weights(
    plan: Mapping[str, _Part], order: Sequence[int], n: int
) -> dict[str, list[float]] | None:
    """The weights each layer was averaged with, in the caller's order of the experts (0
    for an expert that does not cover it), when some layer is not covered by all."""
    if all(len(part.holders) == n for part in plan.values()):
        return None
    out: dict[str, list[float]] = {}
    for name, part in plan.items():
        layer = _layer_of(name)
        key = "none" if layer is None else str(layer)
        if key in out:
            continue
        given = [0.0] * n
        for holder, weight in zip(part.holders, part.weights.tolist(), strict=True):
            given[order[holder]] = weight
        out[key] = given
    return out


def merge_tensors(
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str = "uniform",
    *,
    weights: Sequence[float] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory experts into one, layer by layer over the experts that cover each
    layer (module docstring); output in the dtype of the first that holds a tensor."""
    m = get_method(method)
    if not experts:
        raise ValueError("nothing to merge")
    _check_weights_allowed(m, weights)
    w = normalise_weights(weights, len(experts))
    # The first 4 KiB of the tensors' raw bytes in name order: what ``_data_prefix`` reads
    # from a file (safetensors lays same-dtype tensors out by name), so a merge in memory
    # and one over files sum in the same order. Raw bytes, so bfloat16 (no numpy) works.
    keys = [_bytes_prefix([e[n] for n in sorted(e)]) for e in experts]
    order = _canonical_order(w, keys)
    experts = [experts[i] for i in order]
    w = w[order]
    labels = [f"expert {i}" for i in order]
    plan, _ = _layer_plan([{n: list(t.shape) for n, t in e.items()} for e in experts], w, labels)
    out = {}
    for name in sorted(plan):
        part = plan[name]
        ref = None
        if reference is not None:
            if name not in reference or list(reference[name].shape) != list(
                experts[part.holders[0]][name].shape
            ):
                raise ValueError(f"the reference expert does not have {name} as the inputs do")
            ref = reference[name]
        merged = m([experts[e][name] for e in part.holders], part.weights, ref, **params)
        out[name] = merged.to(experts[part.holders[0]][name].dtype)
    return out


# -- streaming over files -----------------------------------------------------------------
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# Elementwise merges read their inputs through file mappings (no copy) where the platform
# has them, else with pread into per-thread buffers.
_MAPPED = hasattr(mmap, "MAP_PRIVATE")
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0)
_MAP_PROT = getattr(mmap, "PROT_READ", 0) | getattr(mmap, "PROT_WRITE", 0)
_BLOCK_BYTES = 1 << 20  # rows per streamed block: ~1 MiB of each input, cache-resident


def _header(path: str) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    meta = doc.pop("__metadata__", {}) or {}
    return meta, {k: (v["dtype"], list(v["shape"])) for k, v in doc.items()}


def _bytes_prefix(tensors: Sequence[torch.Tensor], n: int = 4096) -> bytes:
    out = b""
    for t in tensors:
        if len(out) >= n:
            break
        flat = t.detach().reshape(-1)[: max(1, n // t.element_size())].cpu().contiguous()
        out += flat.view(torch.uint8).numpy().tobytes()
    return out[:n]


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

    The inputs must be experts of one base (same ``base_revision``; in each layer, the
    same names and shapes in every expert that covers it). Each layer is merged over the
    experts that cover it (module docstring). Returns the output's metadata (``layers``:
    the merged expert's, ``merge``: method, weights, params, and ``layer_weights`` when
    some layer was averaged over fewer than all the experts).
    """
    m = get_method(method)
    if not paths:
        raise ValueError("nothing to merge")
    _check_weights_allowed(m, weights)
    files = [os.fspath(p) for p in paths]
    headers = [_header(p) for p in files]
    meta0 = headers[0][0]
    for p, (meta, _tensors) in zip(files, headers, strict=True):
        if meta.get("format") != EXPERT_FORMAT:
            raise ValueError(f"{p} is not an {EXPERT_FORMAT} file")
        if meta.get("base_revision") != meta0.get("base_revision"):
            raise ValueError(f"{p} was trained against another base than {files[0]}")
    out_dtype_name = dtype or meta0.get("dtype", "float32")
    if out_dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    out_dtype = DTYPES[out_dtype_name]
    given = normalise_weights(weights, len(files))  # in the caller's order, for metadata
    order = _canonical_order(given, [_data_prefix(p) for p in files])
    files, w = [files[i] for i in order], given[order]
    shapes = [{k: v[1] for k, v in headers[i][1].items()} for i in order]
    plan, layers = _layer_plan(shapes, w, files)
    if reference is not None:
        _, ref_tensors = _header(os.fspath(reference))
        lacking = sorted(
            n
            for n, part in plan.items()
            if n not in ref_tensors or ref_tensors[n][1] != shapes[part.holders[0]][n]
        )
        if lacking:
            raise ValueError(
                f"the reference expert does not have the tensors of the inputs: {lacking[:4]}"
            )
    merged_params = {**m.params, **params}
    record: dict[str, Any] = {"method": m.name, "weights": given.tolist(), "params": merged_params}
    per_layer = _per_layer_weights(plan, order, len(files))
    if per_layer is not None:
        record["layer_weights"] = per_layer
    metadata = {
        **{k: v for k, v in meta0.items() if k in ("format", "base_revision", "n_modules")},
        "layers": _layers_metadata(meta0.get("layers"), layers),
        "dtype": out_dtype_name,
        "merge": json.dumps(record, sort_keys=True),
        **(extra_metadata or {}),
    }
    names = sorted(plan)
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        shape = shapes[plan[name].holders[0]][name]
        nbytes = math.prod(shape) * itemsize
        entries[name] = {
            "dtype": _ST_DTYPE[out_dtype],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned

    head = struct.pack("<Q", len(header)) + header

    def write(tmp: str) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(single_thread())
            inputs = [stack.enter_context(_ExpertReader(p)) for p in files]
            ref_in = stack.enter_context(_ExpertReader(os.fspath(reference))) if reference else None
            fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            stack.callback(os.close, fd)
            _pwrite_all(fd, head, 0)
            data_start = len(head)
            if m.elementwise:
                _merge_blocks(
                    m,
                    inputs,
                    fd,
                    ref_in=ref_in,
                    plan=plan,
                    params=params,
                    entries=entries,
                    names=names,
                    out_dtype=out_dtype,
                    data_start=data_start,
                )
                return
            for name in names:
                part = plan[name]
                parts = [inputs[e].read(name) for e in part.holders]
                ref = None if ref_in is None else ref_in.read(name)
                merged = m(parts, part.weights, ref, **params).to(out_dtype)
                _pwrite_all(fd, _bytes_of(merged), data_start + entries[name]["data_offsets"][0])
                del parts, ref, merged

    _atomic_write(Path(out), write)
    return metadata


def _layers_metadata(first: str | None, layers: Sequence[int]) -> str:
    """The merged expert's ``layers`` metadata: the first input's own string when it says
    the same (so merging full experts writes what it always did), else as ``save_expert``
    writes it."""
    if first is not None:
        try:
            if json.loads(first) == list(layers):
                return first
        except ValueError:
            pass
    return json.dumps(list(layers))


def _merge_blocks(
    m: MergeMethod,
    inputs: Sequence[_ExpertReader],
    fd: int,
    *,
    ref_in: _ExpertReader | None,
    plan: Mapping[str, _Part],
    params: Mapping[str, Any],
    entries: Mapping[str, Any],
    names: Sequence[str],
    out_dtype: torch.dtype,
    data_start: int,
) -> None:
    """An elementwise merge in row blocks of ~``_BLOCK_BYTES`` per input, on a few threads:
    each block is read from every input with ``pread`` into that thread's buffers (one
    kernel copy from the page cache), combined while in cache, and written with ``pwrite``
    at its place in the output (the header fixed every offset up front, so blocks need no
    order). Memory: one block per input and thread, never a whole tensor."""
    tasks: list[tuple[str, int, int]] = []
    step_bytes = step_elems = 0
    for name in names:
        n_rows, row_bytes = inputs[plan[name].holders[0]].rows(name)
        step = max(1, _BLOCK_BYTES // max(1, row_bytes))
        step_bytes = max(step_bytes, min(step, n_rows) * row_bytes)
        row_elems = math.prod(entries[name]["shape"][1:])
        step_elems = max(step_elems, min(step, n_rows) * row_elems)
        tasks += [(name, r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]
    out_item = torch.empty((), dtype=out_dtype).element_size()
    n_in = len(inputs) + (ref_in is not None)

    def buffers() -> tuple[list[torch.Tensor], torch.Tensor]:
        raw = [] if _MAPPED else [torch.empty(step_bytes, dtype=torch.uint8) for _ in range(n_in)]
        return raw, torch.empty(step_elems, dtype=torch.float32)

    def work(i: int, state: tuple[list[torch.Tensor], torch.Tensor]) -> None:
        name, r0, r1 = tasks[i]
        raw, mean = state
        part = plan[name]
        holders = [inputs[e] for e in part.holders]
        if _MAPPED:
            parts = [x.mapped(name, r0, r1) for x in holders]
            ref = None if ref_in is None else ref_in.mapped(name, r0, r1)
        else:
            parts = [x.read(name, r0, r1, into=raw[j]) for j, x in enumerate(holders)]
            ref = None if ref_in is None else ref_in.read(name, r0, r1, into=raw[-1])
        buf = mean[: parts[0].numel()].view(parts[0].shape)
        merged = m(parts, part.weights, ref, out=buf, **params).to(out_dtype)
        row_out = math.prod(parts[0].shape[1:]) * out_item
        offset = data_start + entries[name]["data_offsets"][0] + r0 * row_out
        _pwrite_all(fd, _bytes_of(merged), offset)

    run_blocks(len(tasks), work, buffers, default_workers())


def _bytes_of(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes (the safetensors layout) without a Python-level copy."""
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _ExpertReader:
    """Reads row blocks of an expert file's tensors with ``pread`` into a caller's
    buffer: one kernel copy from the page cache per block, no page faults on a mapping,
    and nothing of the file held beyond the block (or the one tensor TIES needs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _ExpertReader:
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            self.entries = json.loads(os.pread(self.fd, n, 8))
        except BaseException:
            os.close(self.fd)
            raise
        self.entries.pop("__metadata__", None)
        self.start = 8 + n
        # Every tensor's bytes must lie inside the file: a mapped block past its end would
        # fault (SIGBUS) instead of failing a read.
        size = os.fstat(self.fd).st_size
        for name, e in self.entries.items():
            lo, hi = e["data_offsets"]
            if not 0 <= lo <= hi or self.start + hi > size:
                os.close(self.fd)
                raise ValueError(f"{self.path} is truncated or corrupt at {name}")
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(
        self, name: str, r0: int = 0, r1: int | None = None, *, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``r0:r1`` of a tensor, read with ``pread`` (no shared file position, so
        threads may read at once) into ``into`` (a uint8 buffer) or a fresh tensor."""
        e = self.entries[name]
        dtype = {v: k for k, v in _ST_DTYPE.items()}.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {name} has dtype {e['dtype']}, not an expert dtype")
        shape = list(e["shape"])
        r1 = shape[0] if r1 is None else r1
        row = math.prod(shape[1:]) * _ITEMSIZE[dtype]
        n = (r1 - r0) * row
        raw = torch.empty(n, dtype=torch.uint8) if into is None else into[:n]
        view = memoryview(raw.numpy())
        offset = self.start + e["data_offsets"][0] + r0 * row
        while view.nbytes:
            got = os.preadv(self.fd, [view], offset)
            if got <= 0:
                raise ValueError(f"{self.path} is truncated")
            view, offset = view[got:], offset + got
        return raw.view(dtype).view(r1 - r0, *shape[1:])

    def mapped(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of a tensor as a view of the page cache (a mapping of just those
        bytes, unmapped when the view is dropped): no copy at all."""
        e = self.entries[name]
        dtype = {v: k for k, v in _ST_DTYPE.items()}.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {name} has dtype {e['dtype']}, not an expert dtype")
        shape = list(e["shape"])
        row = math.prod(shape[1:]) * _ITEMSIZE[dtype]
        n = (r1 - r0) * row
        begin = self.start + e["data_offsets"][0] + r0 * row
        if e["data_offsets"][0] + r1 * row > e["data_offsets"][1]:
            raise ValueError(f"{self.path}: {name} is shorter than its shape")
        if n == 0:
            return torch.empty(r1 - r0, *shape[1:], dtype=dtype)
        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        # A private writable mapping: torch gets a writable buffer (no read-only warning),
        # pages are the page cache's own until written, and nothing here writes them (a
        # write would touch a private copy only, never the file).
        mm = mmap.mmap(self.fd, begin + n - base, flags=_MAP_FLAGS, prot=_MAP_PROT, offset=base)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=begin - base)
        return raw.view(dtype).view(r1 - r0, *shape[1:])

    def rows(self, name: str) -> tuple[int, int]:
        """(rows, bytes per row) of a tensor."""
        e = self.entries[name]
        shape = e["shape"]
        dtype = {v: k for k, v in _ST_DTYPE.items()}.get(e["dtype"], torch.float32)
        return shape[0], math.prod(shape[1:]) * _ITEMSIZE[dtype]
