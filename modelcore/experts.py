"""Experts: FFN modules that plug into a frozen base, and their safetensors files.

Shape legend: L layers, D model dim, F module hidden dim, R router hidden dim.

An expert holds, for each covered MoE layer ``i`` and each of its modules ``j`` (usually
one), the module's FFN weights and its router row (ModuleFormer section 4.3: the new
module's expert embedding)::

    layers.{i}.modules.{j}.w_in        (D, F)
    layers.{i}.modules.{j}.w_out       (F, D)
    layers.{i}.modules.{j}.router_row  (R,)
    layers.{i}.modules.{j}.router_bias (1,)

The router bias is calibrated after training (``calibrate_router_bias``) so that the
module fires on its domain and enters the top-k of at most a stated share of general
text's tokens; files written before it existed have none, and load with bias 0.

``expert_schema(config)`` is the one place those names and shapes come from; the base
bundle's config.json carries it so the registry can check expert files without torch.

Insertion (ModuleFormer section 4.3, DEMix/BTM): ``add_modules`` appends one module per
layer as a block of its own, ``freeze_for_insertion`` leaves ``requires_grad`` only on
those blocks (old modules, the router's input projection, attention and embeddings are
frozen, so an optimizer over ``requires_grad`` parameters never touches them), and
``remove_modules`` is the exact inverse of ``add_modules``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modelcore.config import ModelConfig

EXPERT_FORMAT = "agora.expert/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME = re.compile(r"^layers\.(\d+)\.modules\.(\d+)\.(w_in|w_out|router_row|router_bias)$")
# Tensors an expert file may lack (written before they existed); their value when absent.
OPTIONAL_TENSORS = {"router_bias": 0.0}


def module_tensor_shapes(config: ModelConfig) -> dict[str, list[int]]:
    D, F_, R = config.d_model, config.d_ffn, config.router_hidden
    return {"w_in": [D, F_], "w_out": [F_, D], "router_row": [R], "router_bias": [1]}


def expert_schema(
    config: ModelConfig,
    dtypes: Sequence[str] = ("float32", "bfloat16", "float16"),
    *,
    layers: Iterable[int] | None = None,
    n_modules: int = 1,
) -> dict[str, Any]:
    """Names and shapes of an expert's tensors: one module per MoE layer by default."""
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unsupported dtypes {bad}; known: {sorted(DTYPES)}")
    covered = list(range(config.n_layers)) if layers is None else sorted(set(layers))
    if not covered or any(not 0 <= i < config.n_layers for i in covered):
        raise ValueError(f"layers must be a non-empty subset of 0..{config.n_layers - 1}")
    shapes = module_tensor_shapes(config)
    tensors = [
        {"name": f"layers.{i}.modules.{j}.{kind}", "shape": shape}
        for i in covered
        for j in range(n_modules)
        for kind, shape in shapes.items()
    ]
    return {"format": EXPERT_FORMAT, "dtypes": list(dtypes), "tensors": tensors}


def _check_against_schema(tensors: Mapping[str, torch.Tensor], schema: dict[str, Any]) -> None:
    expected = {t["name"]: list(t["shape"]) for t in schema["tensors"]}
    optional = {n for n in expected if n.rsplit(".", 1)[-1] in OPTIONAL_TENSORS}
    expected = {n: s for n, s in expected.items() if n in tensors or n not in optional}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"expert tensors do not match the schema: missing {missing}, extra {extra}"
        )
    for name, shape in expected.items():
        if list(tensors[name].shape) != shape:
            raise ValueError(f"{name}: shape {list(tensors[name].shape)} != schema {shape}")


def check_expert(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> list[int]:
    """Check an expert's names and shapes against ``config``'s schema (optional tensors
    may be absent); returns the layers it covers. ``ValueError`` says what differs."""
    layers = covered_layers(tensors)
    _check_against_schema(tensors, expert_schema(config, layers=layers))
    return layers


def covered_layers(tensors: Mapping[str, Any]) -> list[int]:
    layers: set[int] = set()
    for name in tensors:
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"not an expert tensor name: {name!r}")
        layers.add(int(m.group(1)))
    return sorted(layers)


def check_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """``layers`` as a sorted list of distinct MoE layer indices of a base with
    ``n_layers`` layers; ``ValueError`` names a layer the base does not have."""
    out = sorted({int(i) for i in layers})
    if not out:
        raise ValueError("layers must name at least one MoE layer")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"layer {bad[0]} does not exist: the base has MoE layers 0..{n_layers - 1}"
        )
    return out


# -- operations on a model ------------------------------------------------------------------
def _layer_indices(model: Any, idx_per_layer: Sequence[int]) -> list[tuple[int, int]]:
    if len(idx_per_layer) != len(model.ffn_layers):
        raise ValueError(f"need one index per MoE layer ({len(model.ffn_layers)})")
    return [(i, int(j)) for i, j in enumerate(idx_per_layer) if int(j) >= 0]


def add_modules(
    model: Any,
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
    layers: Iterable[int] | None = None,
) -> list[int]:
    """Append one module to MoE layers (fresh, or from an expert's tensors).

    ``layers``: the layers that get a module; by default every layer without ``tensors``
    and the layers the expert covers with them. A layer in ``layers`` that ``tensors``
    does not cover gets a fresh module; a layer ``tensors`` covers outside ``layers``
    gets none. Returns the new module's index per layer, -1 for a layer left untouched.
    A fresh module is initialised like the base's modules; its router row is the mean of
    the layer's active rows, so it starts with an average logit instead of a random one.
    """
    config: ModelConfig = model.config
    given: set[int] = set()
    if tensors is not None:
        given = set(covered_layers(tensors))
        _check_against_schema(tensors, expert_schema(config, layers=sorted(given)))
    if layers is not None:
        layers = check_layers(layers, config.n_layers)
    elif tensors is not None:
        layers = sorted(given)
    else:
        layers = list(range(config.n_layers))
    std = config.init_std
    out_std = std / math.sqrt(2 * config.n_layers)
    shapes = module_tensor_shapes(config)
    new_idx = [-1] * config.n_layers
    for i in layers:
        ffn = model.ffn_layers[i]
        bias: float | torch.Tensor = 0.0
        if tensors is not None and i in given:
            pre = f"layers.{i}.modules.0."
            w_in, w_out, row = (tensors[pre + k] for k in ("w_in", "w_out", "router_row"))
            bias = tensors.get(pre + "router_bias", OPTIONAL_TENSORS["router_bias"])
        else:
            dev = ffn.w_in[0].device
            w_in = torch.randn(*shapes["w_in"], generator=generator).to(dev) * std
            w_out = torch.randn(*shapes["w_out"], generator=generator).to(dev) * out_std
            with torch.no_grad():
                row = ffn.router.expert_rows()[ffn.active_E].mean(0)
        new_idx[i] = ffn.append_module(w_in, w_out, row, bias)
    return new_idx


@torch.no_grad()
def calibrate_router_rows(
    model: Any,
    new_idx_per_layer: Sequence[int],
    batches: Iterable[torch.Tensor],
    *,
    max_batches: int = 4,
) -> None:
    """Point each new module's router row at the domain's tokens before training it.

    A module only gets gradient when top-k picks it, and a fresh row (the mean of the
    old ones) gives an average logit that top-k rarely picks: on a tiny base trained on
    one synthetic domain, 0.2-0.3% of a second domain's tokens reached the fresh module
    and 60 insertion steps left that domain at 5.30 nats; calibrated, 26-31% of its tokens
    started on the new module and the same 60 steps reached 3.83. So the new row is set to the
    direction of the mean router feature ``mean_t tanh(W x_t + b)`` of the domain's tokens
    (as the base computes them, with the new modules switched off), scaled so that its
    median logit equals the median logit a token needs to enter the top-k: about half
    of the domain's tokens start out routed to the new module, and training (with the
    routing regularisation, if any) decides from there.
    """
    pairs = _layer_indices(model, new_idx_per_layer)
    feats: dict[int, list[torch.Tensor]] = {i: [] for i, _ in pairs}
    hooks = []
    saved = {}
    for i, j in pairs:
        ffn = model.ffn_layers[i]
        saved[i] = ffn.active_E.clone()
        off = saved[i].clone()
        off[j] = False
        ffn.set_active(off)

        def grab(mod: Any, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            feats[i].append(torch.tanh(mod.proj(args[0])).reshape(-1, mod.proj.out_features))

        hooks.append(ffn.router.register_forward_pre_hook(grab))
    was_training = model.training
    model.eval()
    try:
        for b, ids in enumerate(batches):
            if b >= max_batches:
                break
            model(ids.to(next(model.parameters()).device), aux="none")
    finally:
        for h in hooks:
            h.remove()
        for i, _ in pairs:
            model.ffn_layers[i].set_active(saved[i])
        model.train(was_training)
    for i, j in pairs:
        if not feats[i]:
            raise ValueError("no batches to calibrate the router rows on")
        ffn = model.ffn_layers[i]
        h_TR = torch.cat(feats[i]).float()
        rows_ER = ffn.router.expert_rows().float()
        old = saved[i].clone()
        old[j] = False
        logits_TE = h_TR @ rows_ER[old].T
        k = min(ffn.top_k, int(old.sum()))
        enter_T = logits_TE.topk(k, dim=-1).values[:, -1]
        u_R = torch.nn.functional.normalize(h_TR.mean(0), dim=0)
        proj_T = h_TR @ u_R
        need, have = float(enter_T.median()), float(proj_T.median())
        # A non-positive bar is cleared by any small positive logit along u.
        scale = need / have if need > 0 and have > 0 else 1e-3
        block = ffn.router.rows[ffn.block_of(j)]
        block.data.copy_((u_R * scale).to(block.dtype).reshape(block.shape))


def remove_modules(model: Any, idx_per_layer: Sequence[int]) -> None:
    """Remove module ``idx_per_layer[i]`` from layer i (-1: keep the layer as is).

    Later modules shift down by one, like list deletion: to take out several inserted
    experts, remove them last-inserted first (their indices stay valid that way).
    """
    for i, j in _layer_indices(model, idx_per_layer):
        model.ffn_layers[i].remove_module(j)


def extract_expert(model: Any, module_idx_per_layer: Sequence[int]) -> dict[str, torch.Tensor]:
    """Copy one module per layer (-1: layer not covered) out as expert tensors."""
    out: dict[str, torch.Tensor] = {}
    for i, j in _layer_indices(model, module_idx_per_layer):
        ffn = model.ffn_layers[i]
        if not 0 <= j < ffn.n_modules:
            raise IndexError(f"layer {i} has no module {j}")
        w_in_EDF, w_out_EFD = ffn.weights()
        pre = f"layers.{i}.modules.0."
        out[pre + "w_in"] = w_in_EDF[j].detach().clone().contiguous()
        out[pre + "w_out"] = w_out_EFD[j].detach().clone().contiguous()
        out[pre + "router_row"] = ffn.router.expert_rows()[j].detach().clone().contiguous()
        bias_E = ffn.router.expert_biases()
        bias = bias_E[j : j + 1] if bias_E is not None else ffn.router.rows[0].new_zeros(1)
        out[pre + "router_bias"] = bias.detach().clone().contiguous()
    if not out:
        raise ValueError("no layer selected")
    return out


def router_rows(model: Any, idx_per_layer: Sequence[int]) -> list[torch.Tensor]:
    """The router rows (with gradients) of the given modules, for ``losses.routing_reg``."""
    return [
        model.ffn_layers[i].router.expert_rows()[j] for i, j in _layer_indices(model, idx_per_layer)
    ]


def freeze_for_insertion(model: Any, new_idx_per_layer: Sequence[int]) -> list[torch.nn.Parameter]:
    """Only the new modules' weights and router rows keep gradients; returns those params."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[torch.nn.Parameter] = []
    for i, j in _layer_indices(model, new_idx_per_layer):
        ffn = model.ffn_layers[i]
        b = ffn.block_of(j)
        if b == 0 or int(ffn.w_in[b].shape[0]) != 1:
            raise ValueError(f"layer {i} module {j} is a base module, not an inserted one")
        for p in (ffn.w_in[b], ffn.w_out[b], ffn.router.rows[b]):
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


# -- files ----------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temporary sibling and rename, so a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp creates the file 0600; give the result the permissions a plain open() would
    # (0666 minus the umask), so an expert file can be shared like any other.
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_expert(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    base_revision: str,
    dtype: str = "float32",
) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if not re.fullmatch(r"[0-9a-f]{64}", base_revision):
        raise ValueError("base_revision must be a sha256 hex digest")
    layers = covered_layers(tensors)
    n_modules = {int(_NAME.match(n).group(2)) for n in tensors}  # type: ignore[union-attr]
    if n_modules != {0}:
        raise ValueError("an expert file holds exactly one module per layer (index 0)")
    metadata = {
        "format": EXPERT_FORMAT,
        "base_revision": base_revision,
        "layers": json.dumps(layers),
        "n_modules": "1",
        "dtype": dtype,
    }
    cast = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: write_canonical(tmp, cast, metadata=metadata))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_canonical(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str],
) -> None:
    """A safetensors file with a canonical header (sorted keys and metadata, no spaces).

    ``safetensors.save_file`` orders the metadata differently from one process to the
    next, so the same tensors could give different bytes (and digests); expert files are
    content addressed, so the same tensors must always give the very same file (a job
    re-run after a crash uploads what the first run did)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of float32, bfloat16, float16")
        raw = (t.view(torch.int16) if t.element_size() == 2 else t).numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def load_expert(
    path: str | os.PathLike[str], *, config: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an expert file (safetensors only). Checks its metadata, and its names and
    shapes against ``expert_schema(config)`` when the base config is given."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    if metadata.get("format") != EXPERT_FORMAT:
        raise ValueError(f"not an {EXPERT_FORMAT} file (format={metadata.get('format')!r})")
    for key in ("base_revision", "layers", "n_modules", "dtype"):
        if key not in metadata:
            raise ValueError(f"expert metadata lacks {key!r}")
    layers = json.loads(metadata["layers"])
    if layers != covered_layers(tensors):
        raise ValueError("metadata 'layers' does not match the tensors in the file")
    if config is not None:
        _check_against_schema(tensors, expert_schema(config, layers=layers))
    wrong = [k for k, v in tensors.items() if v.dtype != DTYPES.get(metadata["dtype"])]
    if wrong:
        raise ValueError(f"tensors {wrong} are not of the declared dtype {metadata['dtype']}")
    return tensors, metadata
