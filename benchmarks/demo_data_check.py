"""Is the built-in demo data a fair stage for DDeP? Does an ImageNet encoder matter with few labels?

Fine-tunes a UNet on EfficientNet-Lite0 (random decoder) on N labeled demo images, with the
encoder ImageNet-pretrained or random, for a fixed step budget, and reports val mIoU (per-class
IoU from one confusion matrix over the whole val set, mean over classes with non-zero union),
mean +- std over seeds. The seed picks the labeled subset, the decoder init and the data order.
Also times the generation of the demo pools.

Run: ``python benchmarks/demo_data_check.py`` (about 9 minutes on two CPU cores; 14 with ``--seeds 0 1 2``);
``--quick`` for a 2-minute smoke run.
"""
from __future__ import annotations

import argparse
import ast
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

import ddep
from ddep.data import demo
from ddep.data.demo import CLASSES, DemoDataset
from ddep.experiments.report import markdown_table
from ddep.metrics import SegMetric

IGNORE = 255


def stack(ds: DemoDataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for i in indices:
        item = ds[int(i)]
        images.append(item["image"])
        masks.append(item["mask"])
    return torch.stack(images), torch.stack(masks)


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (area fraction in [min_scale, 1], output at the input size) + h-flip."""
    n, _, h, w = x.shape
    xs, ys = [], []
    for i in range(n):
        s = min_scale + (1 - min_scale) * torch.rand((), generator=g).item()
        ch, cw = max(8, round(h * s**0.5)), max(8, round(w * s**0.5))
        top = int(torch.randint(h - ch + 1, (), generator=g))
        left = int(torch.randint(w - cw + 1, (), generator=g))
        xi = x[i : i + 1, :, top : top + ch, left : left + cw]
        yi = y[i : i + 1, None, top : top + ch, left : left + cw].float()
        if (ch, cw) != (h, w):
            xi = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)
            yi = F.interpolate(yi, size=(h, w), mode="nearest")
        if torch.rand((), generator=g).item() < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        xs.append(xi)
        ys.append(yi[:, 0].long())
    return torch.cat(xs), torch.cat(ys)


def evaluate(model, x: torch.Tensor, y: torch.Tensor, mean, std, batch: int = 100) -> dict:
    model.eval()
    metric = SegMetric(len(CLASSES), IGNORE)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            metric.update(model((x[i : i + batch] - mean) / std).argmax(1), y[i : i + batch])
    return metric.compute()


def run(pool_x, pool_y, val_x, val_y, n_labels: int, weights, seed: int, args) -> float:
    g = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(pool_x), generator=g)[:n_labels]
    x, y = pool_x[subset], pool_y[subset]
    torch.manual_seed(seed)
    model = ddep.build_model("unet", "tf_efficientnet_lite0", encoder_weights=weights, classes=len(CLASSES))
    mean = torch.tensor(model.config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.config["std"]).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)) * 0.5 * (1 + np.cos(np.pi * s / args.steps))
    )
    model.train()
    if args.bn_eval:  # diagnostic: keep the encoder's BatchNorm statistics fixed
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    for step in range(args.steps):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        xb, yb = augment(x[idx], y[idx], g, args.min_scale)
        loss = F.cross_entropy(model((xb - mean) / std), yb, ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    metrics = evaluate(model, val_x, val_y, mean, std)
    if args.per_class:
        present = torch.bincount(y.flatten(), minlength=len(CLASSES)) > 0
        print("    per-class IoU: " + ", ".join(f"{c} {v or 0:.0f}%{'' if p else '(absent)'}" for c, v, p in zip(CLASSES, metrics["IoU"], present.tolist())))
    return metrics["mIoU"]

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--labels", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--encoders", nargs="+", default=["imagenet", "random"], choices=["imagenet", "random"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-scale", type=float, default=0.5, help="smallest crop area fraction in augmentation")
    p.add_argument("--train-pool", type=int, default=200)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--unlabeled", type=int, default=1000, help="unlabeled pool size to time (0: skip)")
    p.add_argument("--scene", nargs="*", default=[], metavar="KEY=VALUE", help="experiment: override demo._SCENE entries (Python literals)")
    p.add_argument("--bn-eval", action="store_true", help="diagnostic: encoder BatchNorm layers in eval mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-class", action="store_true", help="print per-class IoU of every run")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 and 64 labels, 60 steps")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.labels, args.steps = [0], [4, 64], 60
    for kv in args.scene:
        key, value = kv.split("=", 1)
        if key not in demo._SCENE:
            raise SystemExit(f"unknown scene key {key!r}; known: {sorted(demo._SCENE)}")
        demo._SCENE[key] = ast.literal_eval(value)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    print(f"demo data: {len(CLASSES)} classes {CLASSES}, {args.size}x{args.size} px, scene {demo._SCENE}")
    pools = {}
    for split, n in (("unlabeled", args.unlabeled), ("train", args.train_pool), ("val", args.val)):
        t = time.time()
        pools[split] = DemoDataset(split, size=args.size, num_images=n)  # keeps the scenes it generates
        for i in range(n):
            pools[split][i]
        if n:
            print(f"  generate {split:9s}: {n:5d} images in {time.time() - t:5.1f} s")
    pool_x, pool_y = stack(pools["train"], range(args.train_pool))
    val_x, val_y = stack(pools["val"], range(args.val))
    freq = torch.bincount(val_y.flatten(), minlength=len(CLASSES)).double()
    print("  val pixel share per class: " + ", ".join(f"{c} {f:.0%}" for c, f in zip(CLASSES, freq / freq.sum())))
    print(
        f"fine-tuning: {args.steps} steps, batch {args.batch}, Adam lr {args.lr} (warmup {args.warmup}, cosine), "
        f"wd {args.wd}, random resized crop (area >= {args.min_scale}) + flip; val {args.val} images"
    )

    results: dict[str, dict[str, list[float]]] = {enc: {str(n): [] for n in args.labels} for enc in args.encoders}
    for n_labels in args.labels:
        for enc in args.encoders:
            for seed in args.seeds:
                t = time.time()
                m = run(pool_x, pool_y, val_x, val_y, n_labels, "efficientnet-lite0" if enc == "imagenet" else None, seed, args)
                results[enc][str(n_labels)].append(m)
                print(f"  labels {n_labels:3d}  encoder {enc:8s}  seed {seed}  mIoU {m:5.1f}  ({time.time() - t:.0f} s)", flush=True)

    baseline = "random" if len(args.encoders) == 2 and "random" in args.encoders else None
    print()
    print(markdown_table(results, [str(n) for n in args.labels], "labels", baseline=baseline), end="")
    print(f"\n(mIoU %, mean ± std over seeds {args.seeds}; total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
