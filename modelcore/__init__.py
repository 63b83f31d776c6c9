"""modelcore: the modular language model (ModuleFormer architecture), its losses, expert
operations (insertion, removal, pruning, EMoE) and artifacts (safetensors only).

Three layers: ``modelcore.kernels`` (grouped MoE matmul, stick-breaking attention; Triton
on CUDA, PyTorch references elsewhere) -> nn modules (``attention``, ``moe``, ``router``)
-> ``model.ModularLM``. Names are resolved lazily so ``import modelcore.data`` or
``modelcore.config`` does not pay for the whole package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "modelcore.config",
    "ModularLM": "modelcore.model",
    "ModelOutput": "modelcore.model",
    "LayerRouting": "modelcore.router",
    "expert_schema": "modelcore.experts",
    "add_modules": "modelcore.experts",
    "remove_modules": "modelcore.experts",
    "extract_expert": "modelcore.experts",
    "freeze_for_insertion": "modelcore.experts",
    "save_expert": "modelcore.experts",
    "load_expert": "modelcore.experts",
    "save_base": "modelcore.artifacts",
    "load_base": "modelcore.artifacts",
    "compute_revision": "modelcore.artifacts",
    "BaseBundle": "modelcore.artifacts",
}

__all__ = [
    "BaseBundle",
    "LayerRouting",
    "ModelConfig",
    "ModelOutput",
    "ModularLM",
    "add_modules",
    "compute_revision",
    "expert_schema",
    "extract_expert",
    "freeze_for_insertion",
    "load_base",
    "load_expert",
    "remove_modules",
    "save_base",
    "save_expert",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelcore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
