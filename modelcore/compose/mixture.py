"""Mixture: experts inserted into the base's MoE layers, routed token by token.

Shape legend: L MoE layers, P experts inserted.

Each expert adds one module (and its router row) to every layer it covers
(``experts.add_modules``) and nothing to the others: a layer an expert does not cover
computes what it would without that expert (docs/composition.md, "Experts in some
layers only"). The router then picks the top-k of the base's active modules and the
inserted ones for every token (ModuleFormer section 4.3; DEMix section 3 routes by
domain, ModuleFormer's router learns it). Removal is the exact inverse
(``experts.remove_modules``, last inserted first), so a base that had experts inserted
and removed computes bit for bit what it computed before, and forgetting a domain is
removing its expert.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from modelcore import experts as expert_ops


def insert_experts(
    model: nn.Module, experts: Sequence[Mapping[str, torch.Tensor]]
) -> list[list[int]]:
    """Insert every expert; returns, per expert, its module index in each layer (-1: not
    covered). Nothing stays inserted if one of them does not fit."""
    added: list[list[int]] = []
    try:
        for tensors in experts:
            added.append(expert_ops.add_modules(model, dict(tensors)))
    except BaseException:
        remove_experts(model, added)
        raise
    return added


def remove_experts(model: nn.Module, added: Sequence[Sequence[int]]) -> None:
    """Remove experts inserted by ``insert_experts`` (any subset of its result): layer by
    layer, highest module index first, so the recorded indices stay valid. (Per layer,
    not per expert: experts covering different layers can be ordered differently in two
    layers, docs/composition.md, "Experts in some layers only".)"""
    for layer in range(len(model.ffn_layers)):  # type: ignore[arg-type]
        for j in sorted((int(idx[layer]) for idx in added if idx[layer] >= 0), reverse=True):
            model.ffn_layers[layer].remove_module(j)  # type: ignore[index]


def remove_expert(model: nn.Module, added: list[list[int]], which: int) -> None:
    """Take expert ``which`` out of a mixture; the later experts' indices shift down, and
    ``added`` is updated to match (the entry of ``which`` is dropped)."""
    gone = added.pop(which)
    expert_ops.remove_modules(model, gone)
    for idx in added:
        for layer, j in enumerate(gone):
            if j >= 0 and idx[layer] > j:
                idx[layer] -= 1


@contextmanager
def mixture(
    model: nn.Module, experts: Sequence[Mapping[str, torch.Tensor]]
) -> Iterator[list[list[int]]]:
    """``with mixture(model, experts):`` the model routes over base + experts; on exit
    the base is restored exactly."""
    added = insert_experts(model, experts)
    try:
        yield added
    finally:
        remove_experts(model, added)
