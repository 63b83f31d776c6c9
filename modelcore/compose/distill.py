"""Distillation: one student trained on the ensemble's distributions (KL) over domain text.

Shape legend: P teacher experts, B batch, T length, V vocab.

The teacher is the DEMix ensemble (``ExpertEnsemble``) with posterior weights and a prior
cached on the domain's text; at every position it gives the full mixed distribution
``q_t = sum_j P(j | x_<t) p_j(. | x_<t)``. The student minimises ``KL(q_t || s_t)``
averaged over positions (Hinton et al. 2015; the c-BTM and BTM papers suggest distilling
the ensemble back into one model for deployment). Two students:

* ``expert``: one new module per MoE layer inserted into the same frozen base, exactly
  like ``train.train_expert`` (same router calibration, same freezing), but trained on
  the teacher's probabilities instead of the one-hot next token. It covers the layers
  the teacher's experts cover together (``ExpertEnsemble.layers``; ``layers=`` to
  choose): a layer no teacher expert covers is the base in every path, and the student
  is no larger than its inputs (docs/composition.md, "Experts in some layers only");
* ``dense``: a smaller standalone ``ModularLM`` (fewer layers, narrower; one FFN module,
  i.e. dense) on the base's tokenizer, for deployment without the base.

Resumable: ``checkpoint_dir`` receives, every ``checkpoint_every`` steps, the student's
trainable tensors (``student.safetensors``), AdamW's moments and step counts
(``optimizer.safetensors``) and a JSON state (step, loss curves, settings). No pickle.
The batch stream is a pure function of its seed, so a resumed run skips the batches it
has consumed and continues with bit-identical updates (a test holds this).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from modelcore import experts as expert_ops
from modelcore import losses
from modelcore.compose.ensemble import ExpertEnsemble, posterior_log_weights
from modelcore.config import ModelConfig
from modelcore.experts import _atomic_write
from modelcore.model import ModularLM
from modelcore.train.loop import cosine_lr, default_warmup

STATE_FORMAT = "agora.distill/1"
STUDENTS = ("expert", "dense")


@dataclass
class DistillSettings:
    student: str = "expert"
    steps: int = 100
    lr: float = 1e-2
    seed: int = 0
    clip: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    # Weight of the next-token NLL on the text itself next to the KL (Hinton et al. 2015
    # mix soft and hard targets); 0 = pure distillation.
    hard_weight: float = 0.0
    routing_reg: float = 0.0  # expert student: weight of ||new router rows|| (as insertion)


@dataclass
class DistillResult:
    student: nn.Module
    kl: list[float] = field(default_factory=list)  # KL(teacher || student) per step, nats
    lm: list[float] = field(default_factory=list)  # the student's next-token NLL per step
    module_idx: list[int] | None = None  # expert student: the inserted module per layer
    resumed_from: int = 0

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        if self.module_idx is None:
            raise ValueError("a dense student is not an expert")
        tensors = expert_ops.extract_expert(self.student, self.module_idx)
        return {k: v.detach().cpu() for k, v in tensors.items()}


def dense_student_config(
    base: ModelConfig, *, n_layers: int | None = None, d_model: int | None = None
) -> ModelConfig:
    """A smaller dense LM: half the layers and width of the base, one FFN module (top-1),
    one attention expert; same vocabulary."""
    d = d_model or max(16, base.d_model // 2)
    return base.replace(
        name=f"{base.name}-dense-student",
        n_layers=n_layers or max(1, base.n_layers // 2),
        d_model=d,
        att_experts=1,
        att_top_k=1,
        head_dim=max(8, base.head_dim // 2) + (max(8, base.head_dim // 2) % 2),
        ffn_experts=1,
        ffn_top_k=1,
        d_ffn=max(16, base.d_ffn * base.ffn_top_k // 2),
        aux="none",
    )


@torch.no_grad()
def teacher_log_probs(
    teacher: ExpertEnsemble, batch_BT1: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """The ensemble's mixed next-token log-distribution at every position: (B, T, V)."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    h_PBTD = teacher.hidden(inputs_BT)
    ll = []
    for logits_BTV in teacher.path_logits(h_PBTD):
        lg = logits_BTV.float()
        ll.append(lg.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1) - lg.logsumexp(-1))
    log_w_PBT = posterior_log_weights(torch.stack(ll), log_prior.to(batch_BT1.device))
    return teacher.mixture_log_probs(inputs_BT, log_w_PBT, h_PBTD)


def _kl(teacher_BTV: torch.Tensor, student_logits_BTV: torch.Tensor) -> torch.Tensor:
    log_s = F.log_softmax(student_logits_BTV.float(), dim=-1)
    return (teacher_BTV.exp() * (teacher_BTV - log_s)).sum(-1).mean()


def _trainable(student: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in student.named_parameters() if p.requires_grad}


def _save_checkpoint(
    directory: Path, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    params = _trainable(student)
    tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
    opt: dict[str, torch.Tensor] = {}
    index = {id(p): n for n, p in params.items()}
    for p, s in optimizer.state.items():
        name = index[id(p)]
        for key, value in s.items():
            opt[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    _atomic_write(directory / "student.safetensors", lambda t: save_file(tensors, t))
    _atomic_write(directory / "optimizer.safetensors", lambda t: save_file(opt, t))
    # The JSON state goes last: a checkpoint is complete when state.json names its step.
    payload = (json.dumps(state, indent=1) + "\n").encode()
    _atomic_write(directory / "state.json", lambda t: Path(t).write_bytes(payload))


def _load_checkpoint(
    directory: Path, student: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    state = json.loads((directory / "state.json").read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory} is not a distillation checkpoint")
    params = _trainable(student)
    tensors = load_file(str(directory / "student.safetensors"))
    if sorted(tensors) != sorted(params):
        raise ValueError("the checkpoint's student does not match this student's parameters")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    opt = load_file(str(directory / "optimizer.safetensors"))
    for n, p in params.items():
        entry = {
            k.split("::", 1)[1]: v.to(p.device) for k, v in opt.items() if k.startswith(n + "::")
        }
        if entry:
            entry["step"] = entry["step"].cpu()
            optimizer.state[p] = entry
    return state


def distill(
    base: nn.Module,
    teacher: ExpertEnsemble,
    make_batches: Callable[[], Iterator[torch.Tensor]],
    log_prior: torch.Tensor,
    settings: DistillSettings,
    *,
    student_config: ModelConfig | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    layers: Sequence[int] | None = None,
) -> DistillResult:
    """Train a student (``settings.student``) on the teacher's distributions.

    ``layers`` (expert student): the MoE layers it covers; None: those the teacher's
    experts cover (``teacher.layers``).

    ``make_batches()`` must return the same (B, T+1) stream every call (a seeded
    generator): resuming skips the batches already consumed. The base is not modified
    (an expert student is inserted into a copy of it).
    """
    if settings.student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}")
    torch.manual_seed(settings.seed)
    device = next(base.parameters()).device
    batches = make_batches()
    module_idx: list[int] | None = None
    if settings.student == "expert":
        from modelcore.train.insertion import calibrate_new_rows

        student: nn.Module = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(settings.seed)
        module_idx = expert_ops.add_modules(
            student, None, generator=generator, layers=teacher.layers if layers is None else layers
        )
        # Same calibration as train_expert, on batches that are not consumed (a fresh
        # stream), so the training batches are identical with and without resume.
        calib = make_batches()
        calibrate_new_rows(student, module_idx, [next(calib), next(calib)])
        expert_ops.freeze_for_insertion(student, module_idx)
    else:
        config = student_config or dense_student_config(base.config)
        student = ModularLM(config, device=device)
    params = list(_trainable(student).values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)
    result = DistillResult(student=student, module_idx=module_idx)
    start = 0
    if resume is not None:
        state = _load_checkpoint(Path(resume), student, optimizer)
        saved = state["settings"]
        for key in ("student", "seed", "steps"):
            if saved[key] != getattr(settings, key):
                raise ValueError(f"checkpoint was made with {key}={saved[key]!r}")
        start = int(state["step"])
        result.kl, result.lm = list(state["kl"]), list(state["lm"])
        result.resumed_from = start
        for _ in range(start):
            next(batches)
    warmup = default_warmup(settings.steps)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    student.train()
    teacher.model.eval()
    for step in range(start, settings.steps):
        step_lr = cosine_lr(step, total=settings.steps, peak=settings.lr, warmup=warmup)
        for g in optimizer.param_groups:
            g["lr"] = step_lr
        batch = next(batches).to(device)
        target = teacher_log_probs(teacher, batch, log_prior)
        logits = student(batch[:, :-1], aux="none").logits
        kl = _kl(target, logits)
        loss = kl
        if settings.hard_weight:
            hard = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss = (1 - settings.hard_weight) * kl + settings.hard_weight * hard
        if settings.routing_reg and module_idx is not None:
            rows = expert_ops.router_rows(student, module_idx)
            loss = loss + settings.routing_reg * losses.routing_reg(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        optimizer.step()
        result.kl.append(float(kl.detach()))
        with torch.no_grad():
            result.lm.append(
                float(
                    F.cross_entropy(logits.detach().flatten(0, 1).float(), batch[:, 1:].flatten())
                )
            )
        if on_step is not None:
            on_step(step, result.kl[-1])
        done = step + 1
        if ckpt is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            _save_checkpoint(
                ckpt,
                student,
                optimizer,
                {
                    "format": STATE_FORMAT,
                    "step": done,
                    "settings": asdict(settings),
                    "kl": result.kl,
                    "lm": result.lm,
                    "module_idx": module_idx,
                    "student_config": student.config.to_dict(),
                },
            )
    return result


def describe(result: DistillResult) -> Mapping[str, Any]:
    return {
        "steps": len(result.kl),
        "resumed_from": result.resumed_from,
        "kl_first": result.kl[0] if result.kl else None,
        "kl_final": sum(result.kl[-10:]) / max(1, len(result.kl[-10:])) if result.kl else None,
        "kl_curve": result.kl,
        "lm_curve": result.lm,
    }
