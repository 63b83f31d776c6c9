"""Greedy continuations and how repetitive they are: the degenerate-output check of
scheduled monitoring (docs/governance.md, "Monitoring").

Shape legend: B batch (1 here), T tokens, V vocabulary.

* ``greedy_tokens``: the argmax continuation of a prompt under any next-token
  log-probability function (the base's, or a composition's: ``ComposedModel.log_probs``),
  as token ids, rescoring the last ``window`` tokens at each step (no KV cache: the
  models this runs on are small).
* ``repetition_rate``: of the n-grams a continuation holds (``n`` consecutive tokens, at
  every start position), the share that already occurred, whole, at an earlier start
  position of the same continuation. A continuation of fewer than ``n + 1`` tokens has no
  n-gram that can repeat: its rate is 0. ``pooled_repetition`` pools several
  continuations: repeated n-grams over all n-grams, each continuation counted on its own
  (an n-gram is repeated only within its own continuation).

A model stuck on one token (``t t t t ...``) repeats every n-gram after the first: a
continuation of ``L`` tokens scores ``(L - n) / (L - n + 1)``; a continuation with no
repeated n-gram scores 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from modelcore.data.tokenizer import encode, eot_id, pad_id

LogProbs = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> log-probs (B, T, V)


def repeated_ngrams(ids: Sequence[int], n: int = 4) -> tuple[int, int]:
    """``(repeated, total)``: the n-grams of ``ids`` that occurred at an earlier start
    position, and all of its n-grams (``max(0, len(ids) - n + 1)``)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for start in range(len(ids) - n + 1):
        gram = tuple(ids[start : start + n])
        total += 1
        if gram in seen:
            repeated += 1
        else:
            seen.add(gram)
    return repeated, total


def repetition_rate(ids: Sequence[int], n: int = 4) -> float:
    """The share of the n-grams of ``ids`` that repeat an earlier one (module docstring);
    0.0 when ``ids`` has no n-gram."""
    repeated, total = repeated_ngrams(ids, n)
    return repeated / total if total else 0.0


def pooled_repetition(continuations: Sequence[Sequence[int]], n: int = 4) -> float:
    """Repeated n-grams over all n-grams of several continuations, each on its own."""
    repeated = total = 0
    for ids in continuations:
        r, t = repeated_ngrams(ids, n)
        repeated += r
        total += t
    return repeated / total if total else 0.0


@torch.no_grad()
def greedy_tokens(
    log_probs: LogProbs,
    prompt: Sequence[int],
    new_tokens: int,
    *,
    window: int,
    vocab: int,
    banned: Sequence[int] = (),
    stop: int | None = None,
) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids, not included in the answer):
    ``new_tokens`` argmax steps, over the tokenizer's ``vocab`` minus ``banned`` (padding:
    never text), ending early at ``stop`` (``<|endoftext|>``, not included)."""
    if new_tokens < 0:
        raise ValueError("new_tokens must be >= 0")
    if window < 1 or not prompt:
        raise ValueError("a continuation needs a non-empty prompt and a window >= 1")
    ids = list(prompt)
    out: list[int] = []
    for _ in range(new_tokens):
        context_BT = torch.tensor([ids[-window:]], dtype=torch.long)
        lp_V = log_probs(context_BT)[0, -1].float().cpu()
        lp_V[vocab:] = float("-inf")
        for token in banned:
            lp_V[token] = float("-inf")
        nxt = int(lp_V.argmax())
        if stop is not None and nxt == stop:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def prompts_of(
    tokenizer: Any, texts: Sequence[str], *, prompts: int, prompt_tokens: int
) -> list[list[int]]:
    """Up to ``prompts`` prompts: the first ``prompt_tokens`` tokens of each text in
    turn (texts with no token skipped), each opened by ``<|endoftext|>`` as scored text
    and ``ComposedModel.generate`` are."""
    eot = eot_id(tokenizer)
    out: list[list[int]] = []
    for text in texts:
        if len(out) >= prompts:
            break
        ids = encode(tokenizer, text)[:prompt_tokens]
        if ids:
            out.append([eot, *ids])
    return out


def continuations(
    log_probs: LogProbs,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    window: int,
) -> list[list[int]]:
    """The greedy continuation of each prompt (``greedy_tokens``), over the tokenizer's
    vocabulary without padding, each ending early at ``<|endoftext|>``."""
    vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))
    return [
        greedy_tokens(
            log_probs,
            prompt,
            new_tokens,
            window=window,
            vocab=vocab,
            banned=(pad_id(tokenizer),),
            stop=eot_id(tokenizer),
        )
        for prompt in prompts
    ]
