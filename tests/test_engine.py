"""The three stages through the command line, on tiny models and data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_data import FINETUNE, PRETRAIN, TINY, interrupt_after
from ddep.cli import main
from ddep.engine import trainer as trainer_module
from ddep.engine.evaluate import evaluate_model
from ddep.engine.run import configure_kernels
from ddep.engine.checkpoint import load_checkpoint
from ddep.models.saving import load_model



def run(*args):
    assert main(list(args)) == 0


def test_pretrain_finetune_evaluate_chain(data):
    run("pretrain", "data.root=data/images", *PRETRAIN)
    pre = Path("runs/pretrain")
    assert {p.name for p in pre.iterdir()} >= {"config.yaml", "log.csv", "checkpoints", "images", "model", "tensorboard"}
    assert sorted(p.name for p in (pre / "images").iterdir()) == ["step0000002.png", "step0000004.png"]
    checkpoint = load_checkpoint(pre / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 4 and checkpoint["model_config"]["classes"] == 3

    run("finetune", "init=runs/pretrain/checkpoints/last.pt", "data.root=data", *FINETUNE)
    fine = Path("runs/finetune")
    metrics = json.loads((fine / "metrics.json").read_text())
    assert {"aAcc", "mIoU", "mAcc", "IoU", "inference", "split_hash", "checkpoint_hash", "best_mIoU"} <= set(metrics)
    assert (fine / "checkpoints" / "best.pt").is_file() and len(metrics["IoU"]) == 3
    model = load_model(fine / "checkpoints" / "best.pt")
    assert model.config["classes"] == 3
    pretrained = load_model(pre / "model")
    # fine-tuning started from the pretrained decoder: the same architecture, weights moved on
    assert pretrained.decoder.blocks[0].conv1[0].weight.shape == model.decoder.blocks[0].conv1[0].weight.shape

    run("evaluate", "checkpoint=runs/finetune/checkpoints/best.pt", "data.root=data", "data.options={num_classes: 3}",
        "eval.flip=true", "eval.scales=[0.75, 1.0]", "name=eval-tta")
    evaluated = json.loads(Path("runs/eval-tta/metrics.json").read_text())
    assert evaluated["inference"]["flip"] is True and evaluated["inference"]["scales"] == [0.75, 1.0]
    assert evaluated["num_images"] == 5 and 0 <= evaluated["mIoU"] <= 100

    run("predict", "checkpoint=runs/finetune/model", "input=data/images/val", "output=preds")
    masks = sorted(p.name for p in Path("preds").iterdir())
    assert masks[:2] == ["0.png", "0_overlay.jpg"] and len(masks) == 10

    run("export", "checkpoint=runs/finetune/checkpoints/best.pt", "output=exported", "onnx=true", "onnx_size=[32, 32]")
    import onnx

    onnx.checker.check_model("exported/model.onnx")
    exported = load_model("exported")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), model.eval()(x))


def weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, monkeypatch, stage):
    args = ["data.root=data/images", *PRETRAIN] if stage == "pretrain" else ["data.root=data", *FINETUNE]
    run(stage, *args, "name=straight")

    interrupt_after(monkeypatch, stage, [*args, "name=interrupted"], step=2)
    assert load_checkpoint("runs/interrupted/checkpoints/last.pt")["step"] == 2
    run(stage, *args, "name=interrupted", "--resume")

    straight, resumed = weights("runs/straight/checkpoints/last.pt"), weights("runs/interrupted/checkpoints/last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_run_is_never_overwritten_and_resume_needs_a_checkpoint(data, capsys):
    run("pretrain", "data.root=data/images", *PRETRAIN, "steps=1")
    assert main(["pretrain", "data.root=data/images", *PRETRAIN, "steps=1"]) == 1
    assert "runs/pretrain already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["pretrain", "data.root=data/images", *PRETRAIN, "name=new", "--resume"]) == 1
    assert "--resume: no checkpoint to resume from at runs/new/checkpoints/last.pt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["pretrain", "data.batch_size=two"], "data.batch_size must be int, got 'two'"),
        (["finetune", "eval.flip=maybe"], "eval.flip must be bool"),
        (["pretrain", "optim.name=adamm"], "optim.name must be one of adam, adamw, sgd; got 'adamm'"),
        (["pretrain", "amp=fp8"], "amp must be one of auto, bf16, fp16, off; got 'fp8'"),
        (["pretrain", "channels_last=1"], "channels_last must be one of auto, True, False; got 1"),
        (["pretrain", "noise.std"], "override must look like key=value"),
        (["evaluate", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["pretrain", "mode=encoder", "data.root=data/images", *TINY], "mode must be one of decoder, encoder+decoder"),
        (["pretrain", "noise.type=simple", "noise.level=ddpm", "data.root=data/images", *PRETRAIN],
         "noise_level='ddpm' reaches gamma = 0 (infinite sigma): use noise_type='scaled'"),
    ],
)
def test_config_errors_are_one_line(data, capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith(f"ddep {args[0]}: error:")


def test_yaml_config_file_and_saved_config(data):
    Path("pre.yaml").write_text("data:\n  root: data/images\n  crop_size: 32\n  batch_size: 4\nsteps: 1\nnoise:\n  std: 0.3\n")
    run("pretrain", "--config", "pre.yaml", *TINY, "noise.type=simple")
    import yaml

    saved = yaml.safe_load(Path("runs/pretrain/config.yaml").read_text())
    assert saved["noise"]["std"] == 0.3 and saved["noise"]["type"] == "simple" and saved["steps"] == 1


@pytest.mark.slow
def test_two_process_gloo_run_matches_a_single_process(data):
    run("finetune", "data.root=data", *FINETUNE, "steps=1", "eval_every=0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "ddep"]
    evaluate = ["evaluate", "checkpoint=runs/finetune/checkpoints/last.pt", "data.root=data", "data.options={num_classes: 3}", "device=cpu"]
    single = subprocess.run([sys.executable, "-m", "ddep", *evaluate, "name=single"], env=env, capture_output=True, text=True)
    double = subprocess.run([*torchrun, *evaluate, "name=double"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    one, two = (json.loads(Path(f"runs/{n}/metrics.json").read_text()) for n in ("single", "double"))
    assert one["num_images"] == two["num_images"] == 5
    assert one["mIoU"] == pytest.approx(two["mIoU"], abs=1e-9) and one["IoU"] == two["IoU"]
    # and a 2-process training run: rank 0 writes, both ranks step
    train = subprocess.run([*torchrun, "pretrain", "data.root=data/images", *PRETRAIN, "device=cpu", "steps=2", "name=ddp"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert load_checkpoint("runs/ddp/checkpoints/last.pt")["step"] == 2


def test_the_final_checkpoint_is_written_once_after_the_final_evaluation(data, monkeypatch):
    """A last.pt at the final step always holds the final evaluation, so a run killed during that
    evaluation resumes from the previous checkpoint instead of skipping it."""
    saves = []
    original = trainer_module.Trainer.save

    def record(self, name):
        saves.append((name, self.step, "last_metrics" in self.extra))
        return original(self, name)

    monkeypatch.setattr(trainer_module.Trainer, "save", record)
    run("finetune", "data.root=data", *FINETUNE)
    # at step 2 the periodic checkpoint comes before that step's evaluation; at step 4 only the loop's
    assert [s for s in saves if s[0] == "last.pt"] == [("last.pt", 2, False), ("last.pt", 4, True)]


@pytest.mark.parametrize("device, training, deterministic, benchmark", [
    ("cuda", True, False, True),
    ("cuda", True, True, False),
    ("cuda", False, False, False),
    ("cpu", True, False, False),
])
def test_cudnn_times_its_algorithms_only_when_training_on_a_gpu_without_determinism(monkeypatch, device, training, deterministic, benchmark):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: calls.append(mode))
    calls = []
    configure_kernels(torch.device(device), training, deterministic)
    assert torch.backends.cudnn.benchmark is benchmark
    assert calls == [deterministic]  # and a later run without determinism switches it off again


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_grad_checkpointing_from_the_config_gives_the_same_weights_and_statistics(data, stage):
    args = ["data.root=data/images", *PRETRAIN] if stage == "pretrain" else ["data.root=data", *FINETUNE]
    args.append("checkpoint_every=100")  # the final checkpoints only: less disk
    run(stage, *args, "name=plain")
    run(stage, *args, "name=checkpointed", "grad_checkpointing=true")
    plain, checkpointed = weights("runs/plain/checkpoints/last.pt"), weights("runs/checkpointed/checkpoints/last.pt")
    for key in plain:  # BatchNorm running statistics included: updated once per step either way
        torch.testing.assert_close(checkpointed[key], plain[key], msg=key)


def test_evaluation_lets_cudnn_keep_its_heuristics_and_restores_the_setting(monkeypatch):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    class OneImage(torch.utils.data.Dataset):
        num_classes = 2

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long)}

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    evaluate_model(Probe(), OneImage(), {"mode": "whole"}, torch.device("cpu"))
    assert seen == [False] and torch.backends.cudnn.benchmark is True
