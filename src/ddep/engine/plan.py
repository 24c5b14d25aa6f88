"""A training run's plan: its budget in steps and images, printed by ``--dry-run`` before a
GPU-day is spent, and computed by the same function that the :class:`~.trainer.Trainer` uses."""
from __future__ import annotations

from typing import Any

from .distributed import launched_world_size
from .run import check_input_size
from .trainer import total_steps


def run_plan(config: dict[str, Any], train_images: int, lr: float, passes: str = "epochs", **extra: Any) -> dict[str, Any]:
    """Steps, images per step (batch x accumulation x processes), images seen and passes over the
    training images (under the name ``passes``), for ``config`` run on ``train_images`` by the
    processes torchrun started."""
    check_input_size(config)
    processes = launched_world_size()
    steps = total_steps(config, train_images, processes)
    images_per_step = config["data"]["batch_size"] * config["optim"]["grad_accum"] * processes
    return {
        "steps": steps,
        "images_per_step": images_per_step,
        "images_seen": steps * images_per_step,
        "train_images": train_images,
        passes: round(steps * images_per_step / train_images, 2),
        "processes": processes,
        "batch_size": config["data"]["batch_size"],
        "grad_accum": config["optim"]["grad_accum"],
        "lr": lr,
        "warmup_steps": config["optim"]["warmup_steps"],
        **extra,
    }
