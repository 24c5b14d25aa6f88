"""Every CUDA path of ddep once, on the demo data, the way users launch on a GPU (issue 25, part 2).

Each case is a chain of ``torchrun --standalone --nproc_per_node=1 -m ddep ...`` commands from the
demo's configs at ``--size`` px; the chains run side by side (the runs are small: one GPU holds
them all). Cases:

- ``bf16``: pretraining and fine-tuning with ``amp=bf16 channels_last=true``, then UniMatch and
  UniMatch V2 (EMA teacher) fine-tuning from that pretraining;
- ``fp16``: the same two stages with ``amp=fp16`` (GradScaler);
- ``compile``: the same two stages with ``compile=true``;
- ``gpu-decode``: demo scenes written as JPEGs, ``ddep shards``, pretraining from the shards with
  ``data.decode=gpu``;
- ``resume``: pretraining and fine-tuning with ``deterministic=true``, each run straight, run
  again, and run with a SIGTERM to torchrun mid-run followed by ``--resume auto``. The final
  weights are compared: resumed against straight, and straight against its repeat (the kernels'
  own nondeterminism, the floor the first difference is read against).

Every run records its exit status, wall time, whether every logged loss is finite and whether
the loss fell (mean of the last two logged values below that of the first two), the peak GPU
memory log.csv holds, and for fine-tuning the mIoU. ``smoke.json`` is rewritten after each run,
so a run cut short keeps what it measured; each command's output is in ``logs/``.

  python benchmarks/gpu_smoke.py --out gpu-check/smoke          # on a GPU machine
  python benchmarks/gpu_smoke.py --device cpu --size 32 --pretrain-steps 4 --finetune-steps 4 \\
      --images 64 --cases bf16 resume --out /tmp/smoke             # the same, tried on a CPU
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddep.engine.checkpoint import load_checkpoint
from ddep.engine.summary import read_log

ROOT = Path(__file__).resolve().parents[1]
CASES = ("bf16", "fp16", "compile", "gpu-decode", "resume")


class Smoke:
    """Runs the commands, records each run's outcome, and writes smoke.json as results come."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out).resolve()
        self.runs_dir, self.logs = self.out / "runs", self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"settings": vars(args), "runs": {}, "comparisons": {}}
        self.lock = threading.Lock()
        self.processes: list[subprocess.Popen] = []
        self.stopping = False

    def record(self, section: str, key: str, value: dict[str, Any]) -> None:
        with self.lock:
            if self.stopping:  # a run the timeout cut short
                value = {**value, "ok": False, "cut_short": True}
            self.results[section][key] = value
            path = Path(self.args.json or self.out / "smoke.json")
            path.with_suffix(".tmp").write_text(json.dumps(self.results, indent=1))
            path.with_suffix(".tmp").replace(path)
        print(f"[{section}] {key}: {json.dumps(value)}", flush=True)

    def command(self, stage: str, name: str, *overrides: str, resume: bool = False) -> list[str]:
        a = self.args
        common = [f"out_dir={self.runs_dir}", f"name={name}", f"device={a.device}", f"data.crop_size={a.size}",
                  f"data.num_workers={a.workers}", "progress=false"]
        demo_data = not any(o.startswith("data.dataset=") for o in overrides)
        if demo_data:
            common.append(f"data.options.size={a.size}")
        if stage == "pretrain":
            common += [*([f"data.options.num_images={a.images}"] if demo_data else []), f"steps={a.pretrain_steps}",
                       f"checkpoint_every={a.pretrain_steps}",
                       f"image_every={a.pretrain_steps}", f"log_every={max(1, a.pretrain_steps // 12)}"]
        else:
            common += [f"steps={a.finetune_steps}", f"checkpoint_every={a.finetune_steps}", f"log_every={max(1, a.finetune_steps // 16)}",
                       f"optim.warmup_steps={max(1, a.finetune_steps // 10)}"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ddep"]
        return [*torchrun, stage, "--config", str(ROOT / "configs" / "demo" / f"{stage}.yaml"), *common, *overrides,
                *(["--resume", "auto"] if resume else [])]

    def start(self, command: list[str], log_name: str) -> subprocess.Popen:
        """``command`` started, its output appended to ``logs/<log_name>.log``."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.args.threads)}
        with self.lock, (self.logs / f"{log_name}.log").open("a") as log:
            if self.stopping:
                raise RuntimeError(f"not started, the smoke is stopping: {log_name}")
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            self.processes.append(process)
        return process

    def stop_all(self, grace: float = 60.0) -> None:
        """SIGTERM to every command still running, then wait for them (checkpoints being saved):
        the GPU is free when this returns."""
        with self.lock:
            self.stopping = True  # no chain starts another command
            running = [p for p in self.processes if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def run(self, stage: str, name: str, *overrides: str, stop_at: int | None = None) -> dict[str, Any]:
        """One run; ``stop_at``: SIGTERM to torchrun once log.csv holds that step, then ``--resume auto``."""
        started, result = time.perf_counter(), {"stage": stage}
        process = self.start(self.command(stage, name, *overrides), name)
        if stop_at is not None:
            while process.poll() is None and logged_step(self.runs_dir / name) < stop_at:
                time.sleep(0.2)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                result["signalled_after_step"] = logged_step(self.runs_dir / name)
            result["signalled_exit"] = process.wait()
            checkpoint = self.runs_dir / name / "checkpoints" / "last.pt"
            result["checkpoint_step"] = load_checkpoint(checkpoint)["step"] if checkpoint.exists() else None
            process = self.start(self.command(stage, name, *overrides, resume=True), name)
        result["exit"] = process.wait()
        result["seconds"] = round(time.perf_counter() - started, 1)
        result.update(read_run(self.runs_dir / name))
        # a resume case passes only when the signal came mid-run
        result["ok"] = result["exit"] == 0 and result.get("losses_finite", False) and (stop_at is None or "signalled_after_step" in result)
        self.record("runs", name, result)
        return result

    def compare(self, key: str, a: str, b: str) -> None:
        self.record("comparisons", key, weight_difference(self.runs_dir / a, self.runs_dir / b))

    # the cases -------------------------------------------------------------------------------
    def case_bf16(self) -> None:
        fast = ["amp=bf16", "channels_last=true"]
        self.run("pretrain", "pretrain-bf16", *fast)
        init = f"init={self.runs_dir / 'pretrain-bf16' / 'model'}"
        self.run("finetune", "finetune-bf16", init, *fast)
        semi = ["semi.pseudo_label_accuracy=true"]
        self.run("finetune", "finetune-bf16-unimatch", init, *fast, "semi.method=unimatch", *semi)
        self.run("finetune", "finetune-bf16-unimatch-v2", init, *fast, "semi.method=unimatch_v2", "semi.teacher=ema", *semi)

    def case_fp16(self) -> None:
        self.run("pretrain", "pretrain-fp16", "amp=fp16")
        self.run("finetune", "finetune-fp16", f"init={self.runs_dir / 'pretrain-fp16' / 'model'}", "amp=fp16")

    def case_compile(self) -> None:
        self.run("pretrain", "pretrain-compile", "compile=true")
        self.run("finetune", "finetune-compile", f"init={self.runs_dir / 'pretrain-compile' / 'model'}", "compile=true")

    def case_gpu_decode(self) -> None:
        images, shards = self.out / "scenes", self.out / "shards"
        write_scenes(images, self.args.images, self.args.size)
        command = [sys.executable, "-m", "ddep", "shards", "--input", str(images), "--output", str(shards),
                   "--max-size", str(self.args.size), "--per-shard", str(max(1, self.args.images // 8))]
        exit_code = self.start(command, "shards").wait()
        self.record("runs", "shards", {"stage": "shards", "exit": exit_code, "ok": exit_code == 0})
        if self.args.device.startswith("cuda"):
            self.record("comparisons", "decodes into memory still read (of 40)", decode_race(sorted(images.glob("*.jpg"))[:16], self.args.size))
        self.run("pretrain", "pretrain-gpu-decode", "data.dataset=shards", f"data.root={shards}",
                 "data.options.size=null", "data.options.num_images=null", "data.decode=gpu")

    def chains(self, case: str) -> dict[str, Callable[[], None]]:
        """The case's chains of runs, each run in order, the chains side by side."""
        if case == "resume":
            return {f"resume ({stage})": functools.partial(self.resume, stage) for stage in ("pretrain", "finetune")}
        return {case: getattr(self, "case_" + case.replace("-", "_"))}

    def resume(self, stage: str) -> None:
        steps = self.args.pretrain_steps if stage == "pretrain" else self.args.finetune_steps
        settings = ["deterministic=true", "log_every=1"] + (["init=null"] if stage == "finetune" else [])
        for name in (f"{stage}-straight", f"{stage}-repeat"):
            self.run(stage, name, *settings)
        self.run(stage, f"{stage}-resumed", *settings, stop_at=steps // 2)
        self.compare(f"{stage}: resumed vs straight", f"{stage}-resumed", f"{stage}-straight")
        self.compare(f"{stage}: repeat vs straight", f"{stage}-repeat", f"{stage}-straight")


def logged_step(run_dir: Path) -> int:
    """The last step whose loss log.csv holds (0 before the first)."""
    return max((step for step, _ in read_log(run_dir).get("loss", [])), default=0)


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a finished run's files say: losses (finite, falling), peak memory, images/s, mIoU."""
    found = {key: [value for _, value in series] for key, series in read_log(run_dir).items()}
    if not found:
        return {"log": "missing"}
    losses = found.get("loss", [])
    result: dict[str, Any] = {
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "loss_fell": len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2]),
        "images_per_s_median": float(np.median(found["images_per_s"][1:] or found["images_per_s"])) if found.get("images_per_s") else None,
        "memory_mib_max": max(found["memory_mib"]) if found.get("memory_mib") else None,
    }
    for key in ("mask_ratio", "pseudo_accuracy"):
        if key in found:
            result[key] = found[key][-1]
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        result["mIoU"] = json.loads(metrics.read_text())["mIoU"]
    return result


def weight_difference(a: Path, b: Path) -> dict[str, Any]:
    """How far two runs' final weights are apart: whether equal, the largest absolute difference
    and the largest relative to the tensor's largest magnitude."""
    try:
        wa, wb = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (a, b))
    except FileNotFoundError as e:
        return {"error": str(e)}
    floats = [k for k in wa if wa[k].is_floating_point()]
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in floats}
    relative = {k: diffs[k] / max(wa[k].abs().max().item(), 1e-12) for k in floats}
    worst = max(relative, key=relative.get)
    return {"equal": all(torch.equal(wa[k], wb[k]) for k in wa), "max_abs_diff": max(diffs.values()),
            "max_rel_diff": relative[worst], "worst_tensor": worst, "tensors_differing": sum(d > 0 for d in diffs.values())}


def decode_race(files: list[Path], size: int, iterations: int = 40) -> dict[str, int]:
    """pytorch/vision#9606's harness, on torchvision's decoder and on ddep's: tensors the size of a
    decoded image are filled, reductions of them queued behind a GPU spin, the tensors freed (the
    allocator may hand their memory to the decoder), the batch decoded; counts the iterations
    whose reductions came out wrong."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from ddep.data.shards import decode_jpegs

    device = torch.device("cuda")
    encoded = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    numel = 3 * size * size // 4  # float32: the bytes of one decoded RGB image
    expected = torch.arange(len(encoded), dtype=torch.float32) * numel
    decoders = {"torchvision decode_jpeg": lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device),
                "ddep decode_jpegs": lambda: decode_jpegs(encoded, device)}
    counts = {}
    for name, decode in decoders.items():
        counts[name] = 0
        for _ in range(iterations):
            tensors = [torch.full((numel,), float(i), device=device) for i in range(len(encoded))]
            torch.cuda._sleep(50_000_000)  # tens of milliseconds of work queued ahead of the reductions
            sums = torch.stack([t.sum() for t in tensors])
            del tensors
            images = decode()
            counts[name] += not torch.equal(sums.cpu(), expected)
            del images
    return counts


def write_scenes(folder: Path, count: int, size: int) -> None:
    """The demo's unlabeled scenes as JPEGs (quality 95), for ``ddep shards``."""
    from ddep.data.demo import DemoDataset

    folder.mkdir(parents=True, exist_ok=True)
    scenes = DemoDataset("unlabeled", size=size, num_images=count)
    for i in range(count):
        Image.fromarray(scenes.arrays(i)[0]).save(folder / f"{i:05d}.jpg", quality=95)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=128, help="demo scenes and crops, px")
    parser.add_argument("--images", type=int, default=1000, help="unlabeled demo scenes for pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--finetune-steps", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers of each run")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", default="gpu-check/smoke", help="the runs and their logs")
    parser.add_argument("--json", help="where the results go (default: OUT/smoke.json)")
    args = parser.parse_args()
    smoke = Smoke(args)

    def stop(signum: int, frame: Any) -> None:  # `timeout` ran out: leave the GPU free for the next part
        smoke.stop_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    smoke.results["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    failures: list[str] = []

    def guarded(chain: str, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception as e:  # a broken chain must not stop the others
                failures.append(f"{chain}: {e!r}")
                smoke.record("runs", f"{chain} (driver)", {"error": repr(e), "ok": False})
        return run

    chains = {name: body for case in args.cases for name, body in smoke.chains(case).items()}
    threads = [threading.Thread(target=guarded(name, body)) for name, body in chains.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = smoke.results["runs"]
    bad = [name for name, r in runs.items() if not r.get("ok")]
    print(f"smoke: {len(runs) - len(bad)} of {len(runs)} runs ok" + (f"; failed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
