"""Base model bundles: ``config.json``, ``tokenizer.json``, ``model.safetensors``.

``config.json`` is ``ModelConfig.to_dict()`` plus ``"expert_schema"``
(docs/architecture.md, "Artifacts": the names and shapes an expert for this base must have,
so the registry can check expert files without torch). The revision id is the sha256 of a
canonical manifest of the three files' digests (``compute_revision``), so the same bytes
always give the same revision and any change to any file gives a new one. Safetensors only:
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modelcore.config import ModelConfig
from modelcore.experts import expert_schema
from modelcore.model import ModularLM

BUNDLE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass
class BaseBundle:
    model: ModularLM
    tokenizer: Any  # tokenizers.Tokenizer
    config: ModelConfig
    revision: str


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_revision(directory: str | os.PathLike[str]) -> str:
    root = Path(directory)
    manifest = {name: _sha256_file(root / name) for name in BUNDLE_FILES}
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def config_document(config: ModelConfig) -> dict[str, Any]:
    return {**config.to_dict(), "expert_schema": expert_schema(config)}


def _config_bytes(config: ModelConfig) -> bytes:
    return (json.dumps(config_document(config), sort_keys=True, indent=2) + "\n").encode()


def save_base(out_dir: str | os.PathLike[str], model: ModularLM, tokenizer: Any) -> str:
    """Write the bundle and return its revision.

    The three files are written into a temporary sibling directory first and moved into
    place together, so an interrupted save leaves no half-written bundle behind.
    """
    out = Path(out_dir)
    config = model.base_config()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model only {config.vocab_size}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stage."))
    try:
        (stage / "config.json").write_bytes(_config_bytes(config))
        # tokenizers writes a canonical JSON (pretty=False keeps the bytes stable).
        (stage / "tokenizer.json").write_text(tokenizer.to_str(pretty=False), encoding="utf-8")
        tensors = {k: v.to("cpu") for k, v in model.consolidated_state_dict().items()}
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        out.mkdir(parents=True, exist_ok=True)
        # safetensors writes its file 0600; a bundle is meant to be shared, so every file
        # gets what a plain open() would give (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        for name in BUNDLE_FILES:
            os.chmod(stage / name, 0o666 & ~umask)
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return compute_revision(out)


def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    doc = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or "expert_schema" not in doc:
        raise ValueError("config.json is not an Agora base config (no expert_schema)")
    schema = doc.pop("expert_schema")
    config = ModelConfig.from_dict(doc)
    if schema != expert_schema(config):
        raise ValueError("config.json's expert_schema does not match its architecture")
    return config


def load_base(
    directory: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    kernels: str = "auto",
) -> BaseBundle:
    from tokenizers import Tokenizer

    root = Path(directory)
    missing = [n for n in BUNDLE_FILES if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"base bundle {root} lacks {missing}")
    revision = compute_revision(root)
    config = read_config(root)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    model = ModularLM(config, device=device, kernels=kernels)
    dev = next(model.parameters()).device
    state = load_file(str(root / "model.safetensors"), device=str(dev))
    model.load_state_dict(state, strict=True)
    return BaseBundle(model=model, tokenizer=tokenizer, config=config, revision=revision)
