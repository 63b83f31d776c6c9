"""The evaluation matrix: bits per byte of every expert and composition on every domain.

Returned as plain JSON-able data (``{"domains": [...], "rows": [...]}``), one row per
model: the base, base + each expert alone, and each composition of all experts, so a web
page or a plot reads it without knowing how it was made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelcore.compose.evaluate import METHODS, evaluate_composition
from modelcore.eval import evaluate


def evaluation_matrix(
    model: nn.Module,
    tokenizer: Any,
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    texts_by_domain: Mapping[str, Sequence[str]],
    *,
    methods: Sequence[str] = METHODS,
    seq_len: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    kw = {"seq_len": seq_len, "batch_size": batch_size}
    rows: list[dict[str, Any]] = []

    def row(name: str, method: str, names: list[str], results: Mapping[str, Any]) -> None:
        rows.append(
            {
                "name": name,
                "method": method,
                "experts": names,
                "bits_per_byte": {d: float(r["bits_per_byte"]) for d, r in results.items()},
            }
        )

    row("base", "base", [], evaluate(model, tokenizer, texts_by_domain, **kw))
    for name, tensors in experts.items():
        res = evaluate_composition(model, tokenizer, texts_by_domain, [tensors], "mixture", **kw)
        row(name, "expert", [name], res)
    if len(experts) > 1:
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"method must be one of {METHODS}, got {method!r}")
            res = evaluate_composition(
                model, tokenizer, texts_by_domain, list(experts.values()), method, **kw
            )
            row(method, method, list(experts), res)
    return {"domains": list(texts_by_domain), "rows": rows}
