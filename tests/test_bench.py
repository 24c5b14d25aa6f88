"""The benchmark scripts run end to end (tiny settings, on the CPU) and write what they promise."""
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMISED = ("ours_img_s", "baseline_img_s", "ratio", "ours_peak_mib", "baseline_peak_mib")


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_and_writes_bench_json(tmp_path):
    tiny = "--models unet_r50 --size 64 --batch 2 --steps 1 --finetune-steps 1 --warmup 0 --eval-size 32 --photos 4 --data-workers 1"
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path), BENCH_ARGS=tiny)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| unet_r50 | 2 |" in done.stdout and "ours with grad_checkpointing" in done.stdout
    result = json.loads((tmp_path / "bench-gpu.json").read_text())
    row = result["models"]["unet_r50"]
    assert all(row[key] > 0 for key in PROMISED)
    assert row["ratio"] == pytest.approx(row["ours_img_s"] / row["baseline_img_s"])
    assert row["checkpointed_ratio"] > 0 and row["checkpointed_peak_mib"] <= row["ours_peak_mib"]  # gpu.sh measures it too
    # the frozen encoder's skips get no input gradient in ours: fewer FLOPs than the baseline's step
    assert 0 < row["ours_gflop_per_image"] < row["baseline_gflop_per_image"]
    assert set(row["eval_img_s"]) == {"whole", "slide", "flip_ms"} and min(row["eval_img_s"].values()) > 0
    assert row["finetune_img_s"] > 0 and row["ours_mfu"] is None and result["matmul_bf16_tflops"] is None
    rates = result["data"]["img_s"]["1"]
    assert min(rates.values()) > 0
    assert set(rates) == {"full_decode", "reduced_decode", "resized_offline", "shards", "shards_device_decode"}
    assert result["data"]["shard_max_size"] == 512 and result["data"]["shards_write_img_s"] > 0
    assert "img/s from shards (longer side 512;" in done.stdout and "h per million of these photos" in done.stdout
    assert result["machine"]["device"] == "cpu"


def load_bench(name: str = "bench"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_smoke_reads_a_runs_losses_memory_and_miou(tmp_path):
    smoke = load_bench("gpu_smoke")
    rows = [(10, "loss", 2.0), (10, "memory_mib", 900), (20, "loss", 1.8), (30, "loss", 1.1), (30, "memory_mib", 1200),
            (40, "loss", 0.9), (40, "images_per_s", 50), (40, "mask_ratio", 0.25)]
    (tmp_path / "log.csv").write_text("step,key,value\n" + "".join(f"{s},{k},{v}\n" for s, k, v in rows))
    (tmp_path / "metrics.json").write_text(json.dumps({"mIoU": 61.5}))
    assert smoke.logged_step(tmp_path) == 40 and smoke.logged_step(tmp_path / "none") == 0
    run = smoke.read_run(tmp_path)
    assert run["losses_finite"] and run["loss_fell"] and (run["first_loss"], run["last_loss"]) == (2.0, 0.9)
    assert (run["memory_mib_max"], run["mIoU"], run["mask_ratio"], run["images_per_s_median"]) == (1200, 61.5, 0.25, 50)
    (tmp_path / "log.csv").write_text("step,key,value\n10,loss,1.0\n20,loss,nan\n30,loss,1.2\n40,loss,1.1\n")
    run = smoke.read_run(tmp_path)
    assert not run["losses_finite"] and not run["loss_fell"]


def test_the_gpu_smoke_measures_how_far_two_runs_weights_are_apart(tmp_path):
    smoke = load_bench("gpu_smoke")
    weights = {"conv.weight": torch.tensor([1.0, -4.0]), "bn.num_batches_tracked": torch.tensor(3)}
    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 0.5)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        moved = {**weights, "conv.weight": weights["conv.weight"] + torch.tensor([0.0, shift])}
        torch.save({"model": moved, "model_config": {}}, tmp_path / name / "checkpoints" / "last.pt")
    same = smoke.weight_difference(tmp_path / "a", tmp_path / "b")
    assert same["equal"] and same["max_abs_diff"] == 0 and same["tensors_differing"] == 0
    apart = smoke.weight_difference(tmp_path / "a", tmp_path / "c")
    assert not apart["equal"] and apart["max_abs_diff"] == 0.5 and apart["max_rel_diff"] == 0.5 / 4
    assert apart["worst_tensor"] == "conv.weight" and apart["tensors_differing"] == 1


def test_the_gpu_check_script_parses_and_its_study_plans_its_runs(capsys):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    from ddep.cli import main

    assert main(["experiment", str(ROOT / "benchmarks" / "gpu_label_efficiency.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "seeds [0, 1, 2, 3, 4]" in plan
    assert len(set(re.findall(r"runs/pretrain-\w+", plan))) == 1  # one pretraining, shared by the DDeP cells
    assert len(set(re.findall(r"runs/finetune-\w+", plan))) == 40  # 2 label counts x 4 variants x 5 seeds


def test_matmul_ceiling_counts_two_flops_per_multiply_add_at_the_best_time(monkeypatch):
    bench = load_bench()
    products = []

    def fake_timed(call, device, steps, warmup):
        products.append(call())
        return [0.5, 0.25]

    monkeypatch.setattr(bench, "timed", fake_timed)
    assert bench.matmul_tflops(torch.device("cpu"), n=64) == pytest.approx(2 * 64**3 / 0.25 / 1e12)
    assert products[0].shape == (64, 64) and products[0].dtype == torch.bfloat16


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
    (["--steps", "0"], "argument --steps: must be at least 1; got 0"),
    (["--batch", "1"], "argument --batch: must be at least 2; got 1"),
])
def test_bad_settings_are_refused_in_one_line(capsys, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit_info:
        load_bench().main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
