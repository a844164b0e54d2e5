"""Training: the loop, preemption-safe checkpoints, exact resume, pretrain -> fine-tune."""
from .checkpoint import CheckpointDir, tag_for
from .trainer import Trainer, TrainingError, run_training

__all__ = ["CheckpointDir", "Trainer", "TrainingError", "run_training", "tag_for"]
