"""Training: the loop, preemption-safe checkpoints, exact resume, pretrain -> fine-tune."""
from .checkpoint import CheckpointDir, tag_for
from .trainer import Trainer, TrainingError, check_training, run_training

__all__ = ["CheckpointDir", "Trainer", "TrainingError", "check_training", "run_training", "tag_for"]
