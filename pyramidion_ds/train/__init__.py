"""Training: the loop, preemption-safe checkpoints, exact resume, pretrain -> fine-tune."""
from .trainer import Trainer, TrainingError, run_training

__all__ = ["Trainer", "TrainingError", "run_training"]
