"""The repetition rate of continuations and greedy decoding (modelcore/repetition.py),
on hand-made sequences and a hand-made next-token function."""

from __future__ import annotations

import pytest
import torch

from modelcore.repetition import greedy_tokens, pooled_repetition, repeated_ngrams, repetition_rate


def test_repetition_rate_on_hand_made_sequences() -> None:
    # No n-gram repeats.
    assert repetition_rate([1, 2, 3, 4, 5, 6, 7], n=4) == 0.0
    # One token over and over: every 4-gram after the first repeats it.
    assert repeated_ngrams([9] * 10, n=4) == (6, 7)
    assert repetition_rate([9] * 10, n=4) == pytest.approx(6 / 7)
    # A loop of three: 1 2 3 1 2 3 1 2 -> 4-grams 1231 2312 3123 1231 2312: two repeat.
    assert repeated_ngrams([1, 2, 3, 1, 2, 3, 1, 2], n=4) == (2, 5)
    # The same tokens in a new order are not a repeated 4-gram.
    assert repetition_rate([1, 2, 3, 4, 4, 3, 2, 1], n=4) == 0.0
    # Bigrams: a b a b a -> ab ba ab ba: two repeat.
    assert repetition_rate([1, 2, 1, 2, 1], n=2) == 0.5
    # Too short to hold an n-gram that repeats.
    assert repetition_rate([], n=4) == 0.0
    assert repetition_rate([5, 5, 5], n=4) == 0.0
    assert repetition_rate([5, 5, 5, 5], n=4) == 0.0
    with pytest.raises(ValueError):
        repetition_rate([1, 2], n=0)


def test_pooled_repetition_counts_each_continuation_on_its_own() -> None:
    # The same 4-gram in two continuations repeats in neither.
    assert pooled_repetition([[1, 2, 3, 4], [1, 2, 3, 4]], n=4) == 0.0
    # (6 of 7) + (0 of 4) = 6 of 11.
    assert pooled_repetition([[9] * 10, [1, 2, 3, 4, 5, 6, 7]], n=4) == pytest.approx(6 / 11)
    assert pooled_repetition([], n=4) == 0.0


def test_greedy_tokens_follows_the_argmax_bans_padding_and_stops() -> None:
    vocab = 6

    def cycle(ids_BT: torch.Tensor) -> torch.Tensor:
        # Peaked on (last % 4) + 1; padding (0) and a token past the tokenizer's
        # vocabulary (7: a model may have more rows than the tokenizer) score higher.
        B, T = ids_BT.shape
        lp_BTV = torch.full((B, T, vocab + 2), -10.0)
        lp_BTV[:, :, 0] = 0.0
        lp_BTV[:, :, 7] = 1.0
        for t in range(T):
            lp_BTV[:, t, int(ids_BT[0, t]) % 4 + 1] = -1.0
        return lp_BTV

    out = greedy_tokens(cycle, [1], 6, window=4, vocab=vocab, banned=(0,))
    assert out == [2, 3, 4, 1, 2, 3]
    assert repetition_rate(out, n=4) == 0.0
    assert repetition_rate(greedy_tokens(cycle, [1], 12, window=2, vocab=vocab, banned=(0,))) == (
        pytest.approx(5 / 9)
    )
    # Stops at the stop token, not included.
    assert greedy_tokens(cycle, [1], 5, window=4, vocab=vocab, banned=(0,), stop=4) == [2, 3]
    # Without the ban, padding wins.
    assert greedy_tokens(cycle, [1], 2, window=4, vocab=vocab) == [0, 0]
    assert greedy_tokens(cycle, [1], 0, window=4, vocab=vocab) == []
    with pytest.raises(ValueError):
        greedy_tokens(cycle, [], 3, window=4, vocab=vocab)
