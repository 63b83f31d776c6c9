"""Byte-level BPE tokenizer (GPT-2 style), trained with the HuggingFace ``tokenizers`` library.

Why byte level: every UTF-8 byte is in the initial alphabet, so any text (source code,
licenses, emoji, CJK) encodes without an unknown token and decodes back *exactly*. That
exactness is what makes bits per byte computable from token losses: every non-special token
stands for a fixed number of UTF-8 bytes (``token_byte_lengths``), and the tokens of a text
partition its bytes. For the same reason there is no normalizer and no prefix space: both
would change the text.

Special tokens: ``<|endoftext|>`` (id 0, the document separator) and ``<|pad|>`` (id 1).
A literal ``<|endoftext|>`` inside a document is encoded as ordinary text
(``encode_special_tokens``), so corpus text can never inject a document boundary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "EOT",
    "PAD",
    "SPECIAL_TOKENS",
    "decode",
    "encode",
    "eot_id",
    "load_tokenizer",
    "pad_id",
    "save_tokenizer",
    "token_byte_lengths",
    "tokenizer_to_json",
    "train_tokenizer",
]

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _subsample(texts: Sequence[str], max_bytes: int | None, seed: int) -> list[str]:
    """A seeded sample of whole texts up to ``max_bytes`` (BPE counts do not depend on order,
    so without a cap the seed changes nothing)."""
    if max_bytes is None:
        return list(texts)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    picked: list[str] = []
    total = 0
    for i in order:
        size = len(texts[i].encode("utf-8"))
        if total + size > max_bytes and picked:
            break
        picked.append(texts[i])
        total += size
    return picked


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    seed: int = 0,
    *,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    max_token_length: int | None = 32,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    ``vocab_size`` counts the 256 byte tokens and the two special tokens, so it must be at
    least 258. Training is deterministic for the same texts; ``seed`` only picks which texts
    are used when ``max_bytes`` caps the training text. ``max_token_length`` stops merges
    from memorising long runs (license boilerplate, ``====`` rules) at small vocabularies.
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be at least {floor} (bytes + special tokens)")
    sample = _subsample(list(texts), max_bytes, seed)
    if not sample:
        raise ValueError("train_tokenizer needs at least one text")
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def tokenizer_to_json(tok: Tokenizer) -> str:
    """Compact JSON of the tokenizer: what ``tokenizer.json`` in a base bundle holds."""
    return str(tok.to_str(pretty=False))


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(tokenizer_to_json(tok), encoding="utf-8")


def load_tokenizer(path_or_json: str | Path) -> Tokenizer:
    """Load from a ``tokenizer.json`` path or from the JSON text itself.

    Refuses tokenizers that are not byte-level BPE with our special tokens: byte accounting
    (bits per byte) and document separation depend on both.
    """
    if isinstance(path_or_json, str) and path_or_json.lstrip().startswith("{"):
        text = path_or_json
    else:
        text = Path(path_or_json).read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tokenizer JSON is not valid JSON: {exc}") from exc
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ValueError("tokenizer must be byte-level BPE (model BPE, pre_tokenizer ByteLevel)")
    declared = {t.get("content") for t in spec.get("added_tokens") or [] if t.get("special")}
    for special in SPECIAL_TOKENS:
        # Must be a declared special token, or text would be merged across it.
        if special not in declared:
            raise ValueError(f"tokenizer lacks the special token {special!r}")
    tok = Tokenizer.from_str(text)
    # Not serialised by `tokenizers`, so it is restored here (see the module docstring).
    tok.encode_special_tokens = True
    return tok


def eot_id(tok: Tokenizer) -> int:
    idx = tok.token_to_id(EOT)
    if idx is None:
        raise ValueError(f"tokenizer lacks {EOT!r}")
    return int(idx)


def pad_id(tok: Tokenizer) -> int:
    idx = tok.token_to_id(PAD)
    if idx is None:
        raise ValueError(f"tokenizer lacks {PAD!r}")
    return int(idx)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, special-token literals encoded as plain text."""
    prev = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return list(tok.encode(text, add_special_tokens=False).ids)
    finally:
        tok.encode_special_tokens = prev


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Inverse of ``encode``: ``decode(tok, encode(tok, x)) == x`` for any str ``x``."""
    return str(tok.decode(list(ids), skip_special_tokens=False))


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    In the byte-level alphabet every character is exactly one byte, so a token's length in
    characters is its length in bytes.
    """
    specials = set(SPECIAL_TOKENS)
    lengths = []
    for idx in range(tok.get_vocab_size(with_added_tokens=True)):
        piece = tok.id_to_token(idx)
        lengths.append(0 if piece is None or piece in specials else len(piece))
    return lengths
