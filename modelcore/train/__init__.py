"""Training for modelcore: base pretraining (with gradual modularization), expert
insertion against a frozen base, load-concentration finetuning, full finetuning.

All modes run the same loop (``loop.run_training``: AdamW, cosine schedule with warmup,
gradient clipping, deterministic seeding, a rich progress bar on stderr) and return a
``TrainResult`` with the per-step loss curve.
"""

from modelcore.train.finetune import finetune_concentration, finetune_full
from modelcore.train.insertion import ExpertTraining, train_expert
from modelcore.train.loop import TrainResult, cosine_lr, run_training
from modelcore.train.pretrain import pretrain, set_dense

__all__ = [
    "ExpertTraining",
    "TrainResult",
    "cosine_lr",
    "finetune_concentration",
    "finetune_full",
    "pretrain",
    "run_training",
    "set_dense",
    "train_expert",
]
