"""The modular language model: ModuleFormer blocks (Mixture-of-Attention + sparse MoE FFN).

Shape legend: B batch, T length, N = B*T tokens, D model dim, V vocab, E modules.

``ModularLM(config, device=..., kernels="auto")`` picks the kernel backend once, from the
device it is built on (Triton on CUDA, the PyTorch references elsewhere), and hands it to
every layer. ``forward(input_ids_BT)`` returns a ``ModelOutput``: the logits, the aux
losses it made (chosen by ``aux=`` or ``config.aux``; never kept anywhere else), and the
routing of every MoE FFN layer (for pruning statistics and losses computed by callers).

Aux kinds: ``"mi"`` -> ``{"mi"}`` averaged over all routers (attention and FFN, as
ModuleFormer does); ``"switch"`` -> ``{"switch", "z"}`` over all routers;
``"concentration"`` -> ``{"concentration"}`` over the FFN routers only (the modules that
pruning removes); ``"none"`` -> ``{}``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from modelcore import losses
from modelcore.attention import MixtureOfAttention
from modelcore.config import AUX_KINDS, ModelConfig
from modelcore.decode import KVCache, LayerCache, decoding_threads
from modelcore.kernels import KernelBackend, select_backend
from modelcore.moe import MoEFeedForward
from modelcore.router import LayerRouting

__all__ = ["LayerRouting", "ModelOutput", "ModularLM", "make_aux_losses"]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_losses: dict[str, torch.Tensor]
    routing: list[LayerRouting]  # one per MoE FFN layer, tokens flattened to N = B*T
    att_routing: list[LayerRouting] = field(default_factory=list)  # one per MoA layer


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean()


def make_aux_losses(
    kind: str, ffn: list[LayerRouting], att: list[LayerRouting]
) -> dict[str, torch.Tensor]:
    if kind == "none":
        return {}
    if kind == "mi":
        return {"mi": _mean([losses.mi_loss(r.probs_TE) for r in att + ffn])}
    if kind == "switch":
        routers = att + ffn
        return {
            "switch": _mean(
                [
                    losses.switch_balance_loss(r.probs_TE, r.topk_idx_TK, r.probs_TE.shape[-1])
                    for r in routers
                ]
            ),
            "z": _mean([losses.z_loss(r.logits_TE, r.active_E) for r in routers]),
        }
    if kind == "concentration":
        return {"concentration": _mean([losses.concentration_loss(r.probs_TE) for r in ffn])}
    raise ValueError(f"aux must be one of {AUX_KINDS}, got {kind!r}")


class Block(nn.Module):
    def __init__(self, config: ModelConfig, backend: KernelBackend, device: torch.device) -> None:
        super().__init__()
        D = config.d_model
        self.ln_att = nn.LayerNorm(D, eps=config.norm_eps, device=device)
        self.attn = MixtureOfAttention(config, backend, device=device)
        self.ln_ffn = nn.LayerNorm(D, eps=config.norm_eps, device=device)
        self.ffn = MoEFeedForward(config, backend, device=device)

    def forward(
        self, x_BTD: torch.Tensor, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerRouting, LayerRouting]:
        B, T, D = x_BTD.shape
        a_BTD, att_routing = self.attn(self.ln_att(x_BTD), cache)
        x_BTD = x_BTD + a_BTD
        h_ND = self.ln_ffn(x_BTD).reshape(B * T, D)
        if cache is not None and isinstance(self.ffn, MoEFeedForward):
            f_ND, ffn_routing = self.ffn(h_ND, decoding=True)
        else:  # training, prefill without a cache, or an EMoE layer (modelcore.emoe)
            f_ND, ffn_routing = self.ffn(h_ND)
        return x_BTD + f_ND.view(B, T, D), att_routing, ffn_routing


class ModularLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = select_backend(dev, prefer=kernels)
        V, D = config.vocab_size, config.d_model
        self.embed = nn.Embedding(V, D, device=dev)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.layers = nn.ModuleList(
            Block(config, self.backend, dev) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(D, eps=config.norm_eps, device=dev)
        self.lm_head = nn.Linear(D, V, bias=False, device=dev)
        nn.init.normal_(self.lm_head.weight, std=config.init_std)

    # -- modules ------------------------------------------------------------------------
    @property
    def ffn_layers(self) -> list[MoEFeedForward]:
        return [block.ffn for block in self.layers]  # type: ignore[union-attr]

    @property
    def n_modules(self) -> list[int]:
        return [ffn.n_modules for ffn in self.ffn_layers]

    @property
    def active_modules(self) -> list[torch.Tensor]:
        """Per MoE layer, a bool mask over its modules (False: pruned/removed, never routed)."""
        return [ffn.active_E.clone() for ffn in self.ffn_layers]

    def set_active_modules(self, layer: int, active_E: torch.Tensor) -> None:
        self.ffn_layers[layer].set_active(active_E)

    @property
    def dense(self) -> bool:
        return all(ffn.dense for ffn in self.ffn_layers)

    @dense.setter
    def dense(self, value: bool) -> None:
        """Dense phase of gradual modularization: every token uses every active module."""
        for ffn in self.ffn_layers:
            ffn.dense = bool(value)

    # -- forward ------------------------------------------------------------------------
    def forward(
        self, input_ids_BT: torch.Tensor, *, aux: str | None = None, cache: KVCache | None = None
    ) -> ModelOutput:
        """``cache``: incremental decoding (modelcore.decode; docs/modelcore.md, "Generation
        (KV cache)"): ``input_ids_BT`` follow the tokens already in the cache, whose keys
        and values each attention layer appends to; logits come for the new tokens only."""
        kind = self.config.aux if aux is None else aux
        if kind not in AUX_KINDS:
            raise ValueError(f"aux must be one of {AUX_KINDS}, got {kind!r}")
        x_BTD = self.embed(input_ids_BT)
        att_routing: list[LayerRouting] = []
        ffn_routing: list[LayerRouting] = []
        threads = nullcontext() if cache is None else decoding_threads(input_ids_BT.numel())
        with threads:
            for i, block in enumerate(self.layers):
                x_BTD, att_r, ffn_r = block(x_BTD, None if cache is None else cache.layer(i))
                att_routing.append(att_r)
                ffn_routing.append(ffn_r)
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        aux_losses = make_aux_losses(kind, ffn_routing, att_routing)
        return ModelOutput(logits_BTV, aux_losses, ffn_routing, att_routing)

    # -- serialisation helpers ------------------------------------------------------------
    def base_config(self) -> ModelConfig:
        """The config of this model as it stands (inserted modules counted as base ones)."""
        counts = set(self.n_modules)
        if len(counts) != 1:
            raise ValueError(
                f"MoE layers hold different module counts {self.n_modules}; "
                "a base model needs the same count in every layer"
            )
        n = counts.pop()
        return self.config.replace(ffn_experts=n, ffn_top_k=min(self.config.ffn_top_k, n))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with each layer's module blocks merged into one: the names a model
        built from ``base_config()`` has, so it loads with ``load_state_dict(strict=True)``."""
        out: dict[str, torch.Tensor] = {}
        ffn_prefixes = tuple(f"layers.{i}.ffn." for i in range(len(self.layers)))
        for name, tensor in self.state_dict().items():
            if not name.startswith(ffn_prefixes):
                out[name] = tensor.detach()
        for i, ffn in enumerate(self.ffn_layers):
            for name, tensor in ffn.consolidated().items():
                out[f"layers.{i}.ffn.{name}"] = tensor
        return {k: v.contiguous() for k, v in sorted(out.items())}
