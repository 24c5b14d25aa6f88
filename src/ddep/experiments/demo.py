"""``ddep demo``: the whole method on the built-in data, on a laptop CPU, in minutes.

1. Decoder denoising pretraining with the frozen ImageNet EfficientNet-Lite0 encoder on the
   demo's unlabeled pool.
2. Fine-tuning at several label counts and seeds from (a) the ImageNet encoder with a random
   decoder and (b) the ImageNet encoder with the DDeP decoder: the same budgets, the same
   labeled images for a seed.
3. Evaluation on the fixed validation set; a printed table, report.md, a plot of mIoU against the
   label count, a grid of example predictions, and results.json.

Finished runs are reused and interrupted ones resume, so a second call only redoes what is
missing; ``--fresh`` starts over. A folder made with other settings is refused, never mixed.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..atomic import write_text_atomic
from ..config import load_config
from ..data import build_dataset
from ..data.transforms import eval_transforms
from ..engine.finetune import finetune
from ..engine.predict import palette
from ..engine.pretrain import pretrain
from ..inference import predict
from ..models.saving import CONFIG_FILE, load_model
from .report import markdown_table, plot, text_table

STARTS = {"random_decoder": "ImageNet encoder + random decoder", "ddep": "ImageNet encoder + DDeP decoder"}
#: Why the demo has no semi-supervised start, and which command shows one.
SEMI_POINTER = ("The unlabeled images can also be used in fine-tuning (semi-supervised, `semi.method=unimatch`), on top of "
                "the DDeP start. That is not part of this demo: a UniMatch step costs about three supervised steps and "
                "needs a longer budget, which would take the demo well past ten minutes on two cores. "
                "`ddep experiment semi-supervised` measures it (random and DDeP decoders x supervised, FixMatch and UniMatch "
                "at 4, 16 and 64 labels); docs/RESULTS.md has its numbers.")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets: the full demo takes under 10 minutes on two CPU cores.

    Fine-tuning runs 160 steps whatever the label count (a budget fixed per recipe, as in the
    paper protocol): with 80, the random-decoder baseline gained 1 mIoU from 16 to 64 labels, so
    the budget, not the labels, limited it; with 160 it gained 5 (3 seeds). Pretraining runs 120
    steps: 60, 250 and 1000 steps gave the same fine-tuning results (docs/RESULTS.md), and the
    time goes to fine-tuning.

    The noise is larger than the paper's sigma = 0.22 at 224 px: on these 64 px scenes,
    sigma = 0.22 is removed from local texture alone, and fine-tuning from that decoder did worse
    than from sigma = 0.5 (docs/RESULTS.md has the sweep).
    """

    image_size: int = 64
    unlabeled_images: int = 1000
    val_images: int = 200
    label_counts: tuple[int, ...] = (4, 16, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 120
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    noise_std: float = 0.5
    finetune_steps: int = 160
    finetune_batch: int = 8
    finetune_lr: float = 1e-3
    encoder: str = "tf_efficientnet_lite0"
    encoder_weights: str = "efficientnet-lite0"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)


FULL = DemoSettings()
QUICK = replace(FULL, unlabeled_images=200, val_images=60, label_counts=(4, 16), seeds=(0,), pretrain_steps=60, finetune_steps=40)


def common(settings: DemoSettings, out: Path, name: str) -> dict[str, Any]:
    return {
        "name": name, "out_dir": str(out), "device": "cpu", "channels_last": True,
        "model": {"arch": "unet", "encoder": settings.encoder, "encoder_weights": settings.encoder_weights,
                  "options": {"decoder_channels": list(settings.decoder_channels)}},
        "data": {"num_workers": 0},
    }


def pretrain_config(settings: DemoSettings, out: Path) -> dict[str, Any]:
    updates = common(settings, out, "pretrain")
    updates["data"].update(dataset="demo", split="unlabeled", crop_size=settings.image_size, min_scale=0.5,
                           batch_size=settings.pretrain_batch,
                           options={"size": settings.image_size, "num_images": settings.unlabeled_images})
    updates.update(mode="decoder", steps=settings.pretrain_steps, checkpoint_every=settings.pretrain_steps,
                   image_every=settings.pretrain_steps, noise={"std": settings.noise_std},
                   optim={"lr": settings.pretrain_lr, "warmup_steps": settings.pretrain_steps // 20})
    return load_config("pretrain", updates=updates)


def finetune_config(settings: DemoSettings, out: Path, start: str, labels: int, seed: int) -> dict[str, Any]:
    updates = common(settings, out, f"finetune/{start}-{labels}labels-seed{seed}")
    updates["data"].update(dataset="demo", split="train", val_split="val", crop_size=settings.image_size,
                           ratio_range=[0.75, 1.5], batch_size=settings.finetune_batch, labeled=labels, labeled_seed=seed,
                           options={"size": settings.image_size, "num_images": settings.val_images})
    updates.update(init=str(out / "pretrain" / "model") if start == "ddep" else None, seed=seed,
                   steps=settings.finetune_steps, eval_every=0, checkpoint_every=settings.finetune_steps,
                   optim={"lr": settings.finetune_lr, "warmup_steps": settings.finetune_steps // 10})
    return load_config("finetune", updates=updates)


def check_settings(out: Path, settings: DemoSettings, fresh: bool) -> None:
    """Record the settings in ``out``; refuse a folder that holds runs made with other ones."""
    path = out / "settings.json"
    current = json.loads(json.dumps(asdict(settings)))
    if fresh:
        for part in ("pretrain", "finetune"):
            shutil.rmtree(out / part, ignore_errors=True)
    elif path.is_file() and json.loads(path.read_text()) != current:
        raise FileExistsError(f"{out} holds a demo run made with other settings: pass --fresh to replace it, or --out DIR")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(current, indent=2))


def run_stage(stage: Callable[..., Path], config: dict[str, Any], done: Path) -> bool:
    """Run ``stage`` unless ``done`` exists; a run interrupted after a checkpoint resumes from it."""
    if done.is_file():
        return False
    stage(config, resume="auto")
    return True


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings = FULL, fresh: bool = False) -> dict[str, Any]:
    out = Path(out)
    check_settings(out, settings, fresh)
    timings: dict[str, float] = {}
    start_time = time.perf_counter()

    print(f"[1/3] decoder denoising pretraining: frozen ImageNet {settings.encoder}, {settings.unlabeled_images} "
          f"unlabeled {settings.image_size}px images, {settings.pretrain_steps} steps")
    if not run_stage(pretrain, pretrain_config(settings, out), out / "pretrain" / "model" / CONFIG_FILE):
        print("      reusing the finished pretraining run")
    timings["pretrain_s"] = time.perf_counter() - start_time

    runs = [(labels, seed, start) for labels in settings.label_counts for seed in settings.seeds for start in STARTS]
    results: dict[str, dict[str, list[float]]] = {start: {str(n): [] for n in settings.label_counts} for start in STARTS}
    print(f"[2/3] fine-tuning: {len(runs)} runs ({', '.join(map(str, settings.label_counts))} labels x "
          f"{len(settings.seeds)} seeds x 2 starts), {settings.finetune_steps} steps each, then evaluation")
    phase = time.perf_counter()
    for i, (labels, seed, start) in enumerate(runs, 1):
        config = finetune_config(settings, out, start, labels, seed)
        metrics_path = out / config["name"] / "metrics.json"
        reused = not run_stage(finetune, config, metrics_path)
        miou = json.loads(metrics_path.read_text())["mIoU"]
        results[start][str(labels)].append(miou)
        print(f"      {i:2d}/{len(runs)}  {STARTS[start]:<34s} {labels:3d} labels  seed {seed}:  mIoU {miou:5.1f}"
              + ("  (reused)" if reused else ""))
    timings["finetune_and_evaluate_s"] = time.perf_counter() - phase

    print("[3/3] report")
    phase = time.perf_counter()
    record = {
        "label_counts": list(settings.label_counts),
        "seeds": list(settings.seeds),
        "results": results,
        "settings": asdict(settings),
        "machine": machine(),
    }
    write_report(out, settings, record)
    timings["report_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - start_time
    record["timings"] = {k: round(v, 1) for k, v in timings.items()}
    write_text_atomic(out / "results.json", json.dumps(record, indent=2))
    settings_names = [str(n) for n in settings.label_counts]
    print()
    print(text_table(results, settings_names, "labels", baseline="random_decoder"))
    print(f"mIoU (%) on {settings.val_images} validation images, mean ± std over {len(settings.seeds)} seed(s); "
          f"took {timings['total_s'] / 60:.1f} min. Written to {out}/: results.json, report.md, miou_vs_labels.png, denoising.png, predictions.png")
    print("Semi-supervised fine-tuning on top of the DDeP start: ddep experiment semi-supervised (docs/RESULTS.md).")
    return record


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_report(out: Path, settings: DemoSettings, record: dict[str, Any]) -> None:
    results = record["results"]
    names = [str(n) for n in settings.label_counts]
    plot(results, names, out / "miou_vs_labels.png", "labeled images", "DDeP demo: fine-tuning from two starts", log_x=True)
    prediction_grid(out, settings)
    shutil.copyfile(out / "pretrain" / "images" / f"step{settings.pretrain_steps:07d}.png", out / "denoising.png")
    lines = [
        "# DDeP demo",
        "",
        f"UNet on ImageNet {settings.encoder}, built-in demo data at {settings.image_size}x{settings.image_size} px. "
        f"Decoder pretraining: {settings.pretrain_steps} steps of batch {settings.pretrain_batch} on "
        f"{settings.unlabeled_images} unlabeled images (scaled noise, sigma {settings.noise_std}). Fine-tuning: "
        f"{settings.finetune_steps} steps of batch {settings.finetune_batch}, Adam lr {settings.finetune_lr}, "
        f"from each start, on the same labeled images for a seed. mIoU (%) on {settings.val_images} validation "
        "images, mean ± std over seeds; the difference is the mean ± std of the per-seed differences.",
        "",
        markdown_table(results, names, "labels", baseline="random_decoder"),
        "![mIoU against labels](miou_vs_labels.png)",
        "",
        "What the decoder learned before it saw a label, on the pretraining's last batch (rows: clean "
        f"unlabeled scenes, the same with scaled noise of sigma {settings.noise_std}, the noise the decoder "
        "predicts (divided by 4 to show it), the image denoised with that prediction):",
        "",
        "![denoising](denoising.png)",
        "",
        "Example predictions (rows: image, ground truth, random decoder, DDeP decoder; "
        f"{settings.label_counts[-1]} labels, seed {settings.seeds[0]}):",
        "",
        "![predictions](predictions.png)",
        "",
        SEMI_POINTER,
        "",
        f"Machine: {record['machine']}.",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


@torch.no_grad()
def prediction_grid(out: Path, settings: DemoSettings, count: int = 8) -> None:
    """Validation images, their masks, and both starts' predictions at the largest label count."""
    labels, seed = settings.label_counts[-1], settings.seeds[0]
    models = [load_model(out / finetune_config(settings, out, start, labels, seed)["name"] / "model").eval() for start in STARTS]
    val = build_dataset("demo", split="val", size=settings.image_size, num_images=count,
                        transform=eval_transforms(models[0].config["mean"], models[0].config["std"]))
    colours = palette(val.num_classes)
    rows: list[list[np.ndarray]] = [[], [], [], []]
    for i in range(count):
        image = val[i]["image"][None]
        photo, mask = val.arrays(i)  # the scene as generated, before normalisation
        rows[0].append(photo)
        rows[1].append(colours[mask])
        for row, model in zip(rows[2:], models):
            row.append(colours[predict(model, image).argmax(1)[0].numpy()])
    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "predictions.png")
