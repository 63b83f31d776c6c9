from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer

from modelcore.data import (
    Corpus,
    bits_per_byte,
    count_bytes,
    encode_texts,
    eot_id,
    eval_batches,
    stream_batches,
    token_batches,
    token_byte_lengths,
)


def test_training_batches_are_windows_of_the_stream() -> None:
    stream = torch.arange(1000)
    batches = stream_batches(stream, seq_len=16, batch_size=4, seed=0)
    seen: set[int] = set()
    for _ in range(250):  # 16 epochs of about 62 windows
        batch = next(batches)
        assert batch.shape == (4, 17)
        assert batch.dtype == torch.long
        # Each row is a contiguous slice (T+1 consecutive stream tokens).
        assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 16, dtype=torch.long))
        seen.update(batch.flatten().tolist())
    # The offset moves through all of [0, T) in T epochs: every token is seen, ends included.
    assert seen == set(range(1000))


def test_training_batches_are_deterministic_in_the_seed(
    tokenizer: Tokenizer, small_corpus: Corpus
) -> None:
    texts = small_corpus.domains["python_docs"].train

    def first(seed: int) -> list[torch.Tensor]:
        it = token_batches(tokenizer, texts, seq_len=32, batch_size=3, seed=seed)
        return [next(it) for _ in range(5)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_batches_run_on_across_epochs_of_a_short_stream() -> None:
    batches = stream_batches(torch.arange(10), seq_len=4, batch_size=5, seed=3)
    for _ in range(10):
        assert next(batches).shape == (5, 5)
    with pytest.raises(ValueError, match="seq_len"):
        next(stream_batches(torch.arange(4), seq_len=4, batch_size=1))


def test_encode_texts_appends_one_separator(tokenizer: Tokenizer) -> None:
    seqs = encode_texts(tokenizer, ["alpha", "", "beta gamma"])
    assert [s[-1] for s in seqs] == [eot_id(tokenizer)] * 3
    assert seqs[1] == [eot_id(tokenizer)]


@pytest.mark.parametrize(("seq_len", "batch_size"), [(7, 3), (64, 4), (500, 1)])
def test_eval_batches_score_every_text_token_exactly_once(
    tokenizer: Tokenizer, small_corpus: Corpus, seq_len: int, batch_size: int
) -> None:
    texts = [*small_corpus.domains["licenses"].heldout, "", "ünïcödé 🙂 tail"]
    expected = [i for seq in encode_texts(tokenizer, texts, append_eot=False) for i in seq]
    scored: list[int] = []
    n_bytes = n_tokens = 0
    for batch in eval_batches(tokenizer, texts, seq_len=seq_len, batch_size=batch_size):
        assert batch.tokens.shape[1] == seq_len + 1
        assert 1 <= batch.tokens.shape[0] <= batch_size
        assert batch.mask.shape == (batch.tokens.shape[0], seq_len)
        scored += batch.tokens[:, 1:][batch.mask].tolist()
        n_bytes += batch.n_bytes
        n_tokens += batch.n_tokens
    assert scored == expected  # in order, none twice, none missed, no separators
    assert n_tokens == len(expected)
    assert n_bytes == count_bytes(texts)


def test_bits_per_byte_of_a_uniform_model(tokenizer: Tokenizer, small_corpus: Corpus) -> None:
    """A model that is uniform over the vocabulary has bpb = tokens * log2(V) / bytes."""
    texts = small_corpus.domains["python_stdlib"].heldout
    vocab = tokenizer.get_vocab_size()
    nll = 0.0
    n_bytes = n_tokens = 0
    for batch in eval_batches(tokenizer, texts, seq_len=128, batch_size=8):
        logits = torch.zeros(*batch.tokens[:, 1:].shape, vocab)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.tokens[:, 1:].flatten(), reduction="none"
        )
        nll += float(loss[batch.mask.flatten()].sum())
        n_bytes += batch.n_bytes
        n_tokens += batch.n_tokens
    assert bits_per_byte(nll, n_bytes) == pytest.approx(n_tokens * math.log2(vocab) / n_bytes)
    assert n_bytes == count_bytes(texts)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_special_tokens_stand_for_no_bytes(tokenizer: Tokenizer) -> None:
    lengths = token_byte_lengths(tokenizer)
    assert lengths[:2] == [0, 0]
    assert min(lengths[2:]) == 1
    assert len(lengths) == tokenizer.get_vocab_size()
