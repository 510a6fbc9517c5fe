"""Fine-tuning: config dataclass, data formats and batching, the training loop, checkpoints, merge.

``fourbit.train.train(config, model, tokenizer)`` runs QLoRA/LoRA fine-tuning (data-parallel on several
processes with ``world=init_world()`` under torchrun); ``TrainConfig`` holds every option (QLoRA paper
defaults); ``merge_adapter(run_dir, out_dir)`` merges the trained adapter into its base.
See ``fourbit finetune --help`` and ``fourbit merge --help`` for the CLI.
"""

from fourbit.train.config import TrainConfig
from fourbit.train.distributed import PeerLost, World, init_world
from fourbit.train.loss import chunked_cross_entropy
from fourbit.train.merge import merge_adapter
from fourbit.train.optimizers import build_optimizer
from fourbit.train.plan import RunPlan, plan_run
from fourbit.train.prepare import prepare_model_for_training
from fourbit.train.trainer import TrainingInterrupted, TrainResult, evaluate, prepare_data, train

__all__ = [
    "PeerLost",
    "RunPlan",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "World",
    "build_optimizer",
    "chunked_cross_entropy",
    "evaluate",
    "init_world",
    "merge_adapter",
    "plan_run",
    "prepare_data",
    "prepare_model_for_training",
    "train",
]
