"""Plumbing shared by the pretraining and fine-tuning loops.

:class:`Trainer` owns the device, the optimizer and learning-rate schedule, gradient
accumulation, mixed precision, DDP, logging, checkpoints and exact resume; the loops in
``pretrain.py`` and ``finetune.py`` only say how a batch becomes a loss.

Exact resume: the data order is a stream of seeded per-epoch permutations and every sample's
augmentation is seeded by (seed, epoch, index), so a run resumed from step s sees the same
batches, with the same augmentations, as a run that never stopped; the optimizer, scheduler,
RNG and noise-generator states come from the checkpoint. A run stopped in the middle of an
accumulated step saves the state at that step's start (see :meth:`Trainer.batches`).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..atomic import write_text_atomic
from ..config import save_config
from ..data.seeds import sample_seed, seeded
from ..data.shards import ShardImages
from ..models.registry import describe_model
from .checkpoint import checkpoint_path, load_resumable, save_checkpoint
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier, gather_objects
from .preemption import Preempted, StopSignals, release_at_exit, requeue_slurm_job, worker_init

log = logging.getLogger(__name__)


class StreamSampler(Sampler[int]):
    """An endless stream of per-epoch permutations, this rank's share of each, from ``start``.

    Items are coded as ``epoch * size + index`` so that :class:`SeededItems` knows the epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_rank = math.ceil(size / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad so every rank gets as many
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for index in self.epoch_indices(epoch)[offset:]:
                yield epoch * self.size + index
            epoch, offset = epoch + 1, 0


class SeededItems(Dataset):
    """Runs each item's random transforms under a seed drawn from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int) -> dict:
        epoch, index = divmod(code, len(self.dataset))
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


def training_loader(dataset: Dataset, seed: int, batch_size: int, num_workers: int, dist_info: DistInfo, start: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """This process's endless stream of batches, from its ``start``-th on (a resumed run's steps x
    accumulation): a map-style dataset through :class:`StreamSampler` and :class:`SeededItems`; tar
    shards (:class:`~ddep.data.shards.ShardImages`) order and seed themselves the same way."""
    if isinstance(dataset, ShardImages):
        data, sampler = dataset.stream(seed, dist_info.rank, dist_info.world_size, batch_size, start), None
    else:
        data = SeededItems(dataset, seed)
        sampler = StreamSampler(len(dataset), seed, dist_info.rank, dist_info.world_size, start * batch_size)
    # a generator of its own: an iterator's base seed would otherwise be drawn from the global stream that
    # dropout draws from, just after a resumed run restored it
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=True, worker_init_fn=worker_init(release_at_exit()), generator=torch.Generator().manual_seed(seed))


def parameter_groups(model: nn.Module, params: list[nn.Parameter], decoder_lr_mult: float, lr: float) -> list[Any]:
    """``params`` as the optimizer takes them: one group at ``lr``; with ``decoder_lr_mult != 1``,
    the encoder's at ``lr`` and the decoder and head's at ``lr * decoder_lr_mult`` (mmsegmentation's
    ``paramwise_cfg`` head ``lr_mult``; UniMatch V2's ``lr_multi`` 40), in that order, empty groups left out."""
    if decoder_lr_mult == 1:
        return params
    encoder = {id(p) for p in model.encoder.parameters()}
    groups = [{"params": [p for p in params if id(p) in encoder], "lr": lr},
              {"params": [p for p in params if id(p) not in encoder], "lr": lr * decoder_lr_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: list[Any], optim: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """The ``optim`` section's optimizer (its name already checked against ``config.CHOICES``) on
    parameters or :func:`parameter_groups`."""
    name = optim["name"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])
    return torch.optim.SGD(params, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"])


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup to the base learning rate, then cosine decay to ``min_ratio`` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def total_steps(config: dict[str, Any], train_images: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: ``steps`` when set, else ``epochs`` passes over ``train_images``
    at ``data.batch_size`` x ``optim.grad_accum`` images per process and step."""
    batch, accum = config["data"]["batch_size"], config["optim"]["grad_accum"]
    if accum < 1 or batch < 1:
        raise ValueError("data.batch_size and optim.grad_accum must be >= 1")
    if config["steps"] is not None:
        steps = config["steps"]
    else:
        steps = math.ceil(config["epochs"] * math.ceil(train_images / world_size) / (batch * accum))
    if steps < 1:
        raise ValueError(f"the run has no steps (steps={config['steps']}, epochs={config['epochs']})")
    return steps


#: The files a run's saves replace, relative to its folder: a resumed run's own count as free space.
RUN_FILES = ("checkpoints/last.pt", "checkpoints/last-previous.pt", "checkpoints/best.pt", "model/model.safetensors")


def check_free_space(run_dir: Path, model: nn.Module, trainable: list[nn.Parameter], best: bool = False) -> None:
    """Refuse to start when the run folder's disk cannot hold the run's checkpoints: the last one,
    the one before it, one being written and, when a held-out split chooses one, the best (weights
    plus Adam's two moments), and the exported model. The run's own files of those kinds are
    replaced by its saves, so a resumed run counts their space as its own."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * p.element_size() for p in trainable)
    need = (3 + best) * (weights + moments) + weights
    held = {}
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file():
            stat = path.stat()
            held[(stat.st_dev, stat.st_ino)] = stat.st_size  # a hard-linked previous checkpoint counts once
    free = shutil.disk_usage(run_dir).free
    if free + sum(held.values()) < need:
        raise OSError(f"the run folder {run_dir} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                      f"{(need - sum(held.values())) / 2**20:.0f} MiB more (out_dir=... elsewhere, or free some space)")


def resolve_amp(amp: str, device: torch.device) -> str:
    """``amp`` resolved: ``auto`` is bf16 on a GPU that computes in it (Ampere and newer), fp16
    (with loss scaling) on an older one, and off on a CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


class Trainer:
    """Optimizer steps over a dataset, with everything a long run needs around them."""

    def __init__(
        self,
        config: dict[str, Any],
        model: nn.Module,
        dataset: Dataset,
        run_dir: Path,
        dist_info: DistInfo,
        device: torch.device,
        lr: float,
        stage: str,
        resume: bool = False,
    ) -> None:
        self.config, self.model, self.run_dir, self.dist, self.device, self.stage = config, model, run_dir, dist_info, device, stage
        self.dataset = dataset
        optim = config["optim"]
        self.accum = optim["grad_accum"]
        self.batch_size = config["data"]["batch_size"]
        self.total_steps = total_steps(config, len(dataset), dist_info.world_size)

        model.to(device)
        model.set_grad_checkpointing(config["grad_checkpointing"])
        if self.use_channels_last:
            model.to(memory_format=torch.channels_last)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # on every rank, so that none goes on alone
        check_free_space(run_dir, model, self.params, best=bool(config["data"].get("select_fraction")))
        self.optimizer = build_optimizer(parameter_groups(model, self.params, optim["decoder_lr_mult"], lr), optim, lr)
        # fp16's narrow range lets small gradients underflow to zero: scale the loss up, and skip
        # the steps whose scaled gradients overflow (bf16 has fp32's range and needs none of this)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, optim["warmup_steps"], optim["min_lr_ratio"])
        )
        self.net = model
        if dist_info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # parameters a model never uses (smp's encoder stages past encoder_depth, say) were found and
            # frozen when it was built; only a model where that search failed has DDP search every step
            search = getattr(model, "unused_parameters", None) is None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=search)
        if config["compile"]:
            self.net = torch.compile(self.net)
        self.generator = torch.Generator(device).manual_seed(config["seed"] * 7919 + dist_info.rank)
        self.step = 0
        self.extra: dict[str, Any] = {}
        self._parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self._boundary: dict[str, Any] = {}  # what changes between steps besides the weights, as the last step left it
        #: Modules a loop keeps beside the model (an EMA teacher, say), saved in checkpoints and restored on
        #: resume; they must change only at a step (``step_hooks``), as the weights do.
        self.companions: dict[str, nn.Module] = {}
        self.step_hooks: list[Callable[[], None]] = []  # run after each optimizer step
        self._companions_saved: dict[str, dict] = {}  # a resumed run's, until the loop has added its companions
        self.saved_workers: int | None = None  # a resumed run's data.num_workers, as its checkpoint recorded it
        if resume:
            self.load(checkpoint_path(self.run_dir, "last.pt"))
            if dist_info.is_main:  # only now that the checkpoint fits: a failed resume leaves the run as it was
                save_config(config, run_dir / "config.yaml")
                self._forget_logged_after(self.step)
        self.loader = training_loader(dataset, config["seed"], self.batch_size, config["data"]["num_workers"], dist_info,
                                      start=self.batches_read, pin_memory=device.type == "cuda")
        self.stop_signals = StopSignals()
        self._saved_at = (self.step if resume else -1, time.monotonic())  # the step and time of the last last.pt
        self._loss_sum, self._loss_count, self._images, self._timer = 0.0, 0, 0, time.perf_counter()
        self._tracked: dict[str, tuple[torch.Tensor, int]] = {}  # the loop's own values for the next log row: (sum, count)
        self._pending: dict[str, torch.Tensor] = {}  # this micro-batch's, kept once its loss proves finite
        self._micro = 0
        self._stepped = False  # a step was taken and the loop's work after it is not yet followed by end_of_step
        self._progress = None
        self._tensorboard = None

    def add_companion(self, name: str, module: nn.Module) -> None:
        """Keep ``module`` in checkpoints as ``name``; a resumed run's saved state is loaded into it."""
        if name in self._companions_saved:
            module.load_state_dict(self._companions_saved.pop(name))
        elif self.step:
            raise ValueError(f"{self.run_dir}: its checkpoint at step {self.step} holds no {name} (made without it): "
                             "resume with the run's own settings, or name=... for a new run")
        self.companions[name] = module

    # ----- device, precision
    @property
    def use_channels_last(self) -> bool:
        setting = self.config["channels_last"]
        return self.device.type == "cuda" if setting == "auto" else bool(setting)

    @property
    def precision(self) -> str:
        return resolve_amp(self.config["amp"], self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision])

    def to_device(self, batch: dict) -> dict:
        if "jpeg" in batch:  # data.decode=gpu: the workers sent JPEG bytes, decoded and augmented on the device
            batch = self.dataset.decode_batch(batch, self.device)
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key == "image" and self.use_channels_last:
                    value = value.contiguous(memory_format=torch.channels_last)
            moved[key] = value
        return moved

    @property
    def batches_read(self) -> int:
        """Micro-batches this process has read since the run began: a resumed run's loaders start
        after them (the steps' and the skipped non-finite ones)."""
        return self.step * self.accum + self.extra.get("skipped_nonfinite", 0)

    # ----- the loop
    def batches(self) -> Iterator[dict]:
        """Micro-batches on the device until ``total_steps`` optimizer steps are done.

        A stop signal ends the run at the next micro-batch (preemption.py): after a step, with a
        checkpoint of that step; in the middle of an accumulated step, with a checkpoint of the
        state the step started from (its partial gradients dropped), so that the stop waits for
        one micro-batch, not for the step's other ``grad_accum - 1``."""
        self._open_logs()
        if self.step >= self.total_steps:
            return
        if self._companions_saved:  # the checkpoint keeps modules this run does not: continuing would lose them
            raise ValueError(f"{self.run_dir}: its checkpoint holds {', '.join(self._companions_saved)} that this run does not "
                             "keep (made with other settings, semi.teacher say): resume with the run's own settings")
        self.stop_signals.install()
        self._mark_boundary()
        try:
            for batch in self.loader:
                # DDP decides at the forward pass whether the backward all-reduces: only at a step's last micro-batch
                last = not self.dist.enabled or (self._micro + 1) % self.accum == 0
                with contextlib.nullcontext() if last else self.net.no_sync():
                    yield self.to_device(batch)
                if self._stepped:  # the loop has done its work for this step (an evaluation, say)
                    self._stepped = False
                    self._end_of_step()
                else:
                    self._within_step()
                if self.step >= self.total_steps:
                    break
        finally:
            self.stop_signals.restore()

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate ``loss``; every ``grad_accum`` micro-batches take an optimizer step.

        Returns True when a step was taken (``self.step`` counts them)."""
        value = loss.item()  # one device sync per micro-batch, for the check and the log
        pending, self._pending = self._pending, {}
        finite = math.isfinite(value)
        if self.config["skip_nonfinite"] and self.dist.enabled:  # every rank must skip the same batch
            finite = math.isfinite(all_reduce_mean(value, self.dist, self.device))
        if not finite:
            skipped = self.extra.get("skipped_nonfinite", 0)
            if skipped >= self.config["skip_nonfinite"]:
                raise FloatingPointError(
                    f"{self.stage}: loss is {value} at step {self.step + 1} ({skipped} such batches skipped before); the last "
                    f"good checkpoint is {checkpoint_path(self.run_dir, 'last.pt')} (try a lower optim.lr or "
                    "optim.clip_grad_norm, or skip_nonfinite=N to skip up to N such batches)"
                )
            self.extra["skipped_nonfinite"] = skipped + 1
            log.warning("%s: loss is %s at step %d; batch skipped (%d of at most %d)", self.stage, value, self.step + 1,
                        skipped + 1, self.config["skip_nonfinite"])
            return False
        for key, tracked in pending.items():
            total, count = self._tracked.get(key, (0.0, 0))
            self._tracked[key] = (total + tracked, count + 1)
        self._micro += 1
        boundary = self._micro % self.accum == 0
        self.scaler.scale(loss / self.accum).backward()  # under DDP's no_sync (batches()) unless the step ends here
        self._loss_sum += value
        self._loss_count += 1
        self._images += self.batch_size * self.dist.world_size
        if not boundary:
            return False
        if self.config["optim"]["clip_grad_norm"]:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, self.config["optim"]["clip_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._stepped = True
        for hook in self.step_hooks:
            hook()
        self._after_step()
        return True

    def track(self, **values: torch.Tensor) -> None:
        """Add this micro-batch's values (a semi-supervised loss's parts, say) to the next log row,
        which holds their mean since the row before (a skipped non-finite batch's left out); kept
        on the device until then (no sync)."""
        self._pending.update({key: value.detach().float() for key, value in values.items()})

    def due(self, every: int) -> bool:
        """Whether something that runs every ``every`` steps runs after this step (and the last)."""
        return every > 0 and (self.step % every == 0 or self.step == self.total_steps)

    def _after_step(self) -> None:
        if self._progress is not None:
            self._progress.update(1)
        if self.due(self.config["log_every"]):
            elapsed = time.perf_counter() - self._timer
            row = {
                "step": self.step,
                "loss": all_reduce_mean(self._loss_sum / max(1, self._loss_count), self.dist, self.device),
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": self._images / max(elapsed, 1e-9),
            }
            for key, (total, count) in self._tracked.items():
                row[key] = all_reduce_mean(float(total) / count, self.dist, self.device)
            if self.device.type == "cuda":  # the peak since the last row, the largest rank's (mmseg logs it as `memory`)
                row["memory_mib"] = all_reduce_max([torch.cuda.max_memory_allocated(self.device) >> 20], self.dist, self.device)[0]
                torch.cuda.reset_peak_memory_stats(self.device)
            self.log(row)
            self._tracked = {}
            self._loss_sum, self._loss_count, self._images, self._timer = 0.0, 0, 0, time.perf_counter()

    def _end_of_step(self) -> None:
        """After a step and the loop's work on it: the periodic checkpoint, then a requested stop.

        Coming after that work, a checkpoint records it (a held-out evaluation and the best score
        so far), so a run resumed from it chooses what an uninterrupted run chooses."""
        self._mark_boundary()
        minutes = self.config["checkpoint_minutes"]
        timed = bool(minutes) and time.monotonic() - self._saved_at[1] >= 60 * minutes
        # every rank must take the same decisions (a save gathers their random states): one all-reduce
        signum, timed = all_reduce_max([self.stop_signals.signum or 0, int(timed)], self.dist, self.device)
        if self.step < self.total_steps and (self.due(self.config["checkpoint_every"]) or timed):
            self.save("last.pt")  # the last one is the loop's, after its final work (evaluation)
        if signum:
            self._stop(signum)

    def _within_step(self) -> None:
        """Between two micro-batches of a step: stop at once if any rank was signalled (one
        all-reduce of one number under DDP; nothing in a single process)."""
        signum = all_reduce_max([self.stop_signals.signum or 0], self.dist, self.device)[0]
        if signum:
            self._stop(signum, within_step=True)

    def _mark_boundary(self) -> None:
        """Keep what a checkpoint of the step just ended holds besides the parameters and the
        optimizer, which do not change until the next step: the random states, the buffers (batch
        norm's running statistics change at every forward pass) and ``extra``."""
        self._boundary = {
            "rng": self._rng_state(),
            "buffers": {key: value.detach().clone() for key, value in self.model.state_dict().items()
                        if key not in self._parameter_names},
            "extra": copy.deepcopy(self.extra),
        }

    def _stop(self, signum: int, within_step: bool = False) -> None:
        """Save last.pt (unless this step's is written), let every rank see it written, and stop."""
        path = checkpoint_path(self.run_dir, "last.pt")
        if self._saved_at[0] != self.step:
            self.save("last.pt", at_boundary=within_step)
        barrier(self.dist)  # no rank leaves (and makes torchrun stop the others) before the checkpoint exists
        self.stop_signals.restore()
        self.close()
        if signum == signal.SIGUSR1 and self.dist.is_main:
            requeue_slurm_job()
        where = (f"during step {self.step + 1} of {self.total_steps} (a resumed run redoes it)" if within_step
                 else f"after step {self.step} of {self.total_steps}")
        received = self.stop_signals.received_at  # None on a rank that another rank's signal stopped
        after = f", written {time.monotonic() - received:.1f} s after the signal" if received is not None else ""
        raise Preempted(f"stopped by {signal.Signals(signum).name} {where}; checkpoint {path} (step {self.step}{after}; "
                        "continue: the same command with --resume auto)")

    # ----- logs
    def _open_logs(self) -> None:
        if not self.dist.is_main or self._progress is not None:
            return
        if self.config["progress"]:
            from tqdm import tqdm

            self._progress = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True)
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    def _forget_logged_after(self, step: int) -> None:
        """Drop log.csv's rows of the steps after ``step``: the resumed run logs them again (as
        TensorBoard's ``purge_step`` does for its events)."""
        path = self.run_dir / "log.csv"
        if not path.is_file():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [row for row in rows[1:] if len(row) == 3 and row[0].isdigit() and int(row[0]) <= step]
        if len(kept) < len(rows):  # rows of later steps, or one a crash cut short
            buffer = io.StringIO()
            csv.writer(buffer).writerows(kept)
            write_text_atomic(path, buffer.getvalue())

    def log(self, row: dict[str, float]) -> None:
        """Append ``row`` (with ``step``) to log.csv and TensorBoard, and show it in the bar."""
        if not self.dist.is_main:
            return
        path = self.run_dir / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "key", "value"])
            for key, value in row.items():
                if key != "step":
                    writer.writerow([row["step"], key, f"{value:.6g}"])
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self._tensorboard.add_scalar(f"{self.stage}/{key}", value, row["step"])
        if self._progress is not None:
            self._progress.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    # ----- checkpoints
    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device).cpu()
        return rng

    def state_dict(self, at_boundary: bool = False) -> dict[str, Any]:
        """Everything a resumed run needs; ``at_boundary``: as the last step left it (the weights and
        optimizer are, the rest is taken from :meth:`_mark_boundary`'s copy)."""
        rng, model, extra = self._rng_state(), self.model.state_dict(), self.extra
        if at_boundary:
            rng, extra = self._boundary["rng"], self._boundary["extra"]
            model.update(self._boundary["buffers"])
        return {
            "stage": self.stage,
            "model": model,
            "model_config": self.model.config,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": {"ranks": gather_objects(rng, self.dist)},  # every rank draws its own noise and dropout
            "config": self.config,
            "extra": extra,
            "companions": {name: module.state_dict() for name, module in self.companions.items()},
        }

    def save(self, name: str, at_boundary: bool = False) -> Path:
        path = checkpoint_path(self.run_dir, name)
        state = self.state_dict(at_boundary)  # on every rank: it gathers their random states
        if self.dist.is_main:
            try:
                save_checkpoint(state, path, keep_previous=name == "last.pt")
            except OSError as e:  # a full disk, say: the last complete checkpoint is intact
                last = checkpoint_path(self.run_dir, "last.pt")
                hint = (f"the run continues from {last} (step {self._saved_at[0]}) with the same command and --resume auto "
                        "once there is space" if last.is_file() else "nothing was saved yet")
                raise OSError(e.errno, f"{e.strerror or e} at step {self.step}; {hint}") from None
        if name == "last.pt":
            self._saved_at = (self.step, time.monotonic())
        return path

    def check_shard_order(self, dataset: Dataset) -> None:
        """Warn when a resumed run reads ``dataset``'s tar shards with other loader workers than the
        run that saved it: their order depends on the count."""
        workers, now = self.saved_workers, self.config["data"]["num_workers"]
        if workers is not None and isinstance(dataset, ShardImages) and max(1, workers) != max(1, now):
            log.warning("%s: saved with data.num_workers=%s, resumed with %s: the shards' order depends on it, so the run goes on "
                        "from the same step and point of the epoch, but the epoch's remaining samples are not the ones the "
                        "run would have seen (some come twice, as many not at all)", dataset.root, workers, now)

    def load(self, path: Path) -> None:
        """Resume from ``path``, or from the checkpoint before it if ``path`` is damaged."""
        # on the CPU: load_state_dict copies to the device, and Adam keeps its step counters where they
        # were loaded (on a GPU they would cost a sync per parameter tensor and step)
        state, path = load_resumable(path, map_location="cpu")
        if state.get("stage") != self.stage:
            raise ValueError(f"{path}: a {state.get('stage')} checkpoint cannot resume a {self.stage} run")
        saved, built = describe_model(state["model_config"]), describe_model(self.model.config)
        if saved != built:
            raise ValueError(f"{path} holds a {saved} model but this run builds a {built} model: resume with the run's own "
                             "settings (its config.yaml), or name=... for a new run")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # the same architecture with other options: torch's message lists every key
            raise ValueError(f"{path}: its weights do not fit this run's {built} model ({str(e).splitlines()[0][:200]}); "
                             "resume with the run's own settings, or name=... for a new run") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # other trainable parameters: e.g. a model whose unused ones a newer ddep freezes
            raise ValueError(f"{path}: its optimizer state does not fit this run's trainable parameters ({e}); fine-tune "
                             "from the run's model/ (init=...) or start a new run") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when the run was not in fp16
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.extra = state.get("extra", {})
        self._companions_saved = state.get("companions", {})
        ranks = state["rng"].get("ranks", [state["rng"]])  # older checkpoints kept rank 0's only
        if len(ranks) != self.dist.world_size:
            log.warning("%s: saved by %d processes, resumed by %d: the random streams differ from an uninterrupted run's",
                        path, len(ranks), self.dist.world_size)
        self.saved_workers = (state.get("config") or {}).get("data", {}).get("num_workers", 0)
        self.check_shard_order(self.dataset)
        rng = ranks[self.dist.rank % len(ranks)]
        torch.set_rng_state(rng["torch"].cpu())
        try:
            self.generator.set_state(rng["generator"].cpu())
        except RuntimeError:  # saved by a generator on another kind of device: a CPU's state is not a GPU's
            log.warning("%s: saved on another kind of device than this run's %s: the noise and other draws on the device "
                        "go on from a new seed, not as an uninterrupted run's", path, self.device.type)
            self.generator.manual_seed(self.config["seed"] * 7919 + self.dist.rank + 104729 * self.step)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
