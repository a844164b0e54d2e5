"""Training: the loop, preemption-safe checkpoints, exact resume, pretrain -> fine-tune."""

from .trainer import Trainer, TrainingError, check_training, run_training

__all__ = ["Trainer", "TrainingError", "check_training", "run_training"]
