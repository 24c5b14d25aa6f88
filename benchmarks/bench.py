"""Throughput and memory of ddep's steps, against the straightforward implementation.

For UNet-R50 and TransUNet (R50+ViT-B/16) at 224x224, from the shipped recipes:

- the DDeP pretraining step, ours (``Trainer`` + ``denoising_pass``, as ``ddep pretrain`` runs
  it) against the straightforward implementation (encoder parameters requires_grad=False but the
  encoder left in train mode, fp32 on CPU / fp16 autocast with a GradScaler on GPU, no
  channels_last, noise drawn on the host, the decoder concatenating each skip before its
  convolution). Images/s: the two alternate step by step in one process (median step time), so
  the machine's drift falls on both. Peak memory, each alone in a fresh process: the tensors'
  peak (GPU: ``max_memory_allocated``; CPU: the profiler's memory timeline) and the process's
  resident-set peak (which includes the ~0.7 GB of Python, torch and timm). FLOPs per image
  (``torch.utils.flop_counter``) and, on GPU, the MFU against a measured bf16 matmul ceiling;
- the fine-tuning step and evaluation (whole, slide, flip + the paper's six scales), ours;
- the data pipeline alone: decoded and augmented images/s of DataLoader workers on generated
  JPEGs of ImageNet-like sizes, with and without reduced-size decoding (``min_size``), from the
  same photos resized offline, and from the tar shards ``ddep shards`` writes of them (decoded by
  the workers, or on the device: ``data.decode=gpu``); and the writer's own images/s.

Usage: ``make bench`` (CPU, about 4 minutes on 2 cores), ``benchmarks/gpu.sh`` on a GPU, or
``python benchmarks/bench.py --help``. Prints a table and writes ``bench.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skimage_data
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ddep.atomic import write_text_atomic
from ddep.config import load_config
from ddep.data.shard_writer import usable_cores, write_shards
from ddep.data.shards import ShardImages
from ddep.data.transforms import pretrain_transforms
from ddep.data.unlabeled import UnlabeledImages
from ddep.engine.distributed import DistInfo
from ddep.engine.finetune import build_finetune_model, segmentation_loss
from ddep.engine.preemption import release_at_exit, worker_init
from ddep.engine.pretrain import build_pretrain_model, denoising_pass
from ddep.engine.run import configure_kernels
from ddep.engine.trainer import Trainer
from ddep.inference import TTA_SCALES, predict
from ddep.models import build_model
from ddep.models.decoder import DecoderBlock
from ddep.noise import to_model_input

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "unet_r50": ("configs/pretrain/ddep_unet_r50_224.yaml", "configs/finetune/cityscapes_unet_r50.yaml"),
    "transunet": ("configs/pretrain/ddep_transunet_in21k_224.yaml", "configs/finetune/cityscapes_transunet.yaml"),
}
# (width, height) of the generated photos: ImageNet-1k's common sizes, and larger ones as in
# ImageNet-21k and phone photos, where reduced-size decoding pays.
LOADER_BATCH = 16  # images per batch when the data pipeline alone is timed
PHOTO_SIZES = [(500, 375), (500, 333), (375, 500), (640, 480), (800, 600), (1024, 768), (1600, 1200), (2048, 1536)]


# --------------------------------------------------------------------------- one measurement per process

def load_recipe(model_key: str, stage: str, device: str, batch: int, crop: int) -> dict[str, Any]:
    """The shipped recipe with random encoder weights (no downloads), one process, no files."""
    path = RECIPES[model_key][0 if stage == "pretrain" else 1]
    updates = {
        "model": {"encoder_weights": None},
        "data": {"batch_size": batch, "crop_size": crop, "num_workers": 0},
        "optim": {"grad_accum": 1},
        "device": device, "steps": 10**6, "log_every": 0, "checkpoint_every": 0, "progress": False,
    }
    return load_config(stage, ROOT / path, updates=updates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tensor_peak_mib(step, device: torch.device) -> float:
    """The most memory the process's tensors hold at once during ``step``: on a GPU the
    allocator's peak, on the CPU the peak of the profiler's memory timeline (which, unlike the
    resident set, does not depend on the C allocator's caching)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(categories) for categories in sizes) / 2**20


def timed(step, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def flops_per_call(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


class NoData(torch.utils.data.Dataset):
    """Stands in for the data set, whose batches the benchmark hands over itself: the Trainer
    only needs a length."""

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError


def ours_pretrain_step(config: dict[str, Any], device: torch.device, host_images: torch.Tensor, run_dir: Path):
    trainer = Trainer(config, build_pretrain_model(config), NoData(), run_dir, DistInfo(), device, config["optim"]["lr"], "pretrain")

    def step() -> None:
        configure_kernels(device, training=True, deterministic=False)  # as start_run sets them for a run
        images = trainer.to_device({"image": host_images})["image"]
        trainer.backward(denoising_pass(trainer, images, config["noise"]).loss)

    return step


def baseline_pretrain_step(config: dict[str, Any], device: torch.device, host_images: torch.Tensor):
    """The straightforward implementation (see the module's docstring)."""
    def concatenating_forward(self, x, skip=None):
        x = self.upsample(x, skip)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))

    m = config["model"]
    model = build_model(m["arch"], m["encoder"], None, classes=3, decoder_width=m["decoder_width"], **m["options"]).to(device)
    for block in model.modules():
        if isinstance(block, DecoderBlock):
            block.forward = types.MethodType(concatenating_forward, block)
    model.encoder.requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config["optim"]["lr"])
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    sigma = config["noise"]["std"]

    def step() -> None:
        torch.backends.cudnn.benchmark = False  # cuDNN's defaults (ours may share the process)
        x = host_images * 2 - 1
        eps = torch.randn_like(x)
        x_noisy = to_model_input((x + sigma * eps) / (1 + sigma**2) ** 0.5, model.config["mean"], model.config["std"])
        x_noisy, eps = x_noisy.to(device), eps.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = F.mse_loss(model(x_noisy).float(), eps)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def pretrain_steps(model_key: str, variants: list[str], device: torch.device, batch: int, size: int, run_dir: Path) -> dict:
    """A step function per variant, each on its own model, from one host batch."""
    config = load_recipe(model_key, "pretrain", str(device), batch, size)
    torch.manual_seed(0)
    host_images = torch.rand(batch, 3, size, size)
    if device.type == "cuda":
        host_images = host_images.pin_memory()  # as the DataLoader hands batches over
    makers = {
        "ours": lambda: ours_pretrain_step(config, device, host_images, run_dir),
        "checkpointed": lambda: ours_pretrain_step(dict(config, grad_checkpointing=True), device, host_images, run_dir),
        "baseline": lambda: baseline_pretrain_step(config, device, host_images),
    }
    return {variant: makers[variant]() for variant in variants}


def measure_pretrain_memory(model_key: str, variant: str, device: torch.device, batch: int, size: int, warmup: int) -> dict[str, Any]:
    """Peak memory and FLOPs of one variant, alone in this process: the resident-set peak is read
    after plain steps, before the FLOP counter and the profiler add their own."""
    with tempfile.TemporaryDirectory() as run_dir:
        step = pretrain_steps(model_key, [variant], device, batch, size, Path(run_dir))[variant]
        timed(step, device, steps=1, warmup=max(1, warmup))
        rss = peak_rss_mib()
        return {"peak_rss_mib": rss, "peak_mib": tensor_peak_mib(step, device), "flop_per_image": flops_per_call(step) / batch}


def measure_pretrain_speed(model_key: str, variants: list[str], device: torch.device, batch: int, size: int, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per step of each variant, alternating step by step in one process, so that the
    machine's drift (other load, clocks) falls on all alike."""
    with tempfile.TemporaryDirectory() as run_dir:
        step = pretrain_steps(model_key, variants, device, batch, size, Path(run_dir))
        for variant in step:
            timed(step[variant], device, steps=0, warmup=warmup)
        times: dict[str, list[float]] = {variant: [] for variant in step}
        for _ in range(steps):
            for variant in step:
                times[variant] += timed(step[variant], device, steps=1, warmup=0)
    return {"step_s": times}


def measure_finetune_eval(model_key: str, device: torch.device, batch: int, size: int, steps: int, warmup: int, eval_size: int) -> dict[str, Any]:
    """Fine-tuning step images/s (crop ``size``) and evaluation images/s on an eval_size x 2*eval_size image."""
    config = load_recipe(model_key, "finetune", str(device), batch, size)
    model = build_finetune_model(config, classes=19)
    torch.manual_seed(0)
    host = {"image": torch.randn(batch, 3, size, size), "mask": torch.randint(0, 19, (batch, size, size))}
    if device.type == "cuda":
        host = {key: value.pin_memory() for key, value in host.items()}  # as the DataLoader hands batches over
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, model, NoData(), Path(run_dir), DistInfo(), device, 1e-4, "finetune")

        configure_kernels(device, training=True, deterministic=False)

        def train_step() -> None:
            trainer.backward(segmentation_loss(trainer, trainer.to_device(host)))

        train_times = timed(train_step, device, steps, warmup)
    model.eval()
    configure_kernels(device, training=False, deterministic=False)  # as evaluate_model runs
    image = torch.randn(1, 3, eval_size, 2 * eval_size, device=device)
    modes = {
        "whole": dict(mode="whole"),
        "slide": dict(mode="slide", crop_size=eval_size, stride=2 * eval_size // 3),
        "flip_ms": dict(mode="whole", scales=TTA_SCALES, flip=True, size_divisor=16),
    }
    result = {"finetune_img_s": batch / statistics.median(train_times), "eval_image": [eval_size, 2 * eval_size], "eval_img_s": {}}
    for name, kwargs in modes.items():  # flip + multi-scale is 12 passes: timed once
        times = timed(lambda: predict(model, image, **kwargs), device, steps=1 if name == "flip_ms" else steps, warmup=warmup)
        result["eval_img_s"][name] = 1 / statistics.median(times)
    return result


def loader_plan(workers: int, per_worker: int) -> tuple[int, int, int]:
    """``(batch, warm-up batches, timed batches)`` for timing ``workers`` workers on ``per_worker``
    images each: batches of 16 (fewer for tiny runs), 3 warm-up batches per worker."""
    batch = min(LOADER_BATCH, per_worker)
    return batch, 3 * workers, max(1, workers * per_worker // batch)


def loader_rate(data: torch.utils.data.Dataset, sampler: list[int] | None, workers: int, per_worker: int,
                finish: Callable[[dict], dict] = lambda batch: batch, device: torch.device = torch.device("cpu")) -> float:
    """Images/s of ``workers`` DataLoader workers over ``data``, with ``finish`` run on each batch in
    this process (decoding on the device). Batches as :func:`loader_plan` says, with the DataLoader's
    default prefetching, as in training, so that a worker never waits for this process. The clock
    starts once the batches the workers made ahead during the warm-up are taken, so that it starts,
    as it stops, with this process waiting for the workers: nothing made before it counts."""
    batch, warmup, timed = loader_plan(workers, per_worker)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, sampler=sampler, drop_last=True,
                                         worker_init_fn=worker_init(release_at_exit()))
    batches = iter(loader)
    for _ in range(warmup):
        finish(next(batches))
    sync(device)
    start = time.perf_counter()
    count = sum(len(finish(next(batches))["image"]) for _ in range(timed))
    sync(device)
    return count / (time.perf_counter() - start)


def measure_data(folder: Path, min_size: int | None, workers: int, per_worker: int, size: int) -> float:
    """Images/s of ``workers`` DataLoader workers reading a folder: JPEG decoding, the pretraining
    augmentation (random resized crop to ``size``, flip), collation; the photos are read again as needed."""
    dataset = UnlabeledImages(folder, transform=pretrain_transforms(size, (0.25, 1.0)), min_size=min_size, cache_dir=folder / ".cache")
    batch, warmup, timed = loader_plan(workers, per_worker)
    return loader_rate(dataset, [i % len(dataset) for i in range((warmup + timed) * batch)], workers, per_worker)


def measure_shards(folder: Path, workers: int, per_worker: int, size: int, decode: str = "cpu",
                   device: torch.device = torch.device("cpu")) -> float:
    """The same from tar shards, as ``ddep pretrain`` reads them; ``decode="gpu"``: the workers hand
    over JPEG bytes, decoded and augmented on ``device`` in this process."""
    dataset = ShardImages(folder, pretrain_transforms(size, (0.25, 1.0)), decode=decode)
    stream = dataset.stream(0, 0, 1, batch_size=loader_plan(workers, per_worker)[0])
    if decode == "gpu":
        return loader_rate(stream, None, workers, per_worker, lambda batch: dataset.decode_batch(batch, device), device)
    return loader_rate(stream, None, workers, per_worker)


def make_photos(folder: Path, count: int, short_side: int | None = None) -> None:
    """JPEGs (quality 90) of real photos (scikit-image's, at most 640 px, so mostly upscaled and
    smoother, hence quicker to decode, than camera photos) resized to ``PHOTO_SIZES``, or to the
    same shapes with the shorter side ``short_side`` (a data set resized once, offline; twice the
    crop keeps every crop of at least a quarter of the image at full detail, as ``min_size``)."""
    folder.mkdir()
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    for i in range(count):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        size = (w, h) if short_side is None else (round(w * short_side / min(w, h)), round(h * short_side / min(w, h)))
        image = Image.fromarray(np.asarray(photos[i % len(photos)])).resize(size, Image.BILINEAR)
        image.save(folder / f"photo{i:04d}.jpg", quality=90)


# --------------------------------------------------------------------------- the driver

def in_subprocess(args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (so peak memory is its own) and return its result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The measured bf16 matmul ceiling: n x n x n products, best of 10."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = timed(lambda: a @ b, device, steps=10, warmup=3)
    return 2 * n**3 / min(times) / 1e12


def machine(device: torch.device) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": names[0] if names else platform.processor(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_all(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every measurement; ``save(result)`` after each model, so a run cut short keeps what it did."""
    device = torch.device(args.device)

    def settings(steps: int) -> list[str]:
        return ["--device", args.device, "--batch", str(args.batch), "--size", str(args.size), "--steps", str(steps),
                "--warmup", str(args.warmup), "--eval-size", str(args.eval_size)]

    common = settings(args.steps)
    result: dict[str, Any] = {"machine": machine(device), "settings": vars(args), "models": {}}
    ceiling = matmul_tflops(device) if device.type == "cuda" else None
    result["matmul_bf16_tflops"] = ceiling
    for model_key in args.models:
        row: dict[str, Any] = {"batch": args.batch, "size": args.size}
        variants = ["ours", "baseline", *(["checkpointed"] if args.checkpointing else [])]
        times = in_subprocess(["speed", model_key, *variants, *common])["step_s"]
        for variant in variants:
            memory = in_subprocess(["memory", model_key, variant, *common])
            row[f"{variant}_img_s"] = args.batch / statistics.median(times[variant])
            row[f"{variant}_peak_mib"] = memory["peak_mib"]
            row[f"{variant}_peak_rss_mib"] = memory["peak_rss_mib"]
            row[f"{variant}_gflop_per_image"] = memory["flop_per_image"] / 1e9
            row[f"{variant}_step_s"] = times[variant]
        row["ratio"] = row["ours_img_s"] / row["baseline_img_s"]
        row["memory_ratio"] = row["ours_peak_mib"] / row["baseline_peak_mib"]
        row["ours_mfu"] = row["ours_gflop_per_image"] * 1e9 * row["ours_img_s"] / (ceiling * 1e12) if ceiling else None
        if args.checkpointing:
            row["checkpointed_ratio"] = row["checkpointed_img_s"] / row["baseline_img_s"]
            row["checkpointed_memory_ratio"] = row["checkpointed_peak_mib"] / row["baseline_peak_mib"]
        row.update(in_subprocess(["finetune", model_key, *settings(args.finetune_steps)]))
        result["models"][model_key] = row
        save(result)
    with tempfile.TemporaryDirectory() as folder:
        photos, resized, shards = Path(folder) / "photos", Path(folder) / "resized", Path(folder) / "shards"
        make_photos(photos, len(PHOTO_SIZES) * 4)
        make_photos(resized, len(PHOTO_SIZES) * 4, short_side=2 * args.size)
        started = time.perf_counter()
        written = write_shards(photos, shards, per_shard=4, progress=False, cache_dir=Path(folder) / "cache")
        result["data"] = {"photo_sizes": PHOTO_SIZES, "reduced_min_size": 2 * args.size, "resized_short_side": 2 * args.size,
                          "shard_max_size": written["max_size"], "shards_write_processes": min(usable_cores(), len(written["shards"])),
                          "shards_write_img_s": written["samples"] / (time.perf_counter() - started),
                          "shard_bytes_per_image": sum(shard["bytes"] for shard in written["shards"]) / written["samples"], "img_s": {}}
        for workers in args.data_workers:
            result["data"]["img_s"][str(workers)] = {
                "full_decode": measure_data(photos, None, workers, args.photos, args.size),
                "reduced_decode": measure_data(photos, 2 * args.size, workers, args.photos, args.size),
                "resized_offline": measure_data(resized, None, workers, args.photos, args.size),
                "shards": measure_shards(shards, workers, args.photos, args.size),
                "shards_device_decode": measure_shards(shards, workers, args.photos, args.size, "gpu", device),
            }
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "| model | batch | ours img/s | baseline img/s | ratio | ours peak MiB | baseline peak MiB | memory ratio | GFLOP/img | MFU "
        "| fine-tune img/s | eval img/s whole / slide / flip+ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        mfu = f"{100 * r['ours_mfu']:.1f}%" if r["ours_mfu"] is not None else "-"
        ev = r["eval_img_s"]
        lines.append(
            f"| {name} | {r['batch']} | {r['ours_img_s']:.2f} | {r['baseline_img_s']:.2f} | {r['ratio']:.2f} | {r['ours_peak_mib']:.0f} "
            f"| {r['baseline_peak_mib']:.0f} | {r['memory_ratio']:.2f} | {r['ours_gflop_per_image']:.1f} | {mfu} | {r['finetune_img_s']:.2f} "
            f"| {ev['whole']:.2f} / {ev['slide']:.2f} / {ev['flip_ms']:.3f} |"
        )
    for name, r in result["models"].items():
        if "checkpointed_img_s" in r:
            lines.append(f"\n{name}, ours with grad_checkpointing: {r['checkpointed_img_s']:.2f} img/s (ratio {r['checkpointed_ratio']:.2f}), "
                         f"peak {r['checkpointed_peak_mib']:.0f} MiB (memory ratio {r['checkpointed_memory_ratio']:.2f})")
    data = result["data"]
    for workers, rates in data["img_s"].items():
        lines.append(f"\ndata pipeline, {workers} worker(s): {rates['full_decode']:.0f} img/s decoding whole JPEGs, "
                     f"{rates['reduced_decode']:.0f} img/s with min_size={data['reduced_min_size']}, "
                     f"{rates['resized_offline']:.0f} img/s from photos resized offline to a {data['resized_short_side']} px shorter side, "
                     f"{rates['shards']:.0f} img/s from shards (longer side {data['shard_max_size']}; "
                     f"{rates['shards'] / rates['full_decode']:.1f}x whole JPEGs), "
                     f"{rates['shards_device_decode']:.0f} img/s from shards decoded on the {result['machine']['device']} (data.decode=gpu)")
    lines.append(f"ddep shards: {data['shards_write_img_s']:.0f} img/s with {data['shards_write_processes']} processes "
                 f"({1e6 / data['shards_write_img_s'] / 3600:.1f} h per million of these photos), "
                 f"{data['shard_bytes_per_image'] / 1024:.0f} KiB per image")
    if result["matmul_bf16_tflops"]:
        lines.append(f"bf16 matmul ceiling: {result['matmul_bf16_tflops']:.0f} TFLOP/s")
    return "\n".join(lines)


def counting(least: int):
    """An argparse type: an integer of at least ``least``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}; got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch", type=counting(2), default=4, help="images per step (default 4: a CPU-sized batch; at least 2 for training-mode BatchNorm)")
    parser.add_argument("--size", type=counting(32), default=224, help="crop side (the paper's pretraining size; a multiple of 32)")
    parser.add_argument("--steps", type=counting(1), default=5, help="timed steps per measurement (the median counts)")
    parser.add_argument("--warmup", type=counting(0), default=1, help="untimed steps first")
    parser.add_argument("--finetune-steps", type=counting(1), default=2, help="timed fine-tuning steps and evaluation passes")
    parser.add_argument("--checkpointing", action="store_true", help="also measure ours with grad_checkpointing=true")
    parser.add_argument("--eval-size", type=counting(32), default=128, help="evaluation image: this x twice this (a multiple of 16)")
    parser.add_argument("--photos", type=counting(1), default=160, help="images each data worker loads while timed")
    parser.add_argument("--data-workers", type=counting(1), nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here (torch.cuda.is_available() is False)")
    started = time.perf_counter()
    def save(result: dict[str, Any]) -> None:
        result["seconds"] = time.perf_counter() - started
        write_text_atomic(args.out, json.dumps(result, indent=2))

    result = run_all(args, save)
    save(result)
    print(table(result))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["speed", "memory", "finetune"])
    parser.add_argument("model", choices=list(RECIPES))
    parser.add_argument("variants", nargs="*", help="ours, checkpointed, baseline (speed: several; memory: one)")
    for option in ("--batch", "--size", "--steps", "--warmup", "--eval-size"):
        parser.add_argument(option, type=int, required=True)
    parser.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the random-encoder warning is expected here
    device = torch.device(args.device)
    if args.what == "speed":
        result = measure_pretrain_speed(args.model, args.variants, device, args.batch, args.size, args.steps, args.warmup)
    elif args.what == "memory":
        (variant,) = args.variants
        result = measure_pretrain_memory(args.model, variant, device, args.batch, args.size, args.warmup)
    else:
        result = measure_finetune_eval(args.model, device, args.batch, args.size, args.steps, args.warmup, args.eval_size)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
