"""Model configuration: one typed frozen dataclass with named presets.

Shape names used across modelcore: V vocab, D ``d_model``, L ``n_layers``, E_att attention
experts (``att_experts``) of which ``att_top_k`` are active per token, H heads per attention
expert (``att_heads``) of ``head_dim`` each, E FFN modules (``ffn_experts``) of which
``ffn_top_k`` are active, F ``d_ffn`` (hidden width of one FFN module), R ``router_hidden``.

Presets (``ModelConfig.from_name``):

* ``tiny``: CPU tests; a few hundred training steps take seconds on a CPU.
* ``small``: CPU demo; minutes of training on a CPU.
  (Step times measured: docs/modelcore.md, "Tests and numbers".)
* ``molm_4b_k2``: the shapes of ModuleFormer's MoLM-4B-K2 (Shen et al. 2023, Table 1;
  released as ``ibm/MoLM-350M-4B``): 24 blocks, 16 attention modules and 32 MLP modules
  per layer, 2 of each active per token (IBM/ModuleFormer README, "Model Architecture").
  The widths are those of the released MoLM configs (``ibm/MoLM-700M-8B`` config.json,
  same family): ``n_embd`` 1024, ``att_hidden`` 1024 with ``n_head`` 1 (one head of 1024
  per attention module), ``ffd_hidden`` 2048, ``gating_size`` 256, ``vocab_size`` 50295,
  ``block_size`` 512. GPU benchmarks only.

The environment is never read here: a config is built from a preset name or a dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_KINDS = ("stickbreaking", "softmax")
ACTIVATIONS = ("gelu",)
AUX_KINDS = ("mi", "switch", "concentration", "none")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    d_model: int = 64
    n_layers: int = 2
    # Mixture-of-Attention (ModuleFormer section 3.2).
    attention: str = "stickbreaking"
    att_experts: int = 4
    att_top_k: int = 2
    att_heads: int = 1
    head_dim: int = 32
    # Sparse MoE feed-forward (ModuleFormer section 3.1).
    ffn_experts: int = 8
    ffn_top_k: int = 2
    d_ffn: int = 64
    activation: str = "gelu"
    router_hidden: int = 32
    max_seq_len: int = 256
    # Softmax baseline only: RoPE base frequency.
    rope_theta: float = 10000.0
    # Stick-breaking only: let the stick cover j = i too (Tan et al. 2024 option).
    sb_include_diagonal: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Which aux loss ``forward`` makes when the caller does not say.
    aux: str = "mi"
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.aux not in AUX_KINDS:
            raise ValueError(f"aux must be one of {AUX_KINDS}, got {self.aux!r}")
        for field in (
            "vocab_size",
            "d_model",
            "n_layers",
            "att_experts",
            "att_top_k",
            "att_heads",
            "head_dim",
            "ffn_experts",
            "ffn_top_k",
            "d_ffn",
            "router_hidden",
            "max_seq_len",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.att_top_k > self.att_experts:
            raise ValueError("att_top_k cannot exceed att_experts")
        if self.ffn_top_k > self.ffn_experts:
            raise ValueError("ffn_top_k cannot exceed ffn_experts")
        if self.attention == "softmax" and self.head_dim % 2:
            raise ValueError("RoPE (softmax attention) needs an even head_dim")

    @property
    def att_width(self) -> int:
        """Width of one attention expert's query/output projection: H * head_dim."""
        return self.att_heads * self.head_dim

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            factory = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        return factory()

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        return cls(**data)


def tiny() -> ModelConfig:
    # 1024 tokens matches the data engineer's default tokenizer size; d_model 64 and two
    # layers keep one training step at a few milliseconds on a CPU core.
    return ModelConfig(name="tiny")


def small() -> ModelConfig:
    return ModelConfig(
        name="small",
        vocab_size=4096,
        d_model=192,
        n_layers=4,
        att_experts=8,
        att_top_k=2,
        att_heads=2,
        head_dim=48,
        ffn_experts=16,
        ffn_top_k=2,
        d_ffn=192,
        router_hidden=64,
        max_seq_len=512,
    )


def molm_4b_k2() -> ModelConfig:
    return ModelConfig(
        name="molm_4b_k2",
        vocab_size=50295,
        d_model=1024,
        n_layers=24,
        att_experts=16,
        att_top_k=2,
        att_heads=1,
        head_dim=1024,
        ffn_experts=32,
        ffn_top_k=2,
        d_ffn=2048,
        router_hidden=256,
        max_seq_len=1024,
    )


PRESETS = {"tiny": tiny, "small": small, "molm_4b_k2": molm_4b_k2}
