"""What a finished run tells its user: a few lines on the terminal, and for fine-tuning a
``report.md`` with its loss and mIoU curves and a few predictions beside their ground truth."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from ..atomic import write_text_atomic
from ..inference import evaluating, predict
from ..noise import zero_prediction_loss
from .predict import palette

#: Images of the reported split shown in report.md, and the height each is drawn at.
REPORT_IMAGES, REPORT_HEIGHT = 4, 160


def read_log(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """log.csv as ``{key: [(step, value), ...]}`` in step order, one value per step: the last
    written (a resumed run logs again the steps after its checkpoint)."""
    path = Path(run_dir) / "log.csv"
    series: dict[str, dict[int, float]] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in list(csv.reader(f))[1:]:
                try:
                    step, key, value = int(row[0]), row[1], float(row[2])
                except (ValueError, IndexError):  # a row cut short by a crash
                    continue
                series.setdefault(key, {})[step] = value
    return {key: sorted(values.items()) for key, values in series.items()}


def pretrain_summary(run_dir: str | Path) -> str:
    """``pretrain: runs/x: 200 steps, final loss 0.79 (predicting zero: 1.0); model runs/x/model``."""
    run_dir = Path(run_dir)
    noise = yaml.safe_load((run_dir / "config.yaml").read_text())["noise"]
    losses = read_log(run_dir).get("loss", [])
    if not losses:
        return f"pretrain: {run_dir}: no step logged; model {run_dir / 'model'}"
    step, loss = losses[-1]
    against = f" (predicting zero: {zero_prediction_loss(noise['loss']):.2f})" if noise["target"] == "noise" else ""
    return f"pretrain: {run_dir}: {step} steps, final loss {loss:.3g}{against}; model {run_dir / 'model'}"


def finetune_summary(run_dir: str | Path) -> str:
    """The run folder, its mIoU and each class's IoU by name, from metrics.json."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lines = [f"finetune: {run_dir}: mIoU {metrics['mIoU']:.2f} on {metrics['num_images']} images; model {run_dir / 'model'}; "
             f"report {run_dir / 'report.md'}"]
    width = max(len(name) for name in class_names(metrics))
    lines += [f"  {name:<{width}}  IoU {_percent(iou)}" for name, iou in zip(class_names(metrics), metrics["IoU"])]
    return "\n".join(lines)


def class_names(metrics: dict[str, Any]) -> list[str]:
    return metrics.get("classes") or [f"class {i}" for i in range(len(metrics["IoU"]))]


def _percent(value: float) -> str:
    return "  n/a (not in the split, not predicted)" if value is None or math.isnan(value) else f"{value:6.2f}"


def write_finetune_report(run_dir: Path, model: torch.nn.Module, dataset, eval_config: dict[str, Any],
                          device: torch.device) -> Path:
    """``report.md`` beside metrics.json: the per-class table, ``curves.png`` and ``predictions.png``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plot_curves(read_log(run_dir), run_dir / "curves.png")
    prediction_rows(model, dataset, eval_config, device, run_dir / "predictions.png")
    selected = (f"the checkpoint of step {metrics['selected_step']}, best on {metrics['select_images']} held-out training images"
                if metrics.get("selected_on") else f"the final checkpoint (step {metrics['steps']})")
    lines = [f"# {run_dir.name}", "",
             f"mIoU **{metrics['mIoU']:.2f}** (aAcc {metrics['aAcc']:.2f}, mAcc {metrics['mAcc']:.2f}) on the {metrics['num_images']} "
             f"images of the reported split (hash {metrics['split_hash']}), of {selected}; trained on {metrics['train_images']} "
             "labeled images.", "", "| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {name} | {_percent(iou).strip()} | {_percent(acc).strip()} |"
              for name, iou, acc in zip(class_names(metrics), metrics["IoU"], metrics["Acc"])]
    lines += ["", "![loss and mIoU against the step](curves.png)", "",
              f"![image, ground truth and prediction for {REPORT_IMAGES} images of the reported split](predictions.png)", "",
              "Rows of predictions.png: image, ground truth (ignored pixels, 255, in cream), prediction, in the Pascal VOC "
              "colours `ddep predict` uses."]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def plot_curves(log: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """The training loss, and every mIoU logged (held-out, val), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    for ax, keys, label in ((loss_ax, ["loss"], "loss"), (miou_ax, [k for k in log if k.endswith("mIoU")], "mIoU (%)")):
        for key in keys:
            steps, values = zip(*log[key]) if log.get(key) else ((), ())
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def prediction_rows(model: torch.nn.Module, dataset, eval_config: dict[str, Any], device: torch.device, path: Path) -> None:
    """For the first images of ``dataset``: the image, its ground truth and the prediction, side by side."""
    mean, std = (torch.tensor(model.config[k]).view(3, 1, 1) for k in ("mean", "std"))
    colours = palette(model.config["classes"])
    rows = []
    with evaluating(model):
        for index in range(min(REPORT_IMAGES, len(dataset))):
            item = dataset[index]
            ids = predict(model, item["image"][None].to(device), **eval_config).argmax(1)[0].cpu().numpy()
            image = ((item["image"] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            row = np.concatenate([image, colours[item["mask"].numpy()], colours[ids]], axis=1)
            height = REPORT_HEIGHT
            rows.append(np.asarray(Image.fromarray(row).resize((row.shape[1] * height // row.shape[0], height), Image.NEAREST)))
    width = max(row.shape[1] for row in rows)
    grid = np.concatenate([np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows])
    Image.fromarray(grid).save(path)
