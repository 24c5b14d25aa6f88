"""The three stages through the command line, on tiny models and data."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_data import FINETUNE, PRETRAIN, TINY, interrupt_after
from ddep.cli import main
from ddep.engine import trainer as trainer_module
from ddep.engine.evaluate import evaluate_model
from ddep.engine.summary import prediction_rows
from ddep.engine.distributed import DistInfo, resolve_device
from ddep.engine.run import configure_kernels
from ddep.engine.trainer import resolve_amp
from ddep.engine.checkpoint import load_checkpoint
from ddep.models.saving import load_model
from conftest import onnx_matches_pytorch



def run(*args):
    assert main(list(args)) == 0


def test_a_pretraining_result_is_not_scored_nor_drawn_as_classes(data, capsys):
    """It predicts noise in 3 channels: on a folder of 3 classes or fewer, evaluate would take them
    as classes and report a meaningless mIoU, and predict would draw meaningless masks."""
    run("pretrain", "data.root=data/images", *PRETRAIN, "steps=1", "name=pre")
    run("export", "checkpoint=runs/pre/checkpoints/last.pt", "output=exported")
    assert ("a denoising-pretraining result: fine-tune it (ddep finetune init=exported ...) before evaluating or "
            "predicting with it") in capsys.readouterr().out
    shutil.copytree("runs/pre/model", "copied")  # away from its run folder: the weights' header still says it
    for command, path in (("evaluate", "runs/pre/model"), ("evaluate", "runs/pre/checkpoints/last.pt"),
                          ("predict", "runs/pre/model/model.safetensors"), ("evaluate", "exported"),
                          ("predict", "copied")):
        extra = ["data.root=data"] if command == "evaluate" else ["input=data/images/val", "output=preds"]
        assert main([command, f"checkpoint={path}", *extra, "device=cpu"]) == 1
        verb = "evaluate" if command == "evaluate" else "predict with"
        assert (f"{path} is a denoising-pretraining result: it predicts noise, not classes. Fine-tune it first "
                f"(ddep finetune init={path} ...), then {verb} the fine-tuned model") in capsys.readouterr().err
    assert not Path("preds").exists() and not Path("runs/evaluate").exists()
    run("finetune", "init=exported", "data.root=data", *FINETUNE, "steps=1", "name=fine")
    run("evaluate", "checkpoint=runs/fine/model", "data.root=data", "name=scored")  # the fine-tuned model is scored
    # a folder of one's own beside a pretraining config.yaml is not a pretraining run's model/
    shutil.copytree("runs/fine/model", "mine")
    shutil.copy("runs/pre/config.yaml", "config.yaml")
    run("evaluate", "checkpoint=mine", "data.root=data", "name=mine")


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
    assert {"aAcc", "mIoU", "mAcc", "IoU", "inference", "split_hash", "checkpoint_hash", "selected_on"} <= set(metrics)
    # no checkpoint is chosen on the reported split: the final one is the result
    assert metrics["selected_on"] is None and metrics["checkpoint"].endswith("last.pt") and len(metrics["IoU"]) == 3
    assert not (fine / "checkpoints" / "best.pt").exists()
    model = load_model(fine / "checkpoints" / "last.pt")
    assert model.config["classes"] == 3
    pretrained = load_model(pre / "model")
    # fine-tuning started from the pretrained decoder: the same architecture, weights moved on
    assert pretrained.decoder.blocks[0].conv1[0].weight.shape == model.decoder.blocks[0].conv1[0].weight.shape

    run("evaluate", "checkpoint=runs/finetune/checkpoints/last.pt", "data.root=data", "data.options={num_classes: 3}",
        "eval.flip=true", "eval.scales=[0.75, 1.0]", "name=eval-tta")
    evaluated = json.loads(Path("runs/eval-tta/metrics.json").read_text())
    assert evaluated["inference"]["flip"] is True and evaluated["inference"]["scales"] == [0.75, 1.0]
    assert evaluated["num_images"] == 5 and 0 <= evaluated["mIoU"] <= 100

    run("predict", "checkpoint=runs/finetune/model", "input=data/images/val", "output=preds")
    masks = sorted(p.name for p in Path("preds").iterdir())
    assert masks[:2] == ["0.png", "0_overlay.jpg"] and len(masks) == 10

    run("export", "checkpoint=runs/finetune/checkpoints/last.pt", "output=exported", "onnx=true", "onnx_size=[32, 32]")
    import onnx

    onnx.checker.check_model("exported/model.onnx")
    exported = load_model("exported")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), model.eval()(x))
    onnx_matches_pytorch("exported/model.onnx", model, x)  # by onnxruntime, a batch of 2 through a graph traced with 1


def weights(path):
    return load_checkpoint(path)["model"]


#: smp's FPN on timm's test ResNet: a decoder with dropout (0.2), whose draws a resumed run must repeat
DROPOUT_MODEL = ["model.arch=smp:FPN", "model.encoder=tu-test_resnet"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, monkeypatch, stage):
    args = ["data.root=data/images", *PRETRAIN] if stage == "pretrain" else ["data.root=data", *FINETUNE]
    args += DROPOUT_MODEL
    run(stage, *args, "name=straight")

    interrupt_after(monkeypatch, stage, [*args, "name=interrupted"], step=3)  # step 3 logged, not saved
    assert load_checkpoint("runs/interrupted/checkpoints/last.pt")["step"] == 2
    run(stage, *args, "name=interrupted", "--resume")

    straight, resumed = weights("runs/straight/checkpoints/last.pt"), weights("runs/interrupted/checkpoints/last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # the log holds each step once, as the uninterrupted run's (the throughput aside)
    logged = [[row for row in Path(f"runs/{name}/log.csv").read_text().splitlines() if ",images_per_s," not in row]
              for name in ("straight", "interrupted")]
    assert logged[0] == logged[1]


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
        (["finetune", "data.num_classes=3"], "unknown config key 'data.num_classes'; did you mean 'data.options.num_classes'?"),
        (["finetune", "lr=1e-3"], "unknown config key 'lr'; did you mean 'optim.lr'?"),
        (["finetune", "data.root=data"], "finetune on a folder dataset needs its class count: data.options.num_classes=K"),
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
        saves.append((name, self.step, "final_metrics" in self.extra))
        return original(self, name)

    monkeypatch.setattr(trainer_module.Trainer, "save", record)
    run("finetune", "data.root=data", *FINETUNE)
    # at step 2 the periodic checkpoint, after that step's evaluation; at step 4 only the loop's
    assert [s for s in saves if s[0] == "last.pt"] == [("last.pt", 2, False), ("last.pt", 4, True)]


@pytest.mark.parametrize("device, training, deterministic, benchmark", [
    ("cuda", True, False, True),
    ("cuda", True, True, False),
    ("cuda", False, False, False),
    ("cpu", True, False, False),
])
def test_cudnn_times_its_algorithms_only_when_training_on_a_gpu_without_determinism(monkeypatch, device, training, deterministic, benchmark):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only: calls.append((mode, warn_only)))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so that what the call sets is undone after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    calls = []
    configure_kernels(torch.device(device), training, deterministic)
    assert torch.backends.cudnn.benchmark is benchmark
    # a later run without determinism switches it off again; on a GPU, kernels with no
    # deterministic version (bilinear upsampling's backward) warn rather than stop the run
    assert calls == [(deterministic, deterministic and device == "cuda")]
    # deterministic cuBLAS needs its fixed workspace, set before the first matmul
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic and device == "cuda" else None)


@pytest.mark.parametrize("amp, device, capability, resolved", [
    ("auto", "cpu", None, "off"),
    ("auto", "cuda", (9, 0), "bf16"),  # H100
    ("auto", "cuda", (8, 0), "bf16"),  # A100
    ("auto", "cuda", (7, 0), "fp16"),  # V100: no bf16 arithmetic, fp16 with loss scaling
    ("bf16", "cuda", (7, 5), "bf16"),  # as asked
    ("off", "cuda", (9, 0), "off"),
])
def test_amp_auto_is_bf16_on_gpus_that_compute_in_it_and_fp16_on_older_ones(monkeypatch, amp, device, capability, resolved):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_amp(amp, torch.device(device)) == resolved


def test_a_gpu_index_under_torchrun_is_refused_rather_than_shared_by_every_process():
    with pytest.raises(ValueError, match=r"device=cuda:1 under torchrun with 2 processes would put every process on one GPU: "
                                         r"set device=cuda"):
        resolve_device("cuda:1", DistInfo(rank=0, world_size=2, local_rank=0))


def test_a_cublas_workspace_set_after_cuda_started_is_warned_about(monkeypatch, caplog):
    """From Python, after other GPU work, cuBLAS may keep the workspace it has: deterministic=true
    could not hold, and says so."""
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    configure_kernels(torch.device("cuda"), True, True)
    assert "CUBLAS_WORKSPACE_CONFIG is set after CUDA started in this process" in caplog.text
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_on_a_gpu_keeps_a_cublas_workspace_the_user_chose(monkeypatch):
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_kernels(torch.device("cuda"), True, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_grad_checkpointing_from_the_config_gives_the_same_weights_and_statistics(data, stage):
    args = ["data.root=data/images", *PRETRAIN] if stage == "pretrain" else ["data.root=data", *FINETUNE]
    args.append("checkpoint_every=100")  # the final checkpoints only: less disk
    run(stage, *args, "name=plain")
    run(stage, *args, "name=checkpointed", "grad_checkpointing=true")
    plain, checkpointed = weights("runs/plain/checkpoints/last.pt"), weights("runs/checkpointed/checkpoints/last.pt")
    for key in plain:  # BatchNorm running statistics included: updated once per step either way
        torch.testing.assert_close(checkpointed[key], plain[key], msg=key)


def test_evaluation_and_the_report_images_let_cudnn_keep_its_heuristics_restore_the_settings_and_draw_nothing(monkeypatch, tmp_path):
    seen = []

    class Probe(torch.nn.Module):
        config = {"mean": [0.0] * 3, "std": [1.0] * 3, "classes": 2}

        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, self.training))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    class OneImage(torch.utils.data.Dataset):
        num_classes = 2

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long)}

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    state = torch.get_rng_state()
    probe = Probe()
    evaluate_model(probe, OneImage(), {"mode": "whole"}, torch.device("cpu"))
    prediction_rows(probe, OneImage(), {"mode": "whole"}, torch.device("cpu"), tmp_path / "predictions.png")
    assert seen == [(False, False), (False, False)] and torch.backends.cudnn.benchmark is True and probe.training
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the stream training's dropout draws from


class _ValImages(torch.utils.data.Dataset):
    """Five random images and masks, which say whether a loader's worker process read them."""

    num_classes = 3

    def __init__(self, in_workers: bool):
        self.in_workers = in_workers

    def __len__(self):
        return 5

    def __getitem__(self, index):
        assert (torch.utils.data.get_worker_info() is not None) == self.in_workers
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.randn(3, 16, 16, generator=generator), "mask": torch.randint(0, 3, (16, 16), generator=generator)}


class _Pixelwise(torch.nn.Conv2d):
    config = {"mean": [0.0] * 3, "std": [1.0] * 3, "classes": 3}


def test_evaluation_reads_the_images_in_data_num_workers_processes_and_scores_the_same():
    model = _Pixelwise(3, 3, 1)
    alone = evaluate_model(model, _ValImages(in_workers=False), {"mode": "whole"}, torch.device("cpu"))
    read_by_workers = evaluate_model(model, _ValImages(in_workers=True), {"mode": "whole"}, torch.device("cpu"), num_workers=2)
    assert read_by_workers == alone and 0 < alone["mIoU"] < 100


def test_a_held_out_part_of_the_labeled_images_chooses_the_checkpoint(data):
    from ddep.config import load_config
    from ddep.data.splits import split_hash
    from ddep.engine.finetune import finetune_data

    args = ["data.root=data", *FINETUNE, "data.select_fraction=0.34", "eval_every=1"]
    sets = finetune_data(load_config("finetune", overrides=args))
    trained, held = set(sets.train.pairs), set(sets.select.pairs)
    assert len(held) == 3 and len(trained) == 3 and not trained & held  # ceil(0.34 x 6), disjoint
    everything = finetune_data(load_config("finetune", overrides=["data.root=data", *FINETUNE])).train.pairs
    assert trained | held == set(everything) and sets.select is not None
    assert all(pair[0].startswith("images/train/") for pair in held)  # never the reported split

    run("finetune", *args)
    metrics = json.loads(Path("runs/finetune/metrics.json").read_text())
    best = load_checkpoint("runs/finetune/checkpoints/best.pt")
    assert metrics["selected_on"] == split_hash(sets.select.pairs) and metrics["select_images"] == 3
    assert metrics["checkpoint"].endswith("best.pt") and metrics["selected_step"] == best["step"]
    assert metrics["train_images"] == 3 and metrics["train_split_hash"] == split_hash(sets.train.pairs)
    logged = Path("runs/finetune/log.csv").read_text()
    select_scores = [float(line.split(",")[2]) for line in logged.splitlines() if ",select_mIoU," in line]
    assert len(select_scores) == 4 and max(select_scores) == pytest.approx(metrics["select_mIoU"], abs=1e-4)
    # the exported model is the chosen checkpoint's
    chosen = load_model("runs/finetune/model").state_dict()
    assert all(torch.equal(chosen[k], v) for k, v in best["model"].items())


@pytest.mark.parametrize("args, message", [
    (["data.select_fraction=0.5", "eval_every=0"], "data.select_fraction chooses a checkpoint among the periodic evaluations: set eval_every > 0"),
    (["data.select_fraction=1.0"], "data.select_fraction must be in (0, 1)"),
    (["data.select_fraction=0.9", "data.labeled=1"], "data.select_fraction=0.9 of 1 labeled images leaves none to train on"),
])
def test_bad_held_out_settings_are_refused_before_a_run_folder_exists(data, capsys, args, message):
    assert main(["finetune", "data.root=data", *FINETUNE, *args]) == 1
    assert message in capsys.readouterr().err and not Path("runs/finetune").exists()


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_dry_run_prints_the_plan_and_builds_nothing(data, capsys, monkeypatch, stage):
    import ddep.engine.finetune
    import ddep.engine.pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run built a model")

    monkeypatch.setattr(ddep.engine.pretrain, "build_model", refuse)
    monkeypatch.setattr(ddep.engine.finetune, "build_model", refuse)
    common = [*TINY, "data.batch_size=2", "optim.grad_accum=3", "epochs=4", "steps=null", "model.encoder_weights=imagenet"]
    args = ["data.root=data/images"] if stage == "pretrain" else ["data.root=data", "data.options={num_classes: 3}", "data.labeled=4"]
    run(stage, "--dry-run", *args, *common)
    plan = json.loads(capsys.readouterr().out)
    images = 11 if stage == "pretrain" else 4  # pretraining reads every image under the root
    steps = -(-4 * images // 6)  # ceil(epochs x images / (batch x accumulation))
    assert plan["steps"] == steps and plan["images_per_step"] == 6 and plan["train_images"] == images
    assert plan["images_seen"] == steps * 6 and plan["processes"] == 1
    assert plan["epochs" if stage == "pretrain" else "epochs_over_labeled"] == round(steps * 6 / images, 2)
    assert not Path("runs").exists()


def test_fp16_scaler_state_survives_resume(data, monkeypatch):
    """fp16 needs loss scaling (GradScaler); its scale and growth tracker resume with the run."""
    args = ["data.root=data", *FINETUNE, "amp=fp16", "eval_every=0"]
    run("finetune", *args, "name=straight")
    interrupt_after(monkeypatch, "finetune", [*args, "name=interrupted"], step=2)
    saved = load_checkpoint("runs/interrupted/checkpoints/last.pt")["scaler"]
    assert saved["scale"] == 65536.0 and saved["_growth_tracker"] == 2  # two steps without overflow
    run("finetune", *args, "name=interrupted", "--resume")
    straight, resumed = load_checkpoint("runs/straight/checkpoints/last.pt"), load_checkpoint("runs/interrupted/checkpoints/last.pt")
    assert straight["scaler"] == resumed["scaler"] and resumed["scaler"]["_growth_tracker"] == 4
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    # bf16 and fp32 runs carry no scaler state
    run("finetune", "data.root=data", *FINETUNE, "steps=1", "eval_every=0", "name=fp32")
    assert load_checkpoint("runs/fp32/checkpoints/last.pt")["scaler"] == {}


def test_the_decoder_and_head_learn_at_a_multiple_of_the_encoders_rate(data, capsys):
    """optim.decoder_lr_mult (UniMatch V2: 40): two parameter groups under the one schedule, the
    encoder's first; 1 keeps the single group older checkpoints hold."""
    run("finetune", "data.root=data", *FINETUNE, "steps=2", "eval_every=0", "optim.lr=0.01", "optim.warmup_steps=0",
        "optim.min_lr_ratio=0.5", "optim.decoder_lr_mult=40", "name=mult")
    model, groups = load_model("runs/mult/model"), load_checkpoint("runs/mult/checkpoints/last.pt")["optimizer"]["param_groups"]
    encoder = sum(1 for p in model.encoder.parameters() if p.requires_grad)
    assert [len(g["params"]) for g in groups] == [encoder, sum(1 for p in model.parameters() if p.requires_grad) - encoder]
    assert [g["initial_lr"] for g in groups] == [0.01, 0.4]
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.2])  # cosine's end, min_lr_ratio 0.5 of each
    run("finetune", "data.root=data", *FINETUNE, "steps=1", "eval_every=0", "name=one")
    assert len(load_checkpoint("runs/one/checkpoints/last.pt")["optimizer"]["param_groups"]) == 1
    assert main(["finetune", "data.root=data", *FINETUNE, "optim.decoder_lr_mult=0", "name=zero"]) == 1
    assert "optim.decoder_lr_mult must be > 0; got 0" in capsys.readouterr().err and not Path("runs/zero").exists()
