"""Training section of the config: optimisation, schedule, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass

from .core import ConfigError, option


@dataclass
class TrainConfig:
    save_dir: str = option("runs/debug", "run directory: checkpoints, resolved config, tensorboard logs")
    deepspeed_config: str = option(
        "zero2_cpu",
        "DeepSpeed JSON (ZeRO stage, offload, precision): a path, or the "
        "name of a shipped one (ds_configs/NAME.json, e.g. zero3_bf16); merged with "
        "this config and checked against it",
    )
    seed: int = option(1, "random seed (model init, sampler, noise)")
    max_update: int = option(0, "stop after this many updates; 0 = no limit", min=0)
    max_epoch: int = option(0, "stop after this many epochs; 0 = no limit", min=0)
    update_freq: int = option(1, "gradient accumulation: micro-batches per update", min=1)
    precision: str = option(
        "auto",
        "auto (whatever the DeepSpeed JSON enables, else fp32), fp32, bf16, or fp16 (dynamic loss scale)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    optimizer: str = option(
        "adamw", "optimizer (DeepSpeed FusedAdam where it builds, else torch AdamW)", choices=("adamw",)
    )
    lr: float = option(5e-4, "peak learning rate", greater_than=0.0)
    adam_betas: list[float] = option([0.9, 0.98], "Adam betas", min=0.0, max=1.0)
    adam_eps: float = option(1e-8, "Adam epsilon", greater_than=0.0)
    weight_decay: float = option(0.01, "decoupled weight decay", min=0.0)
    scorer_lr_scale: float = option(
        1.0,
        "the top-k scorers' parameters (encoder.scorers.*) learn at lr x this "
        "(0.1 keeps their ranking stable on the synthetic task)",
        greater_than=0.0,
    )
    clip_norm: float = option(1.0, "clip gradients to this global norm; 0 = off", min=0.0)
    lr_scheduler: str = option(
        "polynomial_decay", "learning-rate schedule", choices=("polynomial_decay", "inverse_sqrt", "fixed")
    )
    warmup_updates: int = option(0, "linear warmup updates", min=0)
    total_num_update: int = option(0, "updates over which polynomial decay runs; 0 = max_update", min=0)
    end_learning_rate: float = option(0.0, "learning rate at the end of polynomial decay", min=0.0)
    power: float = option(1.0, "power of the polynomial decay", greater_than=0.0)
    label_smoothing: float = option(0.1, "label-smoothed cross-entropy epsilon; 0 = plain CE", min=0.0, max=1.0)
    activation_checkpointing: str = option(
        "off", "recompute activations per pyramid stage, per layer, or off", choices=("off", "stage", "layer")
    )
    validate_interval_updates: int = option(0, "validate every N updates; 0 = once per epoch", min=0)
    save_interval_updates: int = option(0, "checkpoint every N updates; 0 = at validation", min=0)
    keep_last_checkpoints: int = option(2, "checkpoints kept besides the best; 0 = keep all", min=0)
    best_checkpoint_metric: str = option("loss", "validation metric deciding the best checkpoint")
    maximize_best_checkpoint_metric: bool = option(False, "higher metric is better (e.g. rouge)")
    patience: int = option(-1, "stop after this many validations without improvement; -1 = never", min=-1)
    log_interval: int = option(10, "log every N updates", min=1)
    tensorboard_logdir: str = option("", "tensorboard event directory; empty = SAVE_DIR/tensorboard")
    init_from: str = option("", "load model weights only from a run dir or export dir (pretrain -> fine-tune)")
    resume: bool = option(True, "continue from the latest complete checkpoint in save_dir, if any")
    compile: bool = option(
        False,
        "torch.compile the model through DeepSpeed's engine.compile() (GPU; "
        "fuses the top-k rounds and elementwise chains, cuts kernel launches)",
    )
    compile_mode: str = option(
        "default",
        "torch.compile mode under train.compile: reduce-overhead also "
        "replays each step from a CUDA graph (see docs/performance.md for when it helps)",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    peak_tflops: float = option(0.0, "accelerator peak TFLOP/s for MFU; 0 = known GPUs only (H100 bf16: 989)", min=0.0)
    max_nonfinite_steps: int = option(
        3,
        "stop after this many consecutive updates skipped for a non-finite "
        "loss or gradient (bf16/fp32; fp16 has its loss scaler)",
        min=1,
    )
    force_unlock: bool = option(
        False,
        "take save_dir/.lock even if it names a trainer on another host (only "
        "where the filesystem has no flock; make sure that job is gone)",
    )
    validate_rouge_examples: int = option(0, "also generate and score ROUGE on this many validation examples", min=0)

    def validate(self) -> None:
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas: got {self.adam_betas!r}, expected two numbers")
