"""GPU benchmark of the whole modular LM vs a dense model of equal active parameters.

Model: ``ModularLM`` at the ``molm_4b_k2`` preset (24 blocks; Mixture-of-Attention with 16
stick-breaking attention modules, 2 active; MoE FFN with 32 modules of 2048, 2 active),
bf16, Triton kernels. Dense baseline, same active parameters per token: 24 blocks of
softmax attention through SDPA (flash where it applies) with 16 query heads and 8 KV heads
of 128 (q/o width 2048, k/v width 1024: the MoA's active q/o experts plus shared k/v), and
a dense GELU MLP of 4096 (= 2 active modules x 2048); same embedding and LM head. Not
counted: the modular model's routers (a few MFLOP per token), the dense one's nothing.

Training = forward + next-token cross entropy (+ the model's aux loss) + backward;
prefill = forward without autograd. Tokens/s of both, in this process.

Run: PYTHONPATH=. python3 benchmarks/model_gpu.py [--batch 8 --seq 1024 --reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    def __init__(self, d: int, q_heads: int, kv_heads: int, head_dim: int, d_ffn: int) -> None:
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, q_heads * head_dim, bias=False)
        self.kv = nn.Linear(d, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(q_heads * head_dim, d, bias=False)
        self.up = nn.Linear(d, d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.q_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class DenseLM(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, q_heads: int, kv_heads: int,
                 head_dim: int, d_ffn: int) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            DenseBlock(d, q_heads, kv_heads, head_dim, d_ffn) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="molm_4b_k2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU reference path")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _bench import bench, header

    try:
        from modelcore.config import ModelConfig
        from modelcore.model import ModularLM
    except ImportError as exc:  # the architecture lands separately
        print(f"# model_gpu: modelcore.model not importable ({exc}); nothing measured")
        return

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    preset = "tiny" if args.smoke else args.preset
    B, T = (2, 32) if args.smoke else (args.batch, args.seq)
    reps = 1 if args.smoke else args.reps
    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    modular = ModularLM(cfg, device=dev).to(dtype)
    q_heads = max(1, cfg.att_top_k * cfg.att_width // 128)
    kv_heads = max(1, cfg.att_width // 128)
    head_dim = (cfg.att_top_k * cfg.att_width) // q_heads
    with torch.device(dev):
        dense = DenseLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, q_heads, kv_heads,
                        head_dim, cfg.ffn_top_k * cfg.d_ffn).to(dtype)  # fmt: skip
    n_mod = sum(p.numel() for p in modular.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    header(
        f"Whole model at {preset}: ModularLM (backend {modular.backend.name}) vs dense SDPA", dev
    )
    print(f"# batch {B} x {T} tokens; modular total params {n_mod / 1e9:.2f} B, "
          f"dense (= modular active) params {n_dense / 1e9:.2f} B; {str(dtype)[6:]}")  # fmt: skip

    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
    inp, tgt = ids[:, :-1], ids[:, 1:]

    def modular_train():
        out = modular(inp)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tgt.flatten())
        loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=dev))
        loss.backward()

    def dense_train():
        logits = dense(inp)
        F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten()).backward()

    def modular_prefill():
        with torch.no_grad():
            return modular(inp).logits

    def dense_prefill():
        with torch.no_grad():
            return dense(inp)

    tokens = B * T
    results = {}
    cases = [("modular train", modular_train), ("dense train", dense_train),
             ("modular prefill", modular_prefill), ("dense prefill", dense_prefill)]  # fmt: skip
    for name, fn in cases:
        t = bench(fn, dev, warmup=1, reps=reps)
        results[name] = tokens / t
        modular.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
    for kind in ("train", "prefill"):
        m, d = results[f"modular {kind}"], results[f"dense {kind}"]
        print(f"{kind:<8} tokens/s: modular {m:,.0f} | dense {d:,.0f} | modular/dense {m / d:.2f}x")


if __name__ == "__main__":
    main()
