"""Fine-tuning: config dataclass, data formats and batching, the training loop, checkpoints, demo task.

``fourbit.train.train(config, model, tokenizer)`` runs QLoRA/LoRA fine-tuning; ``TrainConfig`` holds every
option (QLoRA paper defaults). See ``fourbit finetune --help`` for the CLI.
"""

from fourbit.train.config import TrainConfig
from fourbit.train.loss import chunked_cross_entropy
from fourbit.train.optimizers import build_optimizer
from fourbit.train.prepare import prepare_model_for_training
from fourbit.train.trainer import TrainResult, evaluate, prepare_data, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "chunked_cross_entropy",
    "evaluate",
    "prepare_data",
    "prepare_model_for_training",
    "train",
]
