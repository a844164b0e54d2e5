"""The training loop: one code path from 1 CPU process to many GPUs.

pyramidion-train CONFIG  ->  run_training(cfg)
    init_distributed (launcher-agnostic)  ->  data (token-budget batches, rank shards)
    ->  engine (DeepSpeed)  ->  resume / init-from  ->  loop:
          update = update_freq micro-batches (engine.backward / engine.step)
          every log_interval:      tensorboard + progress bar (loss, lr, grad norm, tokens/s, MFU)
          every validate interval: valid loss/ppl, best checkpoint, patience
          on SIGTERM/SIGUSR1:      finish the update, save, exit EXIT_PREEMPTED (launcher requeues)
          non-finite loss/grads:   skip the update (weights, optimizer, LR schedule unchanged)
    SAVE_DIR/.lock held by rank 0 from before its first write; the ranks stop if their launcher dies
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..checkpoint.files import install_checkpoint_files, no_space_message
from ..checkpoint.manifest import CheckpointDir, tag_for, write_text_atomic
from ..config import Config, ConfigError, save_resolved
from ..data.selection import batch_documents, selection_scalars
from ..engine import (
    build_engine,
    build_model,
    label_smoothed_nll_loss,
)
from ..engine.nonfinite import local_grads_nonfinite, skipped_step
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED, UsageError
from ..logs import setup_logging
from . import preflight, resume
from .lock import RunDirLock, RunDirLocked
from .state import LauncherWatchdog, PreemptionFlag, ignore_stop_signals, seed_everything

log = logging.getLogger(__name__)

#: known dense bf16 peaks (TFLOP/s) for MFU when train.peak_tflops is 0
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...): the message names the step."""


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Meters:
    """Sums over the updates since the last log line (this rank's share), and the training time they took:
    the wall time since the last reset less the time :meth:`paused` (validation, checkpoint saving)."""

    loss: float = 0.0
    nll: float = 0.0
    ntokens: int = 0
    src_tokens: int = 0
    tgt_tokens: int = 0
    flops: float = 0.0
    updates: int = 0
    paused_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    started: float | None = None

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    def reset(self):
        self.__init__(clock=self.clock)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time: left out of :meth:`elapsed` (so of tokens/s)."""
        start = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - start

    def elapsed(self) -> float:
        """Seconds spent training since the last reset."""
        return max(self.clock() - self.started - self.paused_s, 1e-9)


class Trainer:
    def __init__(self, cfg: Config, world, preempt: PreemptionFlag | None = None):
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.train.save_dir)
        self.ckpt = CheckpointDir(self.run_dir)
        self.rank, self.world_size = world.rank, world.world_size
        self.update = 0
        self.epoch = 1
        self.epoch_position = 0  # batches of this epoch trained on (this rank)
        self.best: dict = {"metric": cfg.train.best_checkpoint_metric, "value": None, "tag": None}
        self.bad_validations = 0
        self.valid_history: list[dict] = []
        self.nonfinite_streak = 0
        self.preempt = preempt or PreemptionFlag()
        self.writer = None  # rank 0's tensorboard SummaryWriter, from setup()
        self.notes: list[str] = []  # check()'s warnings, logged by setup() once train.log is open
        self.verify = True  # how check() verifies checksums: on the ranks, or sizes only (--check-only)
        # found and verified by check()
        self.vocab_size: int | None = None
        self.spm_hash: str | None = None
        self.spm_id: str | None = None
        self.ds_config: dict | None = None  # the DeepSpeed JSON merged with this config
        self.train_data = self.valid_data = None  # the opened splits
        self.resume_from = None  # CheckpointInfo of the checkpoint a resume continues, None = from scratch
        self.layout_change: str | None = None  # how resume_from's world size / ZeRO stage differ from this run's
        self.init_source = None  # InitSource of --train.init_from
        # built by setup()
        self.train_sampler = None
        self.valid_batches: list[list[int]] = []
        self.bundle = self.engine = self.model = None
        self.checkpoint_files = None
        self.peak_flops = 0.0
        self.pooling_sums: dict[str, list[float]] = {}
        self.valid_pooling: list | None = None  # EncoderOut.pooling of validate()'s forwards

    # ------------------------------------------------------------------ setup
    def check(self, verify: bool = True) -> None:
        """Everything that can be wrong with the inputs, before the first byte is written to save_dir:
        the vocabulary, the model config, the DeepSpeed JSON (our merge, then DeepSpeed's own parser), the
        data splits, the checkpoint a resume would continue (complete, checksums, same vocabulary) and
        ``--init-from``. Every rank runs it; checksums are spread over the ranks (``verify=False``: sizes only,
        as the launch scripts' quick check before the ranks start). Its warnings (a skipped corrupt checkpoint)
        are logged by setup(), once train.log is open, or here when a check fails."""
        self.notes = []
        self.verify = (lambda info: resume.verify_on_ranks(self, info)) if verify else False
        try:
            self._check()
        except Exception:
            self.log_notes()
            raise

    def log_notes(self) -> None:
        for note in self.notes:
            log.warning(note)
        self.notes = []

    def _check(self) -> None:
        preflight.check_inputs(self)

    def setup(self) -> None:
        """Write the run dir's description, build data and engine, resume or init. Checks are in check()."""
        cfg = self.cfg
        if self.ds_config is None:
            self.check()
        self.log_notes()
        seed_everything(cfg.train.seed)
        if cfg.train.resume:
            log.info(resume.describe(self))
            resume.prepare(self)  # a checkpoint of another layout: converted before anything else is written

        if self.rank == 0:  # the run dir describes itself: configs + vocabulary
            save_resolved(cfg, self.run_dir)
            write_text_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
            from ..data.tokenizer import copy_tokenizer, tokenizer_meta

            if tokenizer_meta(cfg.data.data) is not None:  # an imported tokenizer (pyramidion-import)
                copy_tokenizer(cfg.data.data, self.run_dir)
            else:
                tmp = self.run_dir / ".spm.model.tmp"
                shutil.copyfile(Path(cfg.data.data) / "spm.model", tmp)
                tmp.replace(self.run_dir / "spm.model")
        self._barrier()

        self.build_data()
        self.bundle = build_engine(cfg, self.ds_config, build_model(cfg, self.ds_config))
        self.engine, self.model = self.bundle.engine, self.bundle.model
        # DeepSpeed saves and loads through it: files hashed while written, never unpickled unsafely
        self.checkpoint_files = install_checkpoint_files(self.engine)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        log.info(
            f"model: {cfg.model.variant} preset={cfg.model.preset} params={n_params / 1e6:.2f}M "
            f"encoder widths={cfg.model.encoder_widths()} | ZeRO-{self.bundle.zero_stage} "
            f"{self.bundle.precision} optimizer={self.bundle.optimizer_name} "
            f"checkpointing={cfg.train.activation_checkpointing} world={self.world}"
        )
        self.peak_flops = self._peak_flops()
        self.model.encoder.register_forward_hook(self._pooling_hook)

        resumed = resume.resume(self) if cfg.train.resume else False
        if not resumed and cfg.train.init_from:
            resume.init_from(self)
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.train.tensorboard_logdir or str(self.run_dir / "tensorboard"))

    def open_data(self) -> None:
        """Open the train and valid splits (headers, sizes and vocabulary are checked on opening)."""
        from ..data import SummarizationDataset, pretraining_dataset

        cfg, m = self.cfg, self.cfg.model

        def dataset(split):
            if cfg.data.task != "summarization":
                return pretraining_dataset(
                    cfg.data.task,
                    cfg.data.data,
                    split,
                    m.max_source_positions,
                    m.max_target_positions,
                    cfg.data,
                    seed=cfg.train.seed,
                )
            return SummarizationDataset(
                cfg.data.data, split, m.max_source_positions, m.max_target_positions, truncate=cfg.data.truncate_source
            )

        self.train_data = dataset(cfg.data.train_subset)
        self.valid_data = dataset(cfg.data.valid_subset)

    def build_data(self) -> None:
        from ..data import ShardedBatchSampler, make_batches

        cfg = self.cfg

        def batches_for(ds, shuffle_seed):  # under train.compile: few batch shapes, bounded recompiles
            return lambda epoch: make_batches(
                ds.src_sizes,
                max_tokens=cfg.data.max_tokens,
                max_sentences=cfg.data.max_sentences,
                pad_to_multiple=cfg.source_pad_multiple,
                seed=shuffle_seed,
                epoch=epoch,
                required_batch_size_multiple=cfg.batch_size_multiple,
            )

        self.train_sampler = ShardedBatchSampler(
            batches_for(self.train_data, cfg.train.seed),
            self.rank,
            self.world_size,
            cfg.train.seed,
            update_freq=cfg.train.update_freq,
        )
        self.valid_batches = batches_for(self.valid_data, cfg.train.seed)(0)
        log.info(
            f"data: {len(self.train_data)} train / {len(self.valid_data)} valid examples "
            f"({cfg.data.task}), max_tokens={cfg.data.max_tokens}, padded to multiples of "
            f"{cfg.source_pad_multiple}"
        )

    def _loader(self, dataset, batches):
        from ..data import collate
        from ..data.batching import pad_target

        cfg, m = self.cfg, self.cfg.model
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.cfg.data.num_workers,
            collate_fn=lambda samples: pad_target(
                collate(
                    samples,
                    pad_id=m.pad_id,
                    bos_id=m.start_id,
                    eos_id=m.eos_id,
                    pad_to_multiple=cfg.source_pad_multiple,
                ),
                cfg.target_pad_multiple,
                m.pad_id,
            ),
            worker_init_fn=ignore_stop_signals,  # a job-wide SIGTERM must reach the rank only
            # its own generator: creating a loader iterator must not draw from the global RNG that
            # dropout uses, or a resumed run would see other dropout masks than an uninterrupted one
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
            persistent_workers=False,
        )

    # ------------------------------------------------------------------ steps
    def _batch_to_device(self, batch: dict) -> dict:
        device = self.engine.device
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _flags(self, nonfinite=0.0) -> tuple[bool, bool]:
        """All ranks agree on (any rank saw a non-finite loss or gradient, any rank was asked to stop).

        ``nonfinite``: a bool or a 0-dim tensor on the engine's device (no host sync before the all-reduce).
        """
        flags = torch.stack(
            [
                torch.as_tensor(nonfinite, dtype=torch.float32, device=self.engine.device).reshape(()),
                torch.tensor(float(self.preempt.requested), device=self.engine.device),
            ]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def train_micro_batch(self, batch: dict, pending: dict, last: bool) -> None:
        """Forward/backward one micro-batch; its sums wait in ``pending`` until the update is applied.

        Every micro-batch but the update's last is followed by ``engine.step()`` (DeepSpeed counts
        micro-batches there to find the accumulation boundary); the last one's is in finish_update."""
        batch = self._batch_to_device(batch)
        logits = self.engine(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
        loss_sum, nll_sum = label_smoothed_nll_loss(
            logits, batch["target"], self.cfg.train.label_smoothing, self.cfg.model.pad_id
        )
        ntokens = max(1, int(batch["ntokens"]))
        loss = loss_sum / ntokens
        pending["loss_nonfinite"] = pending.get("loss_nonfinite", 0) + (~torch.isfinite(loss.detach())).float()
        self.engine.backward(loss)  # also for a non-finite loss: the whole update is skipped then
        if not last:
            self.engine.step()
        bsz, src_len = batch["src_tokens"].shape
        for key, value in (
            ("loss", float(loss_sum.detach())),
            ("nll", float(nll_sum.detach())),
            ("ntokens", ntokens),
            ("src_tokens", int(batch["src_lengths"].sum())),
            ("tgt_tokens", ntokens),
            ("flops", self.model.flops_per_step(bsz, src_len, batch["target"].shape[1])),
        ):
            pending[key] = pending.get(key, 0) + value

    def finish_update(self, meters: Meters, pending: dict) -> tuple[str | None, bool]:
        """The update's optimizer step, skipped when any rank's loss or gradients are not finite.

        Returns (what was not finite, or None when the update was applied; any rank asked to stop).
        One all-reduce carries both flags. bf16/fp32: our fused check over the reduced gradients
        (engine.nonfinite) decides; fp16: DeepSpeed's loss scaler skips overflowing steps itself.
        """
        check = self.bundle.precision != "fp16"
        loss_bad = pending.pop("loss_nonfinite", None)
        if check:
            grads_bad = local_grads_nonfinite(self.engine)
            local = grads_bad if loss_bad is None else torch.maximum(grads_bad, loss_bad.clamp(max=1))
            nonfinite, preempted = self._flags(local)
        else:
            nonfinite, preempted = self._flags(0.0)
        if nonfinite:
            with skipped_step(self.engine):
                self.engine.step()
            loss_was_bad, _ = self._flags(loss_bad if loss_bad is not None else 0.0)
            return ("loss" if loss_was_bad else "gradients"), preempted
        self.engine.step()
        if check and not self.engine.was_step_applied():  # DeepSpeed's own check found what ours did not
            return "gradients", preempted
        for key, value in pending.items():
            setattr(meters, key, getattr(meters, key) + value)
        return None, preempted

    def run(self) -> int:
        cfg = self.cfg.train
        owns_handlers = not self.preempt.installed
        if owns_handlers:
            self.preempt.install()
        _, preempted = self._flags(False)
        if preempted:  # asked to stop while starting up: nothing new to save
            log.warning(
                f"received {self.preempt.signal_name or 'a stop signal on another rank'} before the "
                f"first update; exiting with code {EXIT_PREEMPTED} so the launcher can requeue"
            )
            return EXIT_PREEMPTED
        meters = Meters()
        progress = self._progress()
        iterator = self._epoch_iterator()
        try:
            while not self._done():
                pending: dict = {}
                micro_batches = 0
                for micro in range(cfg.update_freq):
                    batch = next(iterator, None)
                    if batch is None:  # epoch over
                        self.epoch += 1
                        if self._done():
                            break
                        iterator = self._epoch_iterator()
                        batch = next(iterator)
                    self.train_micro_batch(batch, pending, last=micro == cfg.update_freq - 1)
                    self.epoch_position += 1
                    micro_batches += 1
                if micro_batches < cfg.update_freq:  # max_epoch reached inside an update: not stepped
                    break
                skipped, preempted = self.finish_update(meters, pending)
                if skipped:
                    self.nonfinite_streak += 1
                    log.warning(
                        f"non-finite {skipped} at update {self.update + 1}; update skipped "
                        f"({self.nonfinite_streak}/{cfg.max_nonfinite_steps})"
                    )
                    if self.nonfinite_streak >= cfg.max_nonfinite_steps:
                        raise TrainingError(
                            f"non-finite loss or gradients for {self.nonfinite_streak} consecutive "
                            f"updates at update {self.update + 1}; stopping without saving (latest "
                            f"complete checkpoint: {self.ckpt.read_pointer('latest') or 'none'})"
                        )
                    if preempted:
                        return self.stop_for_requeue()
                    continue
                self.nonfinite_streak = 0
                self.update += 1
                meters.updates += 1
                progress.update(1)
                if self.update % cfg.log_interval == 0:
                    self.log_train(meters, progress)
                    meters.reset()
                stop = self.after_update(meters)
                if not preempted:  # a signal during validation or a save: stop now
                    _, preempted = self._flags()
                if preempted:
                    return self.stop_for_requeue()
                if stop:
                    break
            if self.ckpt.read_pointer("latest") != tag_for(self.update):
                self.validate_and_save()
            log.info(
                f"done: {self.update} updates, best {self.best['metric']} = {self.best['value']} ({self.best['tag']})"
            )
            return EXIT_OK
        finally:
            progress.close()
            if owns_handlers:
                self.preempt.uninstall()
            if self.writer is not None:
                self.writer.close()

    def stop_for_requeue(self) -> int:
        """Save (unless this update is saved already) and return the code that asks for a requeue."""
        tag = tag_for(self.update)
        latest = [self.ckpt.read_pointer("latest")]
        dist.broadcast_object_list(latest, src=0)  # rank 0's view: save_dir may be node-local elsewhere
        if latest[0] != tag:  # not saved at this update already
            tag = self.save()
        log.warning(
            f"received {self.preempt.signal_name or 'a stop signal on another rank'}: "
            f"saved {tag} at update {self.update}; exiting with code {EXIT_PREEMPTED} "
            f"so the launcher can requeue"
        )
        return EXIT_PREEMPTED

    def _done(self) -> bool:
        cfg = self.cfg.train
        return bool(
            (cfg.max_update and self.update >= cfg.max_update) or (cfg.max_epoch and self.epoch > cfg.max_epoch)
        )

    def _epoch_iterator(self):
        self.train_sampler.set_epoch(self.epoch)
        self.epoch_position = self.train_sampler.position
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(self.epoch)
        return iter(self._loader(self.train_data, self.train_sampler))

    def after_update(self, meters: Meters | None = None) -> bool:
        """Validation / checkpoint at their intervals (time ``meters`` leaves out of tokens/s); True when
        patience ran out."""
        cfg = self.cfg.train
        validate_every = cfg.validate_interval_updates
        save_every = cfg.save_interval_updates
        paused = meters.paused() if meters is not None else contextlib.nullcontext()
        if validate_every and self.update % validate_every == 0:
            with paused:
                return self.validate_and_save()
        if save_every and self.update % save_every == 0:
            with paused:
                self.save()
        return False

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict:
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        mine = self.valid_batches[self.rank :: self.world_size]
        # every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
        # a rank with fewer batches repeats its first one and counts nothing for it
        steps = math.ceil(len(self.valid_batches) / self.world_size)
        padded = mine + [self.valid_batches[0]] * (steps - len(mine))
        self.valid_pooling, selection, after_layers = [], [], []  # the selection figure (data/selection.py)
        for i, batch in enumerate(self._loader(self.valid_data, padded)):
            batch = self._batch_to_device(batch)
            logits = self.engine(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
            pooling, self.valid_pooling = self.valid_pooling[-1] if self.valid_pooling else [], []
            if i >= len(mine):
                continue
            m, after_layers = self.cfg.model, [info.after_layer for info in pooling] or after_layers
            selection += batch_documents(
                pooling, batch["src_tokens"], batch["src_lengths"], batch["target"], {m.pad_id, m.eos_id, m.bos_id}
            )
            loss_sum, nll_sum = label_smoothed_nll_loss(
                logits, batch["target"], self.cfg.train.label_smoothing, self.cfg.model.pad_id
            )
            sums += torch.tensor([float(loss_sum), float(nll_sum), float(batch["ntokens"])], dtype=torch.float64)
        self.engine.train()
        sums = sums.to(self.engine.device)
        dist.all_reduce(sums)
        loss, nll, ntok = sums.tolist()
        stats = {"update": self.update, "loss": loss / max(ntok, 1), "nll_loss": nll / max(ntok, 1)}
        stats["ppl"] = math.exp(min(stats["nll_loss"], 50.0))
        self.valid_pooling = None
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (after_layers, selection))
        after_layers = max((layers for layers, _ in gathered), key=len)
        if self.rank == 0 and after_layers:
            from ..data.spm import load_spm

            spm = load_spm(self.cfg.data.data)
            pieces = [spm.IdToPiece(i) for i in range(spm.GetPieceSize())]
            documents = [d for _, part in gathered for d in part if len(d[1]) == len(after_layers)]
            stats.update(selection_scalars(documents, pieces, after_layers))
        return stats

    def validate_and_save(self) -> bool:
        stats = self.validate()
        metric = self.cfg.train.best_checkpoint_metric
        if metric not in stats:
            raise ConfigError(
                f"train.best_checkpoint_metric: got {metric!r}, expected one of "
                f"{', '.join(k for k in stats if k != 'update')}"
            )
        value = stats[metric]
        best = self.best["value"]
        better = best is None or (value > best if self.cfg.train.maximize_best_checkpoint_metric else value < best)
        tag = tag_for(self.update)
        if better:
            self.best = {"metric": metric, "value": value, "tag": tag}
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        self.valid_history.append(stats)
        log.info(
            f"valid | update {self.update} | loss {stats['loss']:.4f} | nll {stats['nll_loss']:.4f} | "
            f"ppl {stats['ppl']:.2f} | best {metric} {self.best['value']:.4f}"
            + ("" if better else f" | no improvement {self.bad_validations}/{self.cfg.train.patience}")
            + "".join(f" | {k} {v:.4f}" for k, v in stats.items() if k.startswith("selection/") and k.endswith("_lift"))
        )
        if self.writer is not None:
            for key in ("loss", "nll_loss", "ppl"):
                self.writer.add_scalar(f"valid/{key}", stats[key], self.update)
            for key in (k for k in stats if k.startswith("selection/")):
                self.writer.add_scalar(key, stats[key], self.update)
            self.writer.add_scalar(f"valid/best_{metric}", self.best["value"], self.update)
        self.save(best=better)
        patience = self.cfg.train.patience
        if patience >= 0 and self.bad_validations > patience:
            log.info(
                f"early stop: {metric} has not improved for {self.bad_validations} validations (patience {patience})"
            )
            return True
        return False

    # ------------------------------------------------------------------ checkpoints
    def save(self, best: bool = False) -> str:
        """Every rank writes (and hashes) its shards; rank 0 writes the manifest, then moves ``latest``.

        A full disk on any rank removes the partial checkpoint and stops the run on every rank in one line
        (TrainingError); ``latest`` still names the previous complete checkpoint."""
        tag = tag_for(self.update)
        client = resume.client_state(self)
        files = self.checkpoint_files
        files.written.clear()
        files.error = None
        if self.rank == 0:
            self.ckpt.begin(tag)
        try:
            self.engine.save_checkpoint(str(self.ckpt.root), tag=tag, client_state=client, save_latest=False)
        except OSError as err:  # outside the file writes (e.g. creating the folder)
            files.error = files.error or err
        # DeepSpeed ends save_checkpoint with a barrier: every rank's shards are on disk now
        path = self.ckpt.root / tag
        mine = (self._save_error(files.error), {os.path.relpath(p, path): v for p, v in files.written.items()})
        reports = [mine]
        if dist.is_initialized() and self.world_size > 1:
            reports = [None] * self.world_size
            dist.all_gather_object(reports, mine)
        error = next((report[0] for report in reports if report[0]), None)
        if error is None and self.rank == 0:
            try:
                digests = {name: value for _, written in reports for name, value in written.items()}
                self.ckpt.finalize(
                    tag,
                    update=self.update,
                    world_size=self.world_size,
                    digests=digests,
                    extra={
                        "epoch": self.epoch,
                        "spm_sha256": self.spm_hash,
                        "spm_identity": self.spm_id,
                        "zero_stage": self.bundle.zero_stage,
                        "micro_batches_per_update": self.world_size * self.cfg.train.update_freq,
                    },
                )
            except OSError as err:
                error = self._save_error(err)
        if dist.is_initialized() and self.world_size > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = error or shared[0]
        if error is not None:
            if self.rank == 0:
                self.ckpt.discard(tag)  # frees the space first, so the log line below can be written
            self._barrier()
            previous = self.ckpt.latest_complete(warn=lambda message: None)
            raise TrainingError(
                f"saving checkpoint {tag} at update {self.update} failed: {error}; removed the "
                f"partial checkpoint (latest complete checkpoint: "
                f"{previous.tag if previous else 'none'})"
            )
        if self.rank == 0:
            if best:
                self.ckpt.mark_best(tag)
            removed = self.ckpt.prune(self.cfg.train.keep_last_checkpoints)
            log.info(
                f"saved checkpoint {tag}"
                + (" (best)" if best else "")
                + (f"; removed {', '.join(removed)}" if removed else "")
            )
        self._barrier()
        return tag

    @staticmethod
    def _save_error(err: OSError | None) -> str | None:
        if err is None:
            return None
        return no_space_message(err) or f"{err.strerror or err} ({err.filename})"

    # ------------------------------------------------------------------ logging
    def _progress(self):
        from tqdm import tqdm

        total = self.cfg.train.max_update or None
        return tqdm(
            total=total,
            initial=self.update,
            desc="train",
            unit="upd",
            dynamic_ncols=True,
            disable=self.rank != 0,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            file=sys.stderr,
        )

    def _peak_flops(self) -> float:
        if self.cfg.train.peak_tflops:
            return self.cfg.train.peak_tflops * 1e12
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key, tflops in KNOWN_PEAK_TFLOPS.items():
                if key in name:
                    return tflops * 1e12
        return 0.0

    def log_train(self, meters: Meters, progress) -> None:
        sums = torch.tensor(
            [meters.loss, meters.nll, meters.ntokens, meters.src_tokens + meters.tgt_tokens, meters.flops],
            dtype=torch.float64,
            device=self.engine.device,
        )
        dist.all_reduce(sums)
        loss, nll, ntok, tokens, flops = sums.tolist()
        elapsed = meters.elapsed()
        stats = {
            "loss": loss / max(ntok, 1),
            "nll_loss": nll / max(ntok, 1),
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens / elapsed,
            "tflops_per_s": flops / elapsed / 1e12,
        }
        stats["ppl"] = math.exp(min(stats["nll_loss"], 50.0))
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        if self.bundle.precision == "fp16":
            stats["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", 0.0))
        if self.peak_flops:
            stats["mfu"] = flops / elapsed / (self.peak_flops * self.world_size)
        if meters.paused_s:  # validation and saving in this interval: left out of tokens/s, said how long
            stats["validate_save_s"] = meters.paused_s
        stats["peak_mem_gib"] = peak_memory_gib()
        for name, (total, count) in sorted(self.pooling_sums.items()):
            stats[f"pooling/{name}"] = total / max(count, 1)
        self.pooling_sums.clear()
        progress.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", refresh=False)
        log.info(
            f"train | update {self.update} | epoch {self.epoch} | "
            + " | ".join(f"{k} {v:.4g}" for k, v in stats.items())
        )
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(key if key.startswith("pooling/") else f"train/{key}", value, self.update)

    def _pooling_hook(self, module, inputs, encoder_out) -> None:
        """Per pooling step: mean score of the real slots kept vs of the real slots rated, in the training
        batches of the updates that are logged (the statistics are read, and synced to the host, only there)."""
        if not module.training:
            if self.valid_pooling is not None:  # validate() reads it after each forward
                self.valid_pooling.append(encoder_out.pooling)
            return
        if (self.update + 1) % self.cfg.train.log_interval:
            return
        with torch.no_grad():  # the scores as made (no detach operators: nothing here is recorded)
            for info in encoder_out.pooling:
                kept = info.top_k_scores[info.mask].float()
                rated = info.scorer_output[info.input_mask].float()
                for name, value in (
                    (f"layer{info.after_layer}_kept_score", kept.mean()),
                    (f"layer{info.after_layer}_input_score", rated.mean()),
                ):
                    total = self.pooling_sums.setdefault(name, [0.0, 0])
                    total[0] += float(value)
                    total[1] += 1

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_training(cfg: Config) -> int:
    from ..distributed import init_distributed

    # DeepSpeed calls torch.distributed APIs torch has deprecated: one warning per rank per update
    warnings.filterwarnings(
        "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
    )
    # A stop signal can come before the first update (SLURM preempts whenever it likes): record it from
    # the start, so startup is never killed half-way (e.g. inside DeepSpeed's op build, which would leave
    # a stale lock behind) and the launcher still gets the "requeue me" code.
    preempt = PreemptionFlag().install()
    watchdog, lock, world = None, None, None
    try:
        setup_logging(0)  # rank discovery logs on rank 0 only
        world = init_distributed(
            None if cfg.distributed.backend == "auto" else cfg.distributed.backend,
            timeout_minutes=cfg.distributed.timeout_minutes,
        )
        setup_logging(world.rank)
        watchdog = LauncherWatchdog(
            world.launcher in ("deepspeed", "torchrun"), lambda reason: _launcher_gone(reason, cfg, world.rank)
        ).start()
        trainer = Trainer(cfg, world, preempt)
        trainer.check()  # bad input stops here, with nothing written
        lock = lock_run_dir(cfg, world.rank)  # before the first write, or refused with nothing written
        setup_logging(world.rank, Path(cfg.train.save_dir) / "train.log")
        if lock is not None and lock.taken_over:  # logged now, so that train.log has it too
            log.warning(lock.taken_over)
        trainer.setup()
        return record_exit(trainer.run(), world.rank)
    except TrainingError as err:
        if world.rank == 0:  # every rank stops for the same reason (a global check or a gathered report)
            log.error(str(err))
        return record_exit(EXIT_ERROR, world.rank)
    except Exception:
        # anything else (e.g. gloo's "connection closed" when another rank left first because the launcher
        # died) still leaves rank 0's code for train.sh, which otherwise can only say "did not finish"
        if world is not None:
            record_exit(EXIT_ERROR, world.rank)
        raise
    finally:
        preempt.uninstall()
        if watchdog is not None:
            watchdog.stop()
        if lock is not None:
            lock.release()


def check_training(cfg: Config, world_size: int) -> int:
    """What every rank checks before writing (``Trainer.check``), run once in the launching process for a job
    of ``world_size`` ranks, so bad input is one line within seconds instead of after the launcher, rank
    start-up and DeepSpeed's op build. Checksums are left to the ranks (they share the hashing); nothing is
    written, no process group is started."""
    from ..distributed.env import World

    if world_size < 1:
        raise UsageError(f"--world-size {world_size}: expected the number of ranks the job starts (>= 1)")
    setup_logging(0)
    logging.getLogger("pyramidion_ds").setLevel(logging.WARNING)  # the ranks log the run's description
    trainer = Trainer(cfg, World(0, 0, world_size, world_size, "127.0.0.1", 0, "single"))
    trainer.check(verify=False)
    trainer.log_notes()  # e.g. a checkpoint skipped, and why
    print(check_summary(trainer, world_size))
    return EXIT_OK


def check_summary(trainer: "Trainer", world_size: int) -> str:
    """--check-only's one line: what the run will do."""
    cfg = trainer.cfg
    stage = trainer.ds_config.get("zero_optimization", {}).get("stage", 0)
    # a resume says which checkpoint, and whether its layout (ranks, ZeRO stage) is converted
    start = resume.describe(trainer) if trainer.resume_from is not None else "start at update 0"
    if trainer.resume_from is None and cfg.train.init_from:
        start += f" with the weights of {cfg.train.init_from}"
    return (
        f"check passed: {world_size} rank{'s' if world_size != 1 else ''}, ZeRO-{stage}, {start}; data "
        f"{cfg.data.data}: {cfg.data.train_subset} {len(trainer.train_data)} / {cfg.data.valid_subset} "
        f"{len(trainer.valid_data)} examples; save_dir {cfg.train.save_dir}"
    )


def lock_run_dir(cfg: Config, rank: int) -> RunDirLock | None:
    """Rank 0 takes SAVE_DIR/.lock; every rank raises the same one-line UsageError when it is refused."""
    lock, refusal = None, [None]
    if rank == 0:
        try:
            lock = RunDirLock(cfg.train.save_dir).acquire(force=cfg.train.force_unlock)
        except RunDirLocked as err:
            refusal = [str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UsageError(refusal[0])
    return lock


#: launch/local/train.sh names a file here; rank 0 writes its exit code into it. DeepSpeed's runner
#: reports success when its launcher was killed by a signal, so the script checks this instead.
EXIT_FILE_ENV = "PYRAMIDION_EXIT_FILE"


def record_exit(code: int, rank: int) -> int:
    path = os.environ.get(EXIT_FILE_ENV)
    if path and rank == 0:
        try:
            Path(path).write_text(f"{code}\n")
        except OSError as err:
            log.warning(f"could not write the exit code to {EXIT_FILE_ENV}={path}: {err}")
    return code


def _launcher_gone(reason: str, cfg: Config, rank: int) -> None:
    """LauncherWatchdog: end this rank now, without saving (see train.state)."""
    latest = CheckpointDir(cfg.train.save_dir).read_pointer("latest")
    log.error(
        f"stopping: {reason}; exiting without saving (latest complete checkpoint: {latest or 'none'}); "
        f"nothing collects this run's exit code, so restart it by hand or through the scheduler"
    )
    for handler in logging.getLogger("pyramidion_ds").handlers:
        handler.flush()
    os._exit(record_exit(EXIT_ERROR, rank))
