"""Expert insertion, freezing, removal, extraction and expert files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelcore.config import ModelConfig
from modelcore.experts import (
    add_modules,
    calibrate_router_rows,
    expert_schema,
    extract_expert,
    freeze_for_insertion,
    load_expert,
    remove_modules,
    router_rows,
    save_expert,
)
from modelcore.losses import lm_loss, routing_reg
from modelcore.model import ModularLM

REV = "ab" * 32


def _model(seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    return ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=97)).eval()


def test_removing_an_inserted_module_restores_the_logits_exactly() -> None:
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids).logits
    new = add_modules(model)
    assert new == [8, 8]
    assert model.n_modules == [9, 9]
    # Give the new module a router row that wins, so the logits really change.
    for ffn in model.ffn_layers:
        ffn.router.rows[-1].data.mul_(0).add_(ffn.router.rows[0].data.sum(0))
    assert not torch.equal(model(ids).logits, before)
    remove_modules(model, new)
    assert model.n_modules == [8, 8]
    assert torch.equal(model(ids).logits, before)


def test_insertion_training_changes_only_the_new_modules() -> None:
    model = _model(1).train()
    new = add_modules(model)
    params = freeze_for_insertion(model, new)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert len(params) == 3 * len(new)
    new_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (4, 16))
    for _ in range(3):
        out = model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:]) + 0.1 * routing_reg(router_rows(model, new))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in old:
            assert torch.equal(p, old[name]), name
    assert any(not torch.equal(p, b) for p, b in zip(params, new_before, strict=True))
    with pytest.raises(ValueError, match="base module"):
        freeze_for_insertion(model, [0, 0])


def test_extract_then_add_reproduces_the_module() -> None:
    model = _model(2)
    tensors = extract_expert(model, [3, 5])
    names = {t["name"] for t in expert_schema(model.config)["tensors"]}
    assert set(tensors) == names
    idx = add_modules(model, tensors)
    for layer, (src, dst) in enumerate([(3, idx[0]), (5, idx[1])]):
        w_in, w_out = model.ffn_layers[layer].weights()
        rows = model.ffn_layers[layer].router.expert_rows()
        assert torch.equal(w_in[src], w_in[dst])
        assert torch.equal(w_out[src], w_out[dst])
        assert torch.equal(rows[src], rows[dst])


def test_expert_file_round_trip_and_metadata(tmp_path: Path) -> None:
    model = _model(3)
    tensors = extract_expert(model, [1, -1])  # covers layer 0 only
    path = tmp_path / "e.safetensors"
    save_expert(path, tensors, base_revision=REV)
    loaded, meta = load_expert(path, config=model.config)
    assert meta == {
        "format": "agora.expert/1",
        "base_revision": REV,
        "layers": "[0]",
        "n_modules": "1",
        "dtype": "float32",
    }
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    schema = expert_schema(model.config, layers=json.loads(meta["layers"]))
    assert {t["name"]: t["shape"] for t in schema["tensors"]} == {
        k: list(v.shape) for k, v in loaded.items()
    }
    save_expert(path, tensors, base_revision=REV, dtype="bfloat16")
    loaded, meta = load_expert(path, config=model.config)
    assert meta["dtype"] == "bfloat16"
    assert loaded["layers.0.modules.0.w_in"].dtype == torch.bfloat16


def test_bad_expert_files_are_refused(tmp_path: Path) -> None:
    model = _model(4)
    tensors = extract_expert(model, [0, 0])
    path = tmp_path / "bad.safetensors"
    wrong = dict(tensors)
    wrong["layers.0.modules.0.w_in"] = torch.zeros(3, 3)
    save_expert(path, wrong, base_revision=REV)
    with pytest.raises(ValueError, match="shape"):
        load_expert(path, config=model.config)
    save_file(tensors, str(path), metadata={"format": "something/else"})
    with pytest.raises(ValueError, match="format"):
        load_expert(path)
    with pytest.raises(ValueError):
        save_expert(path, tensors, base_revision="not-a-digest")
    with pytest.raises(ValueError):
        add_modules(model, {k: v for k, v in tensors.items() if "w_out" not in k})
    # A failed save leaves the previous file intact (written atomically).
    save_expert(path, tensors, base_revision=REV)
    with pytest.raises(ValueError):
        save_expert(path, {"layers.0.modules.1.w_in": torch.zeros(1)}, base_revision=REV)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)


def test_calibrated_router_rows_send_the_domain_to_the_new_module() -> None:
    model = _model(5)
    new = add_modules(model)
    domain = [torch.randint(0, 40, (4, 16)) for _ in range(2)]

    def share() -> list[float]:
        out = model(domain[0])
        return [
            (r.topk_idx_TK == j).float().mean().item()
            for r, j in zip(out.routing, new, strict=True)
        ]

    before = share()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibrate_router_rows(model, new, domain)
    after = share()
    assert all(a > 0.15 for a in after), (before, after)
    assert all(a > b for a, b in zip(after, before, strict=True))
    # Only the new router rows moved; the new modules are active again.
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, reference[n])}
    assert changed == {f"layers.{i}.ffn.router.rows.1" for i in range(2)}
    assert all(bool(a.all()) for a in model.active_modules)
