"""Crashes cost minutes, not runs: SIGKILL at random points, damaged and planted checkpoints."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fake_data import FINETUNE, PRETRAIN, interrupt_after
from ddep.atomic import write_atomic
from ddep.cli import main
from ddep.engine import trainer as trainer_module
from ddep.engine.checkpoint import load_checkpoint, previous_checkpoint
from ddep.engine.preemption import EXIT_PREEMPTED

ARGS = {"pretrain": ["data.root=data/images", *PRETRAIN], "finetune": ["data.root=data", *FINETUNE]}


def final_weights(name: str) -> dict:
    return load_checkpoint(Path("runs") / name / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(data, monkeypatch, caplog):
    args = [*ARGS["pretrain"], "checkpoint_every=1"]
    assert main(["pretrain", *args, "name=straight"]) == 0
    interrupt_after(monkeypatch, "pretrain", [*args, "name=damaged"], step=3)
    last = Path("runs/damaged/checkpoints/last.pt")
    assert load_checkpoint(previous_checkpoint(last))["step"] == 2 and load_checkpoint(last)["step"] == 3
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk

    assert main(["pretrain", *args, "name=damaged", "--resume"]) == 0
    assert f"{last}: unreadable or truncated checkpoint" in caplog.text
    assert "kept as last.pt.damaged, resuming from the previous checkpoint" in caplog.text
    assert_same_weights(final_weights("straight"), final_weights("damaged"))
    assert last.with_name("last.pt.damaged").is_file()  # set aside, never rotated over a good checkpoint


@pytest.mark.parametrize("damage", [b"\0" * 4096, b"PK\x03\x04" + bytes(range(256)) * 8, b"\x80\x04garbage"])
def test_zeroed_or_garbage_checkpoints_are_damaged_not_unsafe(tmp_path, damage):
    from ddep.engine.checkpoint import CheckpointError, UnsafeCheckpointError, load_resumable, save_checkpoint

    last = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "model_config": {}, "step": 1}, last, keep_previous=True)
    save_checkpoint({"model": {"w": torch.ones(2)}, "model_config": {}, "step": 2}, last, keep_previous=True)
    last.write_bytes(damage)  # what a power loss or a bad disk leaves
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(last)
    assert not isinstance(error.value, UnsafeCheckpointError) and "unreadable or truncated checkpoint" in str(error.value)
    state, used = load_resumable(last)
    assert (state["step"], used) == (1, previous_checkpoint(last))


def test_keeping_the_previous_checkpoint_never_leaves_last_missing(tmp_path, monkeypatch):
    from ddep.atomic import write_atomic

    last, previous = tmp_path / "last.pt", tmp_path / "last-previous.pt"
    write_atomic(last, lambda f: f.write(b"one"), previous)
    write_atomic(last, lambda f: f.write(b"two"), previous)
    assert (last.read_bytes(), previous.read_bytes()) == (b"two", b"one")

    def crash(f):
        f.write(b"thr")
        raise KeyboardInterrupt  # killed while writing the third

    with pytest.raises(KeyboardInterrupt):
        write_atomic(last, crash, previous)
    assert (last.read_bytes(), previous.read_bytes()) == (b"two", b"one")

    renames = []
    original = Path.replace

    def crash_at_the_final_rename(self, target):
        if Path(target) == last:
            renames.append(self)
            raise KeyboardInterrupt  # killed between keeping the previous and renaming the new
        return original(self, target)

    monkeypatch.setattr(Path, "replace", crash_at_the_final_rename)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(last, lambda f: f.write(b"four"), previous)
    monkeypatch.setattr(Path, "replace", original)
    assert renames and (last.read_bytes(), previous.read_bytes()) == (b"two", b"two")


def test_stale_temporaries_of_dead_processes_are_removed_not_a_live_ones(tmp_path):
    from ddep.atomic import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".last.pt.tmp{int(dead.stdout)}", tmp_path / f".last.pt.tmp{os.getpid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()


def test_resume_refuses_a_planted_pickle_even_with_a_previous_checkpoint(data, monkeypatch, capsys, tmp_path):
    args = [*ARGS["pretrain"], "checkpoint_every=1"]
    interrupt_after(monkeypatch, "pretrain", [*args, "name=planted"], step=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    last = Path("runs/planted/checkpoints/last.pt")
    torch.save({"model": Payload(), "model_config": {}}, last)  # a checkpoint in torch's own format
    assert previous_checkpoint(last).is_file()
    assert main(["pretrain", *args, "name=planted", "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{last}: refused, it holds pickled objects other than tensors" in err
    assert not marker.exists()


def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def logged_steps(name: str) -> int:
    """The last step whose loss log.csv holds (log_every=1: every completed step)."""
    rows = [line.split(",") for line in (Path("runs") / name / "log.csv").read_text().splitlines()[1:]]
    return max(int(step) for step, key, _ in rows if key == "loss")


def signal_at_random_points(stage: str, args: list[str], signum: int, times: int, rng: random.Random, steps: int) -> list[int]:
    """Start the run in a subprocess, send ``signum`` at a random moment once it has trained a
    step, and restart it with ``--resume auto``, ``times`` times; then let it finish.
    Returns the exit status of every signalled attempt (after a SIGTERM each attempt must have
    left a checkpoint at its last completed step)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "ddep", stage, *args, "--resume", "auto"]
    checkpoints, log = Path("runs/killed/checkpoints"), Path("runs/killed/log.csv")
    codes = []
    for attempt in range(times):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        seen = mtime(log)
        while process.poll() is None and time.monotonic() - started < 120:  # wait for a newly trained step
            if mtime(log) != seen:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signum)
            _, stderr = process.communicate()
            codes.append(process.returncode)
            if process.returncode == EXIT_PREEMPTED:  # nothing lost beyond the step in flight
                step = load_checkpoint(checkpoints / "last.pt")["step"]
                assert f"after step {step} of {steps}; checkpoint runs/killed/checkpoints/last.pt" in stderr
                assert logged_steps("killed") == step
        process.wait()
    final = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert final.returncode == 0, final.stderr
    return codes


@pytest.mark.slow
@pytest.mark.parametrize("stage, signum", [("pretrain", signal.SIGKILL), ("finetune", signal.SIGKILL),
                                           ("pretrain", signal.SIGTERM), ("finetune", signal.SIGTERM)])
def test_a_signal_at_random_points_then_resume_auto_gives_the_uninterrupted_weights(data, stage, signum):
    """SIGKILL loses the steps since the last checkpoint; SIGTERM (a scheduler's notice) none."""
    every, steps = (1, 12) if signum == signal.SIGKILL else (6, 16)
    args = [*ARGS[stage], f"steps={steps}", f"checkpoint_every={every}", "eval_every=4" if stage == "finetune" else "image_every=4",
            "deterministic=true", "log_every=1"]
    assert main([stage, *args, "name=straight"]) == 0
    codes = signal_at_random_points(stage, [*args, "name=killed"], signum, 4, random.Random(f"{stage}{signum}"), steps)
    hit = -signal.SIGKILL if signum == signal.SIGKILL else EXIT_PREEMPTED
    assert codes.count(hit) >= 3  # most signals land while the run trains (the rest after it)
    assert_same_weights(final_weights("straight"), final_weights("killed"))
    assert not list(Path("runs/killed/checkpoints").glob(".*.tmp*"))  # no half-written files left behind
    if stage == "finetune":
        assert Path("runs/killed/metrics.json").is_file()


def test_a_nearly_full_disk_is_refused_before_the_first_step(data, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    assert main(["pretrain", *ARGS["pretrain"]]) == 1
    err = capsys.readouterr().err
    assert "the run folder runs/pretrain has 1 MiB free; this run's checkpoints need about" in err
    assert not Path("runs/pretrain/checkpoints").exists()


def test_a_full_disk_during_a_save_names_the_file_leaves_no_temporary_and_the_run_resumes(data, monkeypatch, capsys):
    args = [*ARGS["finetune"], "checkpoint_every=1", "eval_every=0"]
    assert main(["finetune", *args, "name=straight"]) == 0
    original = trainer_module.save_checkpoint

    def disk_full_at_step_2(state, path, **kwargs):
        if state["step"] != 2:
            return original(state, path, **kwargs)

        def write_half(f):
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        write_atomic(path, write_half)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_checkpoint", disk_full_at_step_2)
        assert main(["finetune", *args, "name=full"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("ddep finetune: error: [Errno 28] cannot write runs/full/checkpoints/last.pt: No space left on device "
                       "at step 2; the run continues from runs/full/checkpoints/last.pt (step 1) with the same command and "
                       "--resume auto once there is space")
    assert sorted(p.name for p in Path("runs/full/checkpoints").iterdir()) == ["last.pt"]  # no temporary left
    assert load_checkpoint("runs/full/checkpoints/last.pt")["step"] == 1
    assert main(["finetune", *args, "name=full", "--resume", "auto"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("full"))


def test_a_resumed_run_counts_the_checkpoints_it_replaces_as_free_space(data, monkeypatch, capsys, stage="pretrain"):
    """Two checkpoints' worth of free space is too little for a new run (the last, the one before,
    one being written, the best and the model) but enough for one that already holds two."""
    from collections import namedtuple

    interrupt_after(monkeypatch, stage, [*ARGS[stage], "checkpoint_every=1"], step=2)
    checkpoint = Path(f"runs/{stage}/checkpoints/last.pt").stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage(2**40, 2**40, 2 * checkpoint))
    assert main([stage, *ARGS[stage], "checkpoint_every=1", "name=new"]) == 1
    assert "this run's checkpoints need about" in capsys.readouterr().err
    assert main([stage, *ARGS[stage], "checkpoint_every=1", "--resume", "auto"]) == 0


def test_a_resume_that_cannot_load_changes_nothing_in_the_run_folder(data, monkeypatch, capsys):
    """Resuming with an init of another architecture: one line naming both, and the run as it was."""
    fpn = ["model.arch=smp:FPN", "model.encoder=tu-test_resnet"]
    assert main(["pretrain", *ARGS["pretrain"], *fpn, "steps=1", "name=fpn"]) == 0
    args = [*ARGS["finetune"], "init=runs/pretrain/model"]
    assert main(["pretrain", *ARGS["pretrain"], "steps=1"]) == 0
    interrupt_after(monkeypatch, "finetune", args, step=2)
    before = {p: p.read_bytes() for p in Path("runs/finetune").rglob("*") if p.is_file()}
    without_model = [arg for arg in ARGS["finetune"] if not arg.startswith("model.")]
    assert main(["finetune", *without_model, "init=runs/fpn/model", "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (
        "ddep finetune: error: runs/finetune/checkpoints/last.pt holds a unet on resnet18 (decoder_width 1, 3 classes) model "
        "but this run builds a smp:FPN on tu-test_resnet (decoder_width 1, 3 classes) model: resume with the run's own "
        "settings (its config.yaml), or name=... for a new run")
    assert {p: p.read_bytes() for p in Path("runs/finetune").rglob("*") if p.is_file()} == before
    assert main(["finetune", *args, "--resume", "auto"]) == 0


def test_out_of_memory_suggests_a_smaller_batch(data, monkeypatch, capsys):
    from ddep.engine import pretrain as pretrain_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(pretrain_module.Trainer, "backward", out_of_memory)
    assert main(["pretrain", *ARGS["pretrain"]]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddep pretrain: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert err.endswith("try a smaller data.batch_size with a larger optim.grad_accum (the same images per step), or amp=bf16")
    assert len(err.splitlines()) == 1


def test_a_transunet_crop_that_is_not_a_multiple_of_16_is_refused_before_any_work(data, capsys):
    assert main(["pretrain", "data.root=data/images", "model.arch=transunet", "data.crop_size=40"]) == 1
    assert "data.crop_size=40: TransUNet needs a multiple of 16 (its patch size), e.g. 48" in capsys.readouterr().err
    assert not Path("runs").exists()
    # a TransUNet that init brings is checked as early
    tiny = "model.options={depth: 1, embed_dim: 64, num_heads: 2, resnet_layers: [1, 1, 1], resnet_width: 0.5}"
    common = ["data.num_workers=0", "progress=false", "data.batch_size=2", "steps=1", "data.crop_size=32"]
    transunet = ["model.arch=transunet", "model.encoder=vit_base_r50_s16_224", tiny]
    assert main(["pretrain", "data.root=data/images", *transunet, *common, "name=tu"]) == 0
    assert main(["finetune", "data.root=data", "data.options.num_classes=3", "init=runs/tu/model", *common, "data.crop_size=40"]) == 1
    assert "data.crop_size=40: TransUNet needs a multiple of 16" in capsys.readouterr().err
    assert not Path("runs/finetune").exists()


def broken_corpus(root: Path, monkeypatch) -> dict[str, str]:
    """One file per kind of broken or odd input, and the outcome each must get."""
    import numpy as np
    from PIL import Image

    import fake_data

    images = root / "images"
    fake_data.save(fake_data.rgb(0), images / "ok.jpg")
    fake_data.save(fake_data.rgb(1).convert("L"), images / "gray.png")
    fake_data.save(Image.fromarray(np.full((32, 64, 4), 200, np.uint8)), images / "rgba.png")
    fake_data.save(fake_data.rgb(2), images / "png_named.jpg")  # wrong extension: read by content
    data = (images / "ok.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    fake_data.save(Image.fromarray(np.full((32, 64), 1000, np.uint16)), images / "sixteen_bit.png")
    fake_data.save(fake_data.rgb(3, size=(160, 160)), images / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 160 x 160 is then a decompression bomb
    return {"ok.jpg": "read", "gray.png": "converted", "rgba.png": "converted", "png_named.jpg": "converted",
            "truncated.jpg": "truncated or corrupt image", "empty.jpg": "not a readable image",
            "text.jpg": "not a readable image", "sixteen_bit.png": "more than 8 bits per channel",
            "huge.png": "too large to decode safely"}


def test_every_broken_input_gets_its_documented_outcome(tmp_path, monkeypatch, caplog):
    from ddep.data import build_dataset
    from ddep.data.io import DataError, read_image

    outcomes = broken_corpus(tmp_path, monkeypatch)
    bad = {name for name, outcome in outcomes.items() if outcome not in ("read", "converted")}
    # labeled and evaluation data: converted, or an error naming the file (never dropped)
    for name, outcome in outcomes.items():
        if name in bad:
            with pytest.raises(DataError, match=f"{name}: .*{outcome}"):
                read_image(tmp_path / "images" / name)
        else:
            assert read_image(tmp_path / "images" / name).mode == "RGB"
    # unlabeled pretraining data: each bad file skipped, counted and logged; the good ones all read
    unlabeled = build_dataset("unlabeled", tmp_path / "images", cache_dir=tmp_path / "cache")
    assert len(unlabeled) == len(outcomes)
    read = {unlabeled[i]["name"] for i in range(len(unlabeled))}
    assert read == set(outcomes) - bad and unlabeled.skipped == len(bad) == 5
    assert all(name in caplog.text for name in bad) and "skipping unreadable image (5 skipped so far)" in caplog.text


def test_broken_masks_are_errors_naming_the_file(tmp_path):
    import fake_data
    from ddep.data import build_dataset
    from ddep.data.io import DataError

    fake_data.folder(tmp_path, count=3)
    fake_data.save(fake_data.mask([0, 7, 255]), tmp_path / "masks" / "img1.png")  # id 7 of 3 classes
    fake_data.save(fake_data.mask([0], size=(16, 16)), tmp_path / "masks" / "img2.png")  # not the image's size
    dataset = build_dataset("folder", tmp_path, num_classes=3)
    assert dataset[0]["mask"].shape == (32, 64)
    with pytest.raises(DataError, match=r"img1.png: label values 7 outside 0..2 and 255"):
        dataset[1]
    with pytest.raises(DataError, match=r"img2.png: mask is 16x16 but image .*img2.jpg is 64x32"):
        dataset[2]


def test_an_unwritable_output_folder_is_refused_before_any_work(data, capsys):
    Path("a-file").write_text("not a folder")
    assert main(["pretrain", *ARGS["pretrain"], "out_dir=a-file/runs"]) == 1
    assert "cannot write to the run folder a-file/runs/pretrain" in capsys.readouterr().err


def test_decoder_pretraining_on_a_random_encoder_warns(data, caplog):
    assert main(["pretrain", *ARGS["pretrain"], "steps=1"]) == 0  # the tiny runs use a random ResNet-18
    assert "mode=decoder with a randomly initialised encoder: DDeP expects a pretrained encoder" in caplog.text


def nan_on_call(monkeypatch, calls: set[int]) -> None:
    """Make the pretraining loss NaN on the given calls (1-based)."""
    from ddep.engine import pretrain as pretrain_module

    original, count = pretrain_module.denoising_loss, [0]

    def loss(*args, **kwargs):
        count[0] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(pretrain_module, "denoising_loss", loss)


def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(data, monkeypatch, capsys):
    nan_on_call(monkeypatch, {3})
    assert main(["pretrain", *ARGS["pretrain"]]) == 1
    err = capsys.readouterr().err
    assert "ddep pretrain: error: pretrain: loss is nan at step 3 (0 such batches skipped before); the last good checkpoint is " \
           "runs/pretrain/checkpoints/last.pt" in err and "skip_nonfinite=N" in err
    assert load_checkpoint("runs/pretrain/checkpoints/last.pt")["step"] == 2  # the checkpoint before the fault stays


def test_skip_nonfinite_skips_and_counts_the_bad_batches(data, monkeypatch, caplog):
    nan_on_call(monkeypatch, {2, 5})
    assert main(["pretrain", *ARGS["pretrain"], "skip_nonfinite=2"]) == 0
    state = load_checkpoint("runs/pretrain/checkpoints/last.pt")
    assert state["step"] == 4 and state["extra"]["skipped_nonfinite"] == 2  # 4 good steps from 6 batches
    assert "pretrain: loss is nan at step 2; batch skipped (1 of at most 2)" in caplog.text
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_run_resumed_after_a_skipped_batch_reads_what_an_uninterrupted_one_reads(data, monkeypatch):
    """The skipped batch was read: the resumed run's loader starts after it, not one batch early."""
    from fake_data import interrupt_after

    args = [*ARGS["pretrain"], "skip_nonfinite=1", "checkpoint_every=2"]
    with monkeypatch.context() as patch:
        nan_on_call(patch, {2})
        assert main(["pretrain", *args, "name=straight"]) == 0
    with monkeypatch.context() as patch:
        nan_on_call(patch, {2})
        interrupt_after(patch, "pretrain", [*args, "name=resumed"], step=3)  # the checkpoint is step 2's, after the skip
    assert main(["pretrain", *args, "name=resumed", "--resume"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("resumed"))


def test_evaluation_checks_the_classes_before_making_a_run_folder(data, capsys):
    from conftest import tiny_model
    from ddep.models.saving import save_model

    save_model(tiny_model("unet", classes=4), "four-classes")
    assert main(["evaluate", "checkpoint=four-classes", "data.root=data", "data.options={num_classes: 3}", "name=ev"]) == 1
    assert "four-classes predicts 4 classes but folder has 3" in capsys.readouterr().err
    assert not Path("runs/ev").exists()
