"""Experts of some MoE layers only (docs/composition.md, "Experts in some layers only"):
insertion, every composition method and training, on random tiny models (no training of
a base: a few seconds in all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelcore import experts as ops
from modelcore.compose import merge
from modelcore.compose.distill import DistillSettings, distill
from modelcore.compose.ensemble import ExpertEnsemble
from modelcore.compose.mixture import mixture
from modelcore.config import ModelConfig
from modelcore.model import ModularLM
from modelcore.train import train_expert

VOCAB = 97
REVISION = "0" * 64


def _model(seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=VOCAB, max_seq_len=32, n_layers=3)
    return ModularLM(cfg)


def _expert(model: ModularLM, seed: int, layers: list[int] | None = None) -> dict:
    """A random expert that matters (large output weights, a random router row and bias)
    in ``layers`` (None: all)."""
    g = torch.Generator().manual_seed(seed)
    idx = ops.add_modules(model, generator=g, layers=layers)
    for i, j in enumerate(idx):
        if j < 0:
            continue
        ffn = model.ffn_layers[i]
        b = ffn.block_of(j)
        with torch.no_grad():
            ffn.router.rows[b].copy_(torch.randn(ffn.router.rows[b].shape, generator=g))
            ffn.w_out[b].mul_(30)
            ffn.router.bias_of_block(b).fill_(float(torch.randn((), generator=g)))
    tensors = ops.extract_expert(model, idx)
    ops.remove_modules(model, idx)
    return tensors


def _ids(seed: int = 0, length: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _ffn_io(model: ModularLM, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE layer's (input, output) in a forward over ``ids``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        ffn.register_forward_hook(lambda _m, inp, out: seen.append((inp[0], out)))
        for ffn in model.ffn_layers
    ]
    try:
        with torch.no_grad():
            model(ids, aux="none")
    finally:
        for h in hooks:
            h.remove()
    return [(x, y if isinstance(y, torch.Tensor) else y[0]) for x, y in seen]


def _layer(name: str) -> int:
    return int(name.split(".")[1])


# -- insertion --------------------------------------------------------------------------------
def test_a_subset_expert_changes_only_its_layers_and_removal_restores_the_base():
    model = _model()
    sub = _expert(model, 1, layers=[1])
    assert ops.covered_layers(sub) == [1]
    ids = _ids()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(ids, aux="none").logits
    base_io = _ffn_io(model, ids)
    E = model.config.ffn_experts
    with mixture(model, [sub]) as added:
        assert added == [[-1, E, -1]]
        assert model.n_modules == [E, E + 1, E]
        io = _ffn_io(model, ids)
        logits = model(ids, aux="none").logits
        # Layer 0 runs before the expert: bit for bit the base's.
        assert torch.equal(io[0][1], base_io[0][1])
        # Layer 1 holds it and changes ...
        assert not torch.allclose(io[1][1], base_io[1][1], atol=1e-4)
        x2, y2 = io[2]
    assert not torch.allclose(logits, base_logits, atol=1e-4)
    # ... layer 2 does not hold it: on the input it saw, it computed what the base's does.
    with torch.no_grad():
        assert torch.equal(model.ffn_layers[2](x2)[0], y2)
    assert torch.equal(model(ids, aux="none").logits, base_logits)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_mixture_of_experts_with_different_layers_is_removed_exactly():
    """X covers layer 0, F all three, Z layer 1: Z's module sits above F's in layer 1
    while F's index is the higher in layer 0, so no one removal order per expert fits
    every layer (removal goes layer by layer)."""
    model = _model()
    x, f, z = _expert(model, 1, [0]), _expert(model, 2), _expert(model, 3, [1])
    ids = _ids()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(ids, aux="none").logits
    E = model.config.ffn_experts
    with mixture(model, [x, f, z]) as added:
        assert added == [[E, -1, -1], [E + 1, E, E], [-1, E + 1, -1]]
        assert model.n_modules == [E + 2, E + 2, E + 1]
        mixed = model(ids, aux="none").logits
        # Only F is in layer 2: its module there is F's.
        w_in, _ = model.ffn_layers[2].weights()
        assert torch.equal(w_in[E], f["layers.2.modules.0.w_in"])
    assert not torch.allclose(mixed, base_logits, atol=1e-4)
    assert torch.equal(model(ids, aux="none").logits, base_logits)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- ensemble ---------------------------------------------------------------------------------
def test_each_ensemble_path_is_the_base_with_its_expert_in_its_layers_only():
    model = _model()
    sub, full = _expert(model, 1, [1]), _expert(model, 2)
    ids = _ids()
    ens = ExpertEnsemble(model, [sub, full])
    assert ens.layers == [0, 1, 2]
    assert ExpertEnsemble(model, [sub]).layers == [1]
    with torch.no_grad():
        h = ens.hidden(ids)
        for j, e in enumerate([sub, full]):
            # A path inserts the module without its lane bias (the ensemble's default).
            unbiased = {n: t * 0 if n.endswith("router_bias") else t for n, t in e.items()}
            with mixture(model, [unbiased]):
                want = model(ids, aux="none").logits
            torch.testing.assert_close(model.lm_head(h[j]), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model.lm_head(h[2]), model(ids, aux="none").logits, rtol=1e-5, atol=1e-5
        )
        # The subset path really differs from the base and from the full expert's path.
        assert (model.lm_head(h[0]) - model.lm_head(h[2])).abs().max() > 1e-3
        assert (model.lm_head(h[0]) - model.lm_head(h[1])).abs().max() > 1e-3


# -- averaging --------------------------------------------------------------------------------
def test_average_renormalises_the_weights_over_the_experts_of_each_layer():
    model = _model()
    s = _expert(model, 1, [1])  # layer 1
    t = _expert(model, 2, [1, 2])  # layers 1, 2
    f = _expert(model, 3)  # every layer
    merged = merge.merge_tensors([s, t, f], "weighted", weights=[1.0, 2.0, 4.0])
    assert ops.covered_layers(merged) == [0, 1, 2]  # the union
    for name, got in merged.items():
        layer, kind = _layer(name), name.rsplit(".", 1)[1]
        key = f"layers.{layer}.modules.0.{kind}"
        if layer == 0:  # F alone: its weight renormalised over F is 1, bit for bit F
            assert torch.equal(got, f[key]), name
        elif layer == 1:  # all three: 1 : 2 : 4
            torch.testing.assert_close(got, (s[key] + 2 * t[key] + 4 * f[key]) / 7)
        else:  # T and F: the given ratio 2 : 4, renormalised to 1/3, 2/3
            torch.testing.assert_close(got, (2 * t[key] + 4 * f[key]) / 6)
    uniform = merge.merge_tensors([s, f])
    torch.testing.assert_close(
        uniform["layers.1.modules.0.w_in"],
        (s["layers.1.modules.0.w_in"] + f["layers.1.modules.0.w_in"]) / 2,
    )
    assert torch.equal(uniform["layers.2.modules.0.w_in"], f["layers.2.modules.0.w_in"])
    # TIES at density 1 keeps every value: a layer of one expert is that expert's.
    ties = merge.merge_tensors([s, f], "ties", density=1.0)
    torch.testing.assert_close(ties["layers.0.modules.0.w_out"], f["layers.0.modules.0.w_out"])
    trimmed = merge.merge_tensors([s, f], "ties", density=0.2)
    assert ops.covered_layers(trimmed) == [0, 1, 2]
    # A layer only experts of weight 0 cover is left out of the merged expert.
    only_s = merge.merge_tensors([s, t], "weighted", weights=[1.0, 0.0])
    assert ops.covered_layers(only_s) == [1]
    assert all(torch.equal(v, s[k]) for k, v in only_s.items())
    with pytest.raises(ValueError, match="reference expert does not have"):
        merge.merge_tensors([s, f], "ties", reference=s)


def test_streamed_average_of_subset_experts_equals_the_in_memory_one(tmp_path: Path):
    from registry.validation import validate_expert

    model = _model()
    s, f = _expert(model, 1, [1]), _expert(model, 2)
    paths = []
    for name, tensors in (("s", s), ("f", f)):
        paths.append(tmp_path / f"{name}.safetensors")
        ops.save_expert(paths[-1], tensors, base_revision=REVISION)
    out = tmp_path / "merged.safetensors"
    meta = merge.merge_files(paths, out, "weighted", weights=[1.0, 3.0])
    assert json.loads(meta["layers"]) == [0, 1, 2]
    record = json.loads(meta["merge"])
    assert record["layer_weights"] == {"0": [0.0, 1.0], "1": [0.25, 0.75], "2": [0.0, 1.0]}
    streamed, file_meta = ops.load_expert(out, config=model.config)
    assert file_meta["layers"] == meta["layers"]
    in_memory = merge.merge_tensors([s, f], "weighted", weights=[1.0, 3.0])
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    # The experts in the other order (with their weights): the same tensor bytes (the
    # metadata records the weights in the order given).
    again = tmp_path / "again.safetensors"
    merge.merge_files(paths[::-1], again, "weighted", weights=[3.0, 1.0])
    assert _data(again) == _data(out)
    ties = tmp_path / "ties.safetensors"
    merge.merge_files(paths, ties, "ties", density=0.5)
    assert ops.covered_layers(ops.load_expert(ties, config=model.config)[0]) == [0, 1, 2]
    # The registry accepts the merged expert against the base's schema, and the subset.
    schema = ops.expert_schema(model.config)
    for path in (out, ties, paths[0]):
        info = validate_expert(path, expert_schema=schema, base_revision=REVISION)
        assert list(info.layers) == ops.covered_layers(ops.load_expert(path)[0])


def _data(path: Path) -> bytes:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n :]


# -- distillation -----------------------------------------------------------------------------
def test_distilled_student_covers_the_layers_of_its_teachers():
    model = _model()
    s, t, f = _expert(model, 1, [1]), _expert(model, 2, [1, 2]), _expert(model, 3)
    settings = DistillSettings(steps=2, lr=1e-2, seed=0)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, VOCAB, (2, 17), generator=g)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for teachers, layers in (([s, t], [1, 2]), ([s, f], [0, 1, 2])):
        teacher = ExpertEnsemble(model, teachers)
        prior = torch.full((teacher.n_paths,), 1.0 / teacher.n_paths).log()
        result = distill(model, teacher, batches, prior, settings)
        assert [i for i, j in enumerate(result.module_idx) if j >= 0] == layers
        assert ops.covered_layers(result.expert_tensors()) == layers
        assert len(result.kl) == 2
        assert all(k > 0 for k in result.kl)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- training ---------------------------------------------------------------------------------
def _counting(seed: int = 0):
    """Rows count up mod VOCAB from a random start: a learnable stream."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        yield (start + torch.arange(17)) % VOCAB


def test_training_some_layers_trains_and_stores_a_share_of_the_parameters(tmp_path: Path):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full = train_expert(model, _counting(), 3, 1e-2, progress=False)
    ops.remove_modules(model, full.module_idx)
    sub = train_expert(model, _counting(), 3, 1e-2, progress=False, layers=[2])
    E = model.config.ffn_experts
    assert sub.module_idx == [-1, -1, E]
    assert model.n_modules == [E, E, E + 1]
    ops.remove_modules(model, sub.module_idx)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sub.layers == [2]
    assert full.layers == [0, 1, 2]
    assert ops.covered_layers(sub.tensors) == [2]
    assert len(sub.result.losses) == 3
    # One layer of three: a third of the trained parameters and of the file's data.
    assert full.trainable_parameters == 3 * sub.trainable_parameters > 0
    paths = {}
    for name, trained in (("full", full), ("sub", sub)):
        paths[name] = tmp_path / f"{name}.safetensors"
        ops.save_expert(paths[name], trained.tensors, base_revision=REVISION)
    assert len(_data(paths["full"])) == 3 * len(_data(paths["sub"]))
    assert paths["sub"].stat().st_size < 0.4 * paths["full"].stat().st_size
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        train_expert(model, _counting(), 1, progress=False, layers=[1, 3])
    assert model.n_modules == [E, E, E]


def test_initialising_from_an_expert_of_other_layers():
    """The new expert covers ``layers``: a layer the init expert covers starts from it,
    another starts fresh, and the init expert's other layers are not used."""
    model = _model()
    first = train_expert(model, _counting(1), 3, 1e-2, progress=False, layers=[2])
    ops.remove_modules(model, first.module_idx)
    warm = train_expert(
        model, _counting(2), 1, 1e-9, progress=False, init_from=first.tensors, layers=[1, 2]
    )
    ops.remove_modules(model, warm.module_idx)
    assert warm.layers == [1, 2]
    for kind in ("w_in", "w_out", "router_row"):
        name = f"layers.2.modules.0.{kind}"
        torch.testing.assert_close(warm.tensors[name], first.tensors[name], atol=1e-6, rtol=0)
    # Without layers it covers what the init expert covers, as before.
    same = train_expert(model, _counting(2), 1, 1e-9, progress=False, init_from=first.tensors)
    ops.remove_modules(model, same.module_idx)
    assert same.layers == [2]
    # An init expert of other layers only: every module fresh, in the layers asked for.
    other = train_expert(
        model, _counting(2), 1, 1e-9, progress=False, init_from=first.tensors, layers=[0]
    )
    ops.remove_modules(model, other.module_idx)
    assert other.layers == [0]
