"""CPU benchmark of the whole modular LM vs a dense model of equal active parameters:
training, prefill and generation (KV cache) tokens/s, measured in one process.

Model: ``ModularLM`` at the ``small`` preset (4 blocks, d 192; Mixture-of-Attention with
8 stick-breaking experts of 2 heads x 48, 2 active; MoE FFN with 16 modules of 192, 2
active), float32, the CPU kernel backend. Dense baseline, same active parameters per
token: ``model_gpu.DenseLM`` with 4 query heads and 2 KV heads of 48 (q/o width 192 = the
2 active query/output experts, k/v width 96 = the shared keys/values), causal SDPA, and a
dense GELU MLP of 384 (= 2 active modules x 192); same embedding and LM head. Not
counted: the modular model's routers.

Training = forward + next-token cross entropy (+ the model's aux loss) + backward on
batch x seq tokens; prefill = forward without autograd on the same batch; generation =
greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt at batch 1, both
models with a KV cache (``modelcore.decode`` for the modular one, the same cache for the
dense one) and the same thread rule (``decode.decoding_threads``: one intra-op thread for a
step of a few tokens), counting the new tokens. Threads: ``--threads`` (torch intra-op), printed.

Run: PYTHONPATH=. python3 benchmarks/model_cpu.py [--batch 4 --seq 512 --reps 3
     --new 256 --threads 2] [--modes train,prefill,generate] [--profile MODE] [--smoke]
     [--kernels reference] [--vs-rescoring]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import bench, header
from model_gpu import DenseBlock, DenseLM

from modelcore.config import ModelConfig
from modelcore.decode import KVCache, decoding_threads
from modelcore.model import ModularLM

MODES = ("train", "prefill", "generate")


def dense_forward(dense: DenseLM, ids_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """``dense(ids)`` for tokens that follow the cached ones; keys/values appended."""
    with decoding_threads(ids_BT.numel()):  # the modular model's rule, for a fair ratio
        return _dense_layers(dense, ids_BT, cache)


def _dense_layers(dense: DenseLM, ids_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
    x = dense.embed(ids_BT)
    B, T, _ = x.shape
    for i, module in enumerate(dense.blocks):
        blk = cast(DenseBlock, module)
        h = blk.ln1(x)
        q = blk.q(h).view(B, T, blk.q_heads, blk.head_dim).transpose(1, 2)
        k, v = blk.kv(h).view(B, T, 2, blk.kv_heads, blk.head_dim).permute(2, 0, 3, 1, 4)
        first = cache.layer(i).length == 0
        k_all, v_all = cache.layer(i).append(k, v)
        if first:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # one new token (generation): it sees every cached key
            a = F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=True)
        x = x + blk.o(a.transpose(1, 2).reshape(B, T, -1))
        x = x + blk.down(F.gelu(blk.up(blk.ln2(x))))
    logits: torch.Tensor = dense.lm_head(dense.ln_f(x))
    return logits


def greedy(
    step: Callable[[torch.Tensor, KVCache], torch.Tensor], prompt_1T: torch.Tensor, n_new: int
) -> list[int]:
    """Greedy decoding through ``step(ids, cache) -> logits`` with a fresh cache."""
    cache = KVCache()
    with torch.no_grad():
        logits = step(prompt_1T, cache)
        out: list[int] = []
        for _ in range(n_new):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = step(torch.tensor([[nxt]]), cache)
    return out


def greedy_rescoring(model: ModularLM, prompt_1T: torch.Tensor, n_new: int) -> list[int]:
    """Greedy decoding as before the KV cache: every step runs the whole context."""
    ids = prompt_1T
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(ids, aux="none").logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Training, prefill and generation tokens/s of the modular small model\n"
        "vs a dense SDPA model of equal active parameters, with the ratio\n"
        "(what is timed: this file's docstring; numbers: docs/kernels.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before generation")
    ap.add_argument("--new", type=int, default=256, help="tokens generated")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")
    ap.add_argument("--profile", choices=MODES, help="also profile the modular side of a mode")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, short sequences")
    ap.add_argument("--vs-rescoring", action="store_true",
                    help="also time the modular generation without the cache")  # fmt: skip
    ap.add_argument("--kernels", default="auto", choices=("auto", "cpu", "reference"),
                    help="the modular model's kernel backend (reference: the PyTorch "
                    "references, what CPU modules ran before the cpu backend)")  # fmt: skip
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: {', '.join(unknown) or 'none given'}; choose from {', '.join(MODES)}")
    for name in ("batch", "seq", "reps", "prompt", "new", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    preset = "tiny" if args.smoke else args.preset
    B, T = (2, 32) if args.smoke else (args.batch, args.seq)
    n_prompt, n_new = (4, 8) if args.smoke else (args.prompt, args.new)
    reps = 1 if args.smoke else args.reps
    cfg = ModelConfig.from_name(preset)
    if n_prompt + n_new > cfg.max_seq_len:
        raise SystemExit(f"--prompt + --new must fit max_seq_len {cfg.max_seq_len}")
    torch.manual_seed(0)
    modular = ModularLM(cfg, device=dev, kernels=args.kernels)
    dense = DenseLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.att_top_k * cfg.att_heads,
                    cfg.att_heads, cfg.head_dim, cfg.ffn_top_k * cfg.d_ffn)  # fmt: skip
    n_mod = sum(p.numel() for p in modular.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    header(f"Whole model at {preset} on the CPU: ModularLM (backend "
           f"{modular.backend.name}) vs dense SDPA", dev)  # fmt: skip
    print(f"# torch threads {torch.get_num_threads()}; batch {B} x {T} tokens (train, "
          f"prefill); generation: batch 1, {n_prompt}-token prompt, {n_new} new tokens, "
          f"KV cache; modular total params {n_mod / 1e6:.2f} M, dense (= modular active) "
          f"{n_dense / 1e6:.2f} M; float32")  # fmt: skip

    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    prompt = ids[:1, :n_prompt]

    def modular_train() -> None:
        out = modular(inp)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tgt.flatten())
        loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()  # type: ignore[no-untyped-call]

    def dense_train() -> None:
        logits = dense(inp)
        F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten()).backward()  # type: ignore[no-untyped-call]

    def modular_prefill() -> Any:
        with torch.no_grad():
            return modular(inp, aux="none").logits

    def dense_prefill() -> Any:
        with torch.no_grad():
            return dense(inp)

    def modular_step(x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        logits: torch.Tensor = modular(x, aux="none", cache=cache).logits
        return logits

    def dense_step(x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return dense_forward(dense, x, cache)

    def modular_generate() -> list[int]:
        return greedy(modular_step, prompt, n_new)

    def dense_generate() -> list[int]:
        return greedy(dense_step, prompt, n_new)

    fns = {
        "train": (modular_train, dense_train, B * T),
        "prefill": (modular_prefill, dense_prefill, B * T),
        "generate": (modular_generate, dense_generate, n_new),
    }
    for mode in modes:
        fm, fd, tokens = fns[mode]
        results = {}
        for name, fn in (("modular", fm), ("dense", fd)):
            results[name] = tokens / bench(fn, dev, warmup=1, reps=reps)
            modular.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
        m, d = results["modular"], results["dense"]
        print(f"{mode:<8} tokens/s: modular {m:,.0f} | dense {d:,.0f} | modular/dense {m / d:.2f}x",
              flush=True)  # fmt: skip

    if args.vs_rescoring:
        cached: list[int] = []
        rescored: list[int] = []

        def run_cached() -> None:
            cached[:] = modular_generate()

        def run_rescoring() -> None:
            rescored[:] = greedy_rescoring(modular, prompt, n_new)

        c = n_new / bench(run_cached, dev, warmup=1, reps=reps)
        r = n_new / bench(run_rescoring, dev, warmup=1, reps=reps)
        same = "same tokens" if cached == rescored else "DIFFERENT tokens"
        print(f"cache    tokens/s: modular cached {c:,.0f} | rescoring {r:,.0f} | "
              f"cached/rescoring {c / r:.2f}x ({same})", flush=True)  # fmt: skip

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        fn = fns[args.profile][0]
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        modular.zero_grad(set_to_none=True)
        print(f"# profile of modular {args.profile} (self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
