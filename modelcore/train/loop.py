"""The one optimisation loop every training mode of modelcore runs.

Pretraining, expert insertion, load-concentration finetuning and full finetuning differ
only in *which* parameters train and *what* the objective adds to the language-model
loss; everything else (AdamW, cosine schedule with linear warmup, gradient clipping,
deterministic seeding, the progress bar, the returned loss curve) lives here, once.

Shape legend: B batch, T tokens per row, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

# An objective maps (model, batch_BT1) to (loss to minimise, scalar metrics to log).
# batch_BT1 holds T+1 token ids per row: inputs are [:, :-1], targets [:, 1:].
Objective = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    """What a training run returns: per-step curves, for plots, tests and reports."""

    losses: list[float] = field(default_factory=list)  # the LM loss (nats/token) per step
    metrics: dict[str, list[float]] = field(default_factory=dict)  # aux terms per step
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean LM loss of the last tenth of the run (a single step is too noisy)."""
        if not self.losses:
            return float("nan")
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def cosine_lr(step: int, *, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``floor * peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def default_warmup(steps: int) -> int:
    # 5% of the run, at least one step: long enough for Adam's second moments to settle
    # (the first few updates are the largest), short enough not to waste tiny runs.
    return max(1, steps // 20)


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    # Decay matrices only; biases, norms' gains and 1-d vectors are not regularised.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def progress_bar(description: str, total: int, enabled: bool):
    """A rich progress bar on stderr (stdout stays free for JSON), or a no-op."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def run_training(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    objective: Objective,
    *,
    steps: int,
    lr: float,
    params: list[nn.Parameter] | None = None,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    clip: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.95),
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Minimise ``objective`` for ``steps`` batches with AdamW; return the curves.

    ``params`` defaults to every parameter that requires grad. ``on_step(step)`` runs
    before each step (the pretraining loop uses it to leave the dense phase).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    torch.manual_seed(seed)
    candidates = params if params is not None else list(model.parameters())
    trainable = [p for p in candidates if p.requires_grad]
    result = TrainResult()
    if steps == 0:
        return result
    if not trainable:
        raise ValueError("nothing to train: no parameter requires grad")
    warmup = default_warmup(steps) if warmup is None else warmup
    optimizer = torch.optim.AdamW(
        _param_groups(trainable, weight_decay), lr=lr, betas=betas, eps=1e-8
    )
    device = next(iter(trainable)).device
    was_training = model.training
    model.train()
    iterator: Iterator[torch.Tensor] = iter(batches)
    try:
        with progress_bar(description, steps, progress) as bar:
            task = bar.add_task(description, total=steps, info="")
            for step in range(steps):
                if on_step is not None:
                    on_step(step)
                step_lr = cosine_lr(step, total=steps, peak=lr, warmup=warmup)
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                try:
                    batch_BT1 = next(iterator)
                except StopIteration:
                    raise ValueError(
                        f"the batch iterator ran out after {step} of {steps} steps"
                    ) from None
                loss, metrics = objective(model, batch_BT1.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
                optimizer.step()
                lm = metrics.get("lm", float(loss.detach()))
                result.losses.append(lm)
                result.lrs.append(step_lr)
                result.grad_norms.append(float(norm))
                for name, value in metrics.items():
                    if name != "lm":
                        result.metrics.setdefault(name, []).append(value)
                bar.update(task, advance=1, info=f"loss {lm:.3f}")
    finally:
        model.train(was_training)
    return result
