"""ComposedModel: a manifest and local files -> a model that scores and generates.

Random tiny bases are enough here (the claims are equalities between code paths, not
learning); the trained ones of conftest.py are for the learning tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import TEXTS, digest_of, make_tiny_base

from modelcore.artifacts import load_base
from modelcore.compose.composed import MANIFEST_FORMAT, ComposedModel
from modelcore.data.batches import eval_batches
from modelcore.experts import add_modules
from modelcore.model import ModularLM


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random tiny base bundle and two experts (made larger than their init so they
    visibly change the base's predictions)."""
    return make_tiny_base(tmp_path_factory.mktemp("composed"), n_experts=2)


def _ref(path: Path, name: str, weight: float | None = None) -> dict[str, Any]:
    return {
        "id": f"exp_{name.upper() * 26}"[:30],
        "version": 1,
        "digest": digest_of(path),
        "size": path.stat().st_size,
        "weight": weight,
    }


def _manifest(files: dict[str, Any], method: str, names: list[str], **extra: Any) -> dict:
    weights = extra.pop("weights", [None] * len(names))
    return {
        "format": MANIFEST_FORMAT,
        "id": "cmp_" + "A" * 26,
        "method": method,
        "base_revision": files["revision"],
        "experts": [_ref(files["experts"][n], n, w) for n, w in zip(names, weights, strict=True)],
        "params": {},
        "output": None,
        "metrics": None,
        **extra,
    }


def _bydigest_of(files: dict[str, Any]) -> dict[str, Path]:
    return {digest_of(p): p for p in files["experts"].values()}


def _ids(files: dict[str, Any]) -> torch.Tensor:
    batch = next(eval_batches(load_base(files["base"]).tokenizer, TEXTS, seq_len=24, batch_size=4))
    return batch.tokens[:, :-1]


def _base_with(files: dict[str, Any], names: list[str]) -> ModularLM:
    """The base with the named experts inserted by hand (no ComposedModel involved)."""
    from modelcore.experts import load_expert

    model = load_base(files["base"]).model.eval()
    for n in names:
        add_modules(model, load_expert(files["experts"][n])[0])
    return model


def test_mixture_of_one_expert_is_the_base_with_that_expert(files) -> None:
    composed = ComposedModel.from_manifest(
        _manifest(files, "mixture", ["a"]), files["base"], _bydigest_of(files)
    )
    ids = _ids(files)
    want = torch.log_softmax(_base_with(files, ["a"])(ids, aux="none").logits.float(), -1)
    torch.testing.assert_close(composed.log_probs(ids), want)
    # ... and not the bare base: the expert changes the predictions.
    bare = torch.log_softmax(load_base(files["base"]).model.eval()(ids, aux="none").logits, -1)
    assert (composed.log_probs(ids) - bare).abs().max() > 1e-3


def test_mixture_of_two_experts_matches_both_inserted(files) -> None:
    composed = ComposedModel.from_manifest(
        _manifest(files, "mixture", ["a", "b"]), files["base"], _bydigest_of(files)
    )
    ids = _ids(files)
    want = torch.log_softmax(_base_with(files, ["a", "b"])(ids, aux="none").logits.float(), -1)
    torch.testing.assert_close(composed.log_probs(ids), want)


@pytest.mark.parametrize("which", [0, 1])
def test_ensemble_with_one_hot_prior_is_that_expert(files, which: int) -> None:
    weights = [1.0 if i == which else 0.0 for i in range(2)]
    manifest = _manifest(files, "ensemble", ["a", "b"], weights=weights)
    composed = ComposedModel.from_manifest(manifest, files["base"], _bydigest_of(files))
    ids = _ids(files)
    name = ["a", "b"][which]
    want = torch.log_softmax(_base_with(files, [name])(ids, aux="none").logits.float(), -1)
    torch.testing.assert_close(composed.log_probs(ids), want, atol=1e-4, rtol=1e-4)


def test_ensemble_bits_per_byte_is_the_score_of_its_log_probs(files) -> None:
    """bits_per_byte (batched likelihoods + posterior) and log_probs (full mixed
    distribution) are two code paths for the same model: they must agree."""
    manifest = _manifest(files, "ensemble", ["a", "b"], weights=[0.7, 0.3])
    composed = ComposedModel.from_manifest(manifest, files["base"], _bydigest_of(files))
    got = composed.bits_per_byte(TEXTS, seq_len=24)
    nll, n_bytes = 0.0, 0
    for batch in eval_batches(composed.tokenizer, TEXTS, seq_len=24, batch_size=16):
        lp = composed.log_probs(batch.tokens[:, :-1])
        target = lp.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        nll -= float(target[batch.mask].double().sum())
        n_bytes += batch.n_bytes
    assert got["bytes"] == n_bytes == sum(len(t.encode()) for t in TEXTS)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    # The prior matters: the other prior scores the same text differently.
    flipped = _manifest(files, "ensemble", ["a", "b"], weights=[0.3, 0.7])
    other = ComposedModel.from_manifest(flipped, files["base"], _bydigest_of(files))
    assert other.bits_per_byte(TEXTS, seq_len=24)["bits_per_byte"] != got["bits_per_byte"]


def test_mixture_bits_per_byte_matches_modelcore_eval(files) -> None:
    from modelcore.eval import evaluate

    composed = ComposedModel.from_manifest(
        _manifest(files, "mixture", ["b"]), files["base"], _bydigest_of(files)
    )
    want = evaluate(_base_with(files, ["b"]), composed.tokenizer, {"t": TEXTS}, seq_len=24)["t"]
    got = composed.bits_per_byte(TEXTS, seq_len=24)
    assert got == {
        "bits_per_byte": want["bits_per_byte"],
        "tokens": want["tokens"],
        "bytes": want["bytes"],
    }


def test_average_manifest_loads_its_output_expert(files) -> None:
    out = files["experts"]["b"]
    manifest = _manifest(files, "average", ["a", "b"], output=_ref(out, "b"))
    # Only the output's file is needed: the inputs were folded into it.
    composed = ComposedModel.from_manifest(manifest, files["base"], {digest_of(out): out})
    ids = _ids(files)
    want = torch.log_softmax(_base_with(files, ["b"])(ids, aux="none").logits.float(), -1)
    torch.testing.assert_close(composed.log_probs(ids), want)


@pytest.mark.parametrize("method", ["mixture", "ensemble"])
def test_generate_is_greedy_and_deterministic_at_temperature_zero(files, method: str) -> None:
    from modelcore.data.tokenizer import decode, encode, eot_id

    composed = ComposedModel.from_manifest(
        _manifest(files, method, ["a", "b"], weights=[0.5, 0.5]), files["base"], _bydigest_of(files)
    )
    prompt = "def add(a, b):"
    first = composed.generate(prompt, max_new_tokens=6)
    assert composed.generate(prompt, max_new_tokens=6) == first
    # The same continuation by hand: argmax of log_probs over the tokenizer's vocabulary.
    tok = composed.tokenizer
    ids = [eot_id(tok), *encode(tok, prompt)]
    new: list[int] = []
    for _ in range(6):
        lp = composed.log_probs(torch.tensor([ids]))[0, -1, : tok.get_vocab_size()]
        lp[tok.token_to_id("<|pad|>")] = float("-inf")
        nxt = int(lp.argmax())
        if nxt == eot_id(tok):
            break
        ids.append(nxt)
        new.append(nxt)
    assert first == decode(tok, new)
    # Sampling is seeded: same seed, same text.
    a = composed.generate(prompt, 6, temperature=1.0, top_k=20, seed=3)
    assert composed.generate(prompt, 6, temperature=1.0, top_k=20, seed=3) == a


def test_release_restores_the_base_exactly(files) -> None:
    bundle = load_base(files["base"])
    ids = _ids(files)
    before = bundle.model.eval()(ids, aux="none").logits
    from modelcore.experts import load_expert

    experts = [load_expert(p)[0] for p in files["experts"].values()]
    with ComposedModel(bundle, "mixture", experts) as composed:
        assert composed.n_experts == 2
        assert bundle.model.n_modules == [10, 10]
    assert bundle.model.n_modules == [8, 8]
    assert torch.equal(bundle.model(ids, aux="none").logits, before)


def test_manifest_naming_a_missing_digest_is_refused(files) -> None:
    manifest = _manifest(files, "mixture", ["a", "b"])
    only_a = {digest_of(files["experts"]["a"]): files["experts"]["a"]}
    with pytest.raises(ValueError, match=digest_of(files["experts"]["b"])):
        ComposedModel.from_manifest(manifest, files["base"], only_a)


def test_wrong_file_for_a_digest_is_refused(files) -> None:
    manifest = _manifest(files, "mixture", ["a"])
    swapped = {digest_of(files["experts"]["a"]): files["experts"]["b"]}
    with pytest.raises(ValueError, match="hashes to"):
        ComposedModel.from_manifest(manifest, files["base"], swapped)


def test_manifest_of_another_base_is_refused(files) -> None:
    manifest = _manifest(files, "mixture", ["a"])
    manifest["base_revision"] = "0" * 64
    with pytest.raises(ValueError, match="not " + "0" * 64):
        ComposedModel.from_manifest(manifest, files["base"], _bydigest_of(files))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other/1"}, "agora.composition/1"),
        ({"method": "soup"}, "method"),
        ({"experts": []}, "non-empty"),
        ({"method": "distill", "output": None}, "output"),
    ],
)
def test_malformed_manifests_are_refused(files, change: dict, message: str) -> None:
    manifest = {**_manifest(files, "mixture", ["a"]), **change}
    with pytest.raises(ValueError, match=message):
        ComposedModel.from_manifest(manifest, files["base"], _bydigest_of(files))
