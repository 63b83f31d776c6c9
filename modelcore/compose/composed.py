"""A composition as one ready model: load a manifest, score text, generate.

Shape legend: P ensemble paths (one per expert), B batch, T length, V vocab.

A composition manifest (``agora.composition/1``, built by the registry when a compose job
succeeds) names a base revision, its experts by digest and, for ensembles, their weights.
``ComposedModel.from_manifest`` turns it and the local files (base bundle directory,
expert files by digest) into a model that:

* ``mixture``: has every expert inserted into the base's MoE layers (token-level top-k
  routing over old and new modules, ``compose.mixture``);
* ``ensemble``: runs the experts as one batched ``ExpertEnsemble``, with the unmodified
  base as one more path (the "null expert", manifest ``with_base``, on unless a manifest
  says ``false``); the manifest weights (and ``base_weight``) are the prior ``P(j)`` and
  every position uses the DEMix posterior
  ``P(j | x_<t) ∝ P(j) prod_{s<t} p_j(x_s | x_<s)`` over its prefix (Gururangan et al.
  2022, section 4.2), so scoring and generation adapt to the text as it goes, and text no
  expert fits falls back on the base;
* ``average`` / ``distill``: has the composition's ``output`` expert (the merged or
  distilled one) inserted.

Bits per byte use ``modelcore.eval``'s accounting (same windows, same byte counts), so a
composition's number sits next to the base's. A model built on a base that the caller
keeps (the worker reuses one loaded base across jobs) is undone with ``release()`` (or a
``with`` block): inserted experts are removed and the base computes exactly what it did.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.artifacts import BaseBundle, load_base
from modelcore.compose.ensemble import (
    ExpertEnsemble,
    log_mix,
    mix_scores,
    posterior_log_weights,
)
from modelcore.compose.mixture import insert_experts, remove_experts
from modelcore.data.batches import eval_batches
from modelcore.data.tokenizer import decode, encode, eot_id, pad_id
from modelcore.decode import KVCache
from modelcore.eval import evaluate
from modelcore.experts import load_expert

MANIFEST_FORMAT = "agora.composition/1"
METHODS = ("mixture", "ensemble", "average", "distill")
# Methods whose manifest names a new expert (``output``) that stands for the inputs.
OUTPUT_METHODS = ("average", "distill")


def _sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_hex(digest: Any) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise ValueError(f"expert digest must be 'sha256:<hex>', got {digest!r}")
    hexpart = digest[len("sha256:") :]
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"expert digest must be 'sha256:<64 lowercase hex>', got {digest!r}")
    return hexpart


def normalise_prior(
    weights: Sequence[float] | None,
    n_paths: int,
    *,
    with_base: bool = False,
    base_weight: float | None = None,
) -> torch.Tensor:
    """Log prior over the ensemble's paths from non-negative weights (normalised here).

    ``weights``: one per expert (None = all equal). ``with_base``: the base is one more
    path, last (``n_paths`` counts it), with prior weight ``base_weight``; None gives it
    the mean of the experts' weights (so uniform weights stay uniform)."""
    n_experts = n_paths - int(with_base)
    if not with_base and base_weight is not None:
        raise ValueError("base_weight needs the base as a path (with_base)")
    if weights is None and base_weight is None:
        return torch.full((n_paths,), -math.log(n_paths))
    w = torch.tensor(
        [1.0] * n_experts if weights is None else [float(x) for x in weights], dtype=torch.float64
    )
    if w.numel() != n_experts:
        raise ValueError(f"{w.numel()} weights for {n_experts} experts")
    if with_base:
        b = float(w.mean()) if base_weight is None else float(base_weight)
        w = torch.cat([w, torch.tensor([b], dtype=torch.float64)])
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    # A zero weight stays zero: log 0 = -inf, and the posterior of such an expert is 0.
    return (w / w.sum()).log().float()


def manifest_inputs(manifest: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]]]:
    """The method and the expert refs a manifest needs files for (checked for shape).

    mixture/ensemble: its experts, in order; average/distill: its ``output`` only (the
    inputs were folded into it)."""
    if not isinstance(manifest, Mapping):
        raise ValueError("a composition manifest must be a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not an {MANIFEST_FORMAT} manifest (format={manifest.get('format')!r})")
    method = manifest.get("method")
    if method not in METHODS:
        raise ValueError(f"manifest method must be one of {METHODS}, got {method!r}")
    if method in OUTPUT_METHODS:
        output = manifest.get("output")
        if not isinstance(output, Mapping):
            raise ValueError(f"a {method} manifest needs its 'output' expert")
        refs = [output]
    else:
        experts = manifest.get("experts")
        if not isinstance(experts, list) or not experts:
            raise ValueError(f"a {method} manifest needs a non-empty 'experts' list")
        if not all(isinstance(e, Mapping) for e in experts):
            raise ValueError("manifest experts must be objects")
        refs = list(experts)
    for ref in refs:
        _digest_hex(ref.get("digest"))
    return str(method), refs


def manifest_with_base(manifest: Mapping[str, Any]) -> tuple[bool, float | None]:
    """``(with_base, base_weight)`` of an ensemble manifest. Manifests written before the
    base became a path by default do not say, and were built without it: False."""
    with_base = manifest.get("with_base", False)
    if not isinstance(with_base, bool):
        raise ValueError(f"manifest with_base must be true or false, got {with_base!r}")
    base_weight = manifest.get("base_weight")
    if base_weight is not None and (
        isinstance(base_weight, bool) or not isinstance(base_weight, (int, float))
    ):
        raise ValueError(f"manifest base_weight must be a number, got {base_weight!r}")
    return with_base, None if base_weight is None else float(base_weight)


def manifest_weights(manifest: Mapping[str, Any]) -> list[float] | None:
    """The experts' weights if every expert has one, else None (uniform)."""
    experts = manifest.get("experts") or []
    weights = [e.get("weight") for e in experts if isinstance(e, Mapping)]
    if not weights or any(w is None for w in weights):
        return None
    return [float(w) for w in weights]


class ComposedModel(nn.Module):
    """A base composed with experts by one method; see the module docstring.

    ``experts``: the expert tensors (mixture, ensemble: the manifest's experts in order;
    average, distill: the one output expert). ``weights`` (ensemble only): the prior, in
    the experts' order; None = uniform. ``with_base`` (ensemble only, default on): the
    base alone is one more path, last, with prior weight ``base_weight`` (None: the mean
    of the experts' weights).
    """

    def __init__(
        self,
        bundle: BaseBundle,
        method: str,
        experts: Sequence[Mapping[str, torch.Tensor]],
        *,
        weights: Sequence[float] | None = None,
        manifest: Mapping[str, Any] | None = None,
        with_base: bool = True,
        base_weight: float | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not experts:
            raise ValueError("a composition needs at least one expert")
        if method in OUTPUT_METHODS and len(experts) != 1:
            raise ValueError(f"a {method} composition is one (merged or distilled) expert")
        self.method = method
        self.manifest: dict[str, Any] = dict(manifest or {})
        self.tokenizer = bundle.tokenizer
        self.revision = bundle.revision
        self.base = bundle.model
        self.base.eval()
        self.ensemble: ExpertEnsemble | None = None
        self._added: list[list[int]] | None = None
        self.log_prior: torch.Tensor | None = None
        self.with_base = method == "ensemble" and with_base
        if method == "ensemble":
            n_paths = len(experts) + int(with_base)
            prior = normalise_prior(weights, n_paths, with_base=with_base, base_weight=base_weight)
            self.log_prior = prior.to(self.device)
            self.ensemble = ExpertEnsemble(self.base, experts, include_base=with_base)
        else:
            if weights is not None or base_weight is not None:
                raise ValueError("weights are an ensemble's prior; other methods take none")
            self._added = insert_experts(self.base, experts)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping[str, Any],
        base_dir: str | os.PathLike[str],
        expert_files: Mapping[str, str | os.PathLike[str]],
        *,
        device: torch.device | str = "cpu",
        kernels: str = "auto",
    ) -> ComposedModel:
        """Load the base bundle and the experts the manifest names (by digest).

        Every file is checked against its digest and every expert against the base
        (revision and tensor schema) before anything is composed; a missing or wrong
        file is a ``ValueError`` naming it.
        """
        method, refs = manifest_inputs(manifest)
        missing = [
            f"{r.get('id', '?')} ({r['digest']})" for r in refs if r["digest"] not in expert_files
        ]
        if missing:
            raise ValueError(f"no local file for expert(s) named by the manifest: {missing}")
        paths = []
        for ref in refs:
            path = Path(expert_files[ref["digest"]])
            if not path.is_file():
                raise ValueError(f"expert file {path} for {ref['digest']} does not exist")
            got = _sha256_hex(path)
            if got != _digest_hex(ref["digest"]):
                raise ValueError(
                    f"{path} hashes to sha256:{got}, the manifest says {ref['digest']}"
                )
            paths.append(path)
        bundle = load_base(base_dir, device=device, kernels=kernels)
        want = manifest.get("base_revision")
        if want is not None and want != bundle.revision:
            raise ValueError(f"base bundle {base_dir} is revision {bundle.revision}, not {want}")
        experts = []
        for path in paths:
            tensors, meta = load_expert(path, config=bundle.config)
            if meta["base_revision"] != bundle.revision:
                raise ValueError(f"expert {path} was made for base {meta['base_revision']}")
            experts.append(tensors)
        if method != "ensemble":
            return cls(bundle, method, experts, manifest=manifest)
        with_base, base_weight = manifest_with_base(manifest)
        return cls(
            bundle,
            method,
            experts,
            weights=manifest_weights(manifest),
            manifest=manifest,
            with_base=with_base,
            base_weight=base_weight,
        )

    def release(self) -> None:
        """Remove inserted experts: the base is left exactly as it was given."""
        if self._added is not None:
            remove_experts(self.base, self._added)
            self._added = None
        self.ensemble = None

    def __enter__(self) -> ComposedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def n_experts(self) -> int:
        if self.ensemble is not None:
            return self.ensemble.n_experts
        return len(self._added or [])

    # -- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def log_probs(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities at every position: (B, T, V) float32.

        Ensemble: position t mixes the paths with the posterior given tokens 1..t of the
        input (the prefix it has seen), starting from the prior at position 0.
        """
        ids_BT = input_ids_BT.to(self.device)
        if self.ensemble is None:
            return F.log_softmax(self.base(ids_BT, aux="none").logits.float(), dim=-1)
        assert self.log_prior is not None
        h_PBTD = self.ensemble.hidden(ids_BT)
        B, T = ids_BT.shape
        ll = []
        for logits_BTV in self.ensemble.path_logits(h_PBTD):
            lp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
            ll_BT = torch.zeros(B, T, device=ids_BT.device)
            # The last position's target is unknown; the exclusive prefix sum never uses it.
            ll_BT[:, :-1] = lp_BTV[:, :-1].gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
            ll.append(ll_BT)
        log_w_PBT = posterior_log_weights(torch.stack(ll), self.log_prior)
        return self.ensemble.mixture_log_probs(ids_BT, log_w_PBT, h_PBTD)

    @torch.no_grad()
    def bits_per_byte(
        self, texts: Sequence[str], *, seq_len: int | None = None, batch_size: int = 16
    ) -> dict[str, float | int]:
        """``{"bits_per_byte", "tokens", "bytes"}`` on ``texts`` (``modelcore.eval``)."""
        if self.ensemble is None:
            r = evaluate(
                self.base, self.tokenizer, {"texts": texts}, seq_len=seq_len, batch_size=batch_size
            )["texts"]
            return {"bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"], "bytes": r["bytes"]}
        assert self.log_prior is not None
        window = int(self.base.config.max_seq_len) if seq_len is None else seq_len
        nll, tokens, n_bytes = 0.0, 0, 0
        for batch in eval_batches(
            self.tokenizer, list(texts), seq_len=window, batch_size=batch_size
        ):
            tokens_BT1 = batch.tokens.to(self.device)
            mask_BT = batch.mask.to(self.device)
            ll_PBT = self.ensemble.log_likelihoods(tokens_BT1)
            score_BT = mix_scores(ll_PBT, posterior_log_weights(ll_PBT, self.log_prior))
            nll -= float(score_BT[mask_BT].sum())
            tokens += batch.n_tokens
            n_bytes += batch.n_bytes
        if tokens == 0:
            raise ValueError("no text to score")
        return {"bits_per_byte": nll / math.log(2) / n_bytes, "tokens": tokens, "bytes": n_bytes}

    # -- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """The continuation of ``prompt`` (not including it): greedy at temperature 0,
        else sampled (``top_k`` most likely tokens, seeded). Stops at ``<|endoftext|>``.

        Every method decodes with a KV cache (modelcore.decode; docs/modelcore.md,
        "Generation (KV cache)"): each new token runs through the model alone, over the
        cached keys and values of the context, and the ensemble's DEMix posterior is
        updated with each path's likelihood of the token. The context is the last
        ``max_seq_len`` tokens, as when every step rescored its window: once the text
        outgrows it, the window slides by one token per step and the cache is rebuilt
        from the window (the tokens computed the same as by rescoring it).
        """
        return self._generate(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, cached=True
        )

    @torch.no_grad()
    def _generate_rescoring(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """``generate`` without a cache: every step rescores the whole window with
        ``log_probs`` (the reference the cached decoding is tested against)."""
        return self._generate(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, cached=False
        )

    def _generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        temperature: float,
        top_k: int | None,
        seed: int,
        cached: bool,
    ) -> str:
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be >= 1")
        tok = self.tokenizer
        eot = eot_id(tok)
        # Texts are scored as a stream opened by <|endoftext|>; generation starts the same way.
        ids = [eot, *encode(tok, prompt)]
        window = int(self.base.config.max_seq_len)
        vocab = int(tok.get_vocab_size(with_added_tokens=True))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        decoder = _CachedDecoder(self) if cached else None
        new: list[int] = []
        for step in range(max_new_tokens):
            if decoder is None:
                context = torch.tensor([ids[-window:]], dtype=torch.long)
                lp_V = self.log_probs(context)[0, -1].float().cpu()
            elif step == 0 or len(ids) > window:
                # First step, or the window slid past its first token: rebuild the cache.
                lp_V = decoder.start(ids[-window:])
            else:
                lp_V = decoder.step(ids[-1])
            # The model's vocabulary may be larger than the tokenizer's; padding is never text.
            lp_V[vocab:] = float("-inf")
            lp_V[pad_id(tok)] = float("-inf")
            if temperature == 0:
                nxt = int(lp_V.argmax())
            else:
                scores_V = lp_V / temperature
                if top_k is not None and top_k < scores_V.numel():
                    kth = scores_V.topk(top_k).values[-1]
                    scores_V = scores_V.masked_fill(scores_V < kth, float("-inf"))
                nxt = int(torch.multinomial(F.softmax(scores_V, dim=-1), 1, generator=generator))
            if nxt == eot:
                break
            ids.append(nxt)
            new.append(nxt)
        return decode(tok, new)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.log_probs(input_ids_BT)


class _CachedDecoder:
    """Next-token log-probabilities of a context that grows one token at a time: the
    composition's model over a ``KVCache``; for an ensemble, the DEMix posterior
    ``log P(j) + sum_s log p_j(x_s | x_<s)`` kept per path and updated with each new
    token's likelihood (what ``log_probs`` computes at the last position of the context)."""

    def __init__(self, composed: ComposedModel) -> None:
        self.composed = composed
        self.cache = KVCache()
        # Ensemble: each path's log-likelihood of the context so far (float64, as
        # ``posterior_log_weights`` sums them) and its log-probs at the last position.
        self.ll_P: torch.Tensor | None = None
        self.last_lp_PV: torch.Tensor | None = None

    def start(self, ids: list[int]) -> torch.Tensor:
        """Forget the cache and read ``ids``: (V,) float32 log-probs on the CPU."""
        self.cache = KVCache()
        ids_1T = torch.tensor([ids], dtype=torch.long, device=self.composed.device)
        ensemble = self.composed.ensemble
        if ensemble is None:
            return self._single(ids_1T)
        h_P1TD = ensemble.hidden(ids_1T, self.cache)
        ll, last_logits, last_lp = [], [], []
        targets_T1 = ids_1T[0, 1:, None]
        for logits_1TV in ensemble.path_logits(h_P1TD):
            logits_TV = logits_1TV[0].float()
            lp_TV = F.log_softmax(logits_TV, dim=-1)
            ll.append(lp_TV[:-1].gather(-1, targets_T1).squeeze(-1).double().sum())
            last_logits.append(logits_TV[-1:])
            last_lp.append(lp_TV[-1])
        self.ll_P = torch.stack(ll)
        self.last_lp_PV = torch.stack(last_lp)
        return self._mix(last_logits)

    def step(self, token: int) -> torch.Tensor:
        """Append ``token`` to the context: (V,) float32 log-probs of the next one."""
        ids_11 = torch.tensor([[token]], dtype=torch.long, device=self.composed.device)
        ensemble = self.composed.ensemble
        if ensemble is None:
            return self._single(ids_11)
        assert self.ll_P is not None
        assert self.last_lp_PV is not None
        self.ll_P = self.ll_P + self.last_lp_PV[:, token].double()
        h_P11D = ensemble.hidden(ids_11, self.cache)
        last_logits, last_lp = [], []
        for logits_11V in ensemble.path_logits(h_P11D):
            logits_1V = logits_11V[0].float()
            last_logits.append(logits_1V)
            last_lp.append(F.log_softmax(logits_1V[0], dim=-1))
        self.last_lp_PV = torch.stack(last_lp)
        return self._mix(last_logits)

    def _single(self, ids_1T: torch.Tensor) -> torch.Tensor:
        logits_1TV = self.composed.base(ids_1T, aux="none", cache=self.cache).logits
        return F.log_softmax(logits_1TV[0, -1].float(), dim=-1).cpu()

    def _mix(self, last_logits: list[torch.Tensor]) -> torch.Tensor:
        """The posterior-weighted mixture of the paths' last-position distributions."""
        prior = self.composed.log_prior
        assert prior is not None
        assert self.ll_P is not None
        joint_P = self.ll_P + prior.double()
        log_w_P1 = (joint_P - torch.logsumexp(joint_P, dim=0)).float().unsqueeze(-1)
        return log_mix(iter(last_logits), log_w_P1)[0].cpu()
