"""Token batches for training (infinite, shuffled) and evaluation (finite, exact coverage).

Shapes: B batch, T sequence length; a batch row holds T+1 tokens (inputs ``[:, :-1]``,
targets ``[:, 1:]``).

Both iterators concatenate the texts into one stream with ``<|endoftext|>`` after each
text (concatenate-and-chunk, as GPT-2 and nanoGPT train), so no token is spent on padding
during training and documents are separated the same way in training and evaluation.

Bits per byte: the evaluation stream starts with ``<|endoftext|>`` so that the first token
of the first text is predicted too, and every text token is a target exactly once. Targets
that are special tokens are masked out: they stand for no bytes of the text. Each batch
reports the UTF-8 bytes its scored targets stand for (``token_byte_lengths``), so
``bits_per_byte(sum of NLL over masked targets, sum of n_bytes)`` is exact, and the byte
total over all batches equals ``count_bytes(texts)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from modelcore.data.tokenizer import eot_id, pad_id, token_byte_lengths

__all__ = [
    "EvalBatch",
    "bits_per_byte",
    "count_bytes",
    "encode_texts",
    "eval_batches",
    "stream_batches",
    "token_batches",
    "token_stream",
]


def encode_texts(
    tok: Tokenizer, texts: Sequence[str], *, append_eot: bool = True
) -> list[list[int]]:
    """Token ids of each text, ``<|endoftext|>`` appended; literal special-token text in a
    document is encoded as plain text (never as a separator)."""
    prev = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = prev
    eot = [eot_id(tok)] if append_eot else []
    return [list(e.ids) + eot for e in encodings]


def count_bytes(texts: Sequence[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def token_stream(tok: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one LongTensor, each followed by ``<|endoftext|>``."""
    ids = [i for seq in encode_texts(tok, texts) for i in seq]
    return torch.tensor(ids, dtype=torch.long)


def stream_batches(
    tokens: torch.Tensor, *, seq_len: int, batch_size: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Endless (B, T+1) batches of windows of a 1-D token stream.

    Each epoch cuts the stream into windows of T+1 tokens with stride T, starting at an
    offset in [0, T) that changes every epoch (so window borders move), and visits them in
    a random order; batches run on across epoch ends. Same seed, same batches.
    """
    if tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D stream")
    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be positive")
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(f"the text gives {n} tokens; a window needs seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens.to(torch.long)
    pending: list[torch.Tensor] = []
    offsets: list[int] = []
    while True:
        if not offsets:
            # Offsets drawn without replacement: within any T consecutive epochs every
            # token of the stream is in some window, the first and last included.
            offsets = torch.randperm(seq_len, generator=gen).tolist()
        offset = offsets.pop()
        if (n - offset - 1) // seq_len < 1:
            offset = 0
        n_windows = (n - offset - 1) // seq_len
        for w in torch.randperm(n_windows, generator=gen).tolist():
            start = offset + w * seq_len
            pending.append(tokens[start : start + seq_len + 1])
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []


def token_batches(
    tok: Tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Endless shuffled training batches, LongTensor (B, T+1), of ``texts``."""
    return stream_batches(
        token_stream(tok, texts), seq_len=seq_len, batch_size=batch_size, seed=seed
    )


@dataclass(frozen=True)
class EvalBatch:
    tokens: torch.Tensor  # (B, T+1) long; padded with <|pad|> after the stream ends
    mask: torch.Tensor  # (B, T) bool: which targets tokens[:, 1:] are scored
    n_bytes: int  # UTF-8 bytes of the text the scored targets stand for
    n_tokens: int  # scored targets


def eval_batches(
    tok: Tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int
) -> Iterator[EvalBatch]:
    """Finite batches scoring every token of ``texts`` exactly once (in order).

    Windows of T+1 tokens with stride T: each window's first token is the previous
    window's last target, so context restarts every T tokens but no target repeats. The
    last batch may have fewer rows.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be positive")
    eot, pad = eot_id(tok), pad_id(tok)
    byte_len = torch.tensor(token_byte_lengths(tok), dtype=torch.long)
    stream = torch.cat([torch.tensor([eot], dtype=torch.long), token_stream(tok, texts)])
    n_targets = stream.numel() - 1
    n_windows = math.ceil(n_targets / seq_len)
    # Pad so every window is full; padded targets are masked out below.
    padded = torch.full((n_windows * seq_len + 1,), pad, dtype=torch.long)
    padded[: stream.numel()] = stream
    position = torch.arange(1, padded.numel())
    scored = (position < stream.numel()) & (byte_len[padded[1:]] > 0)
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        tokens = torch.stack([padded[w * seq_len : w * seq_len + seq_len + 1] for w in rows])
        mask = torch.stack([scored[w * seq_len : (w + 1) * seq_len] for w in rows])
        targets = tokens[:, 1:]
        yield EvalBatch(
            tokens=tokens,
            mask=mask,
            n_bytes=int((byte_len[targets] * mask).sum()),
            n_tokens=int(mask.sum()),
        )


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) of a text over its UTF-8 byte count, in bits."""
    if n_bytes <= 0:
        raise ValueError("n_bytes must be positive")
    return nll_nats / math.log(2) / n_bytes
