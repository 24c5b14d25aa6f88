"""Preemption: stop signals end a run after the step in flight with a checkpoint, --resume auto
continues it, and torchrun's elastic restarts continue from the last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fake_data import FINETUNE, PRETRAIN, interrupt_after
from ddep.cli import main
from ddep.engine import checkpoint as checkpoint_module
from ddep.engine import finetune as finetune_module
from ddep.engine import trainer as trainer_module
from ddep.engine.checkpoint import load_checkpoint
from ddep.engine.preemption import EXIT_PREEMPTED
from test_reliability import assert_same_weights, final_weights, logged_steps

ARGS = {"pretrain": ["data.root=data/images", *PRETRAIN, "steps=6"],
        "finetune": ["data.root=data", *FINETUNE, "steps=6", "eval_every=3"]}
ACCUM = ["optim.grad_accum=2", "data.batch_size=2", "checkpoint_every=100", "deterministic=true"]


def signal_on_micro_batch(monkeypatch, calls: set[int], signum=signal.SIGTERM) -> None:
    """Send ``signum`` to this process at the start of the given micro-batches (1-based)."""
    original, seen = trainer_module.Trainer.backward, [0]

    def backward(self, loss):
        seen[0] += 1
        if seen[0] in calls:
            os.kill(os.getpid(), signum)
        return original(self, loss)

    monkeypatch.setattr(trainer_module.Trainer, "backward", backward)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_sigterm_mid_step_finishes_the_step_saves_and_resume_auto_gives_the_same_weights(data, monkeypatch, capsys, stage):
    assert main([stage, *ARGS[stage], *ACCUM, "name=straight"]) == 0
    with monkeypatch.context() as patch:
        signal_on_micro_batch(patch, {5})  # the first half of step 3 (two micro-batches a step)
        assert main([stage, *ARGS[stage], *ACCUM, "name=stopped"]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert f"ddep {stage}: stopped by SIGTERM after step 3 of 6; checkpoint runs/stopped/checkpoints/last.pt" in err
    assert load_checkpoint("runs/stopped/checkpoints/last.pt")["step"] == 3 == logged_steps("stopped")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert main([stage, *ARGS[stage], *ACCUM, "name=stopped", "--resume", "auto"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("stopped"))


def test_a_run_stopped_where_a_checkpoint_and_a_held_out_evaluation_are_due_chooses_as_an_uninterrupted_one(data, monkeypatch):
    """The checkpoint at such a step records that step's evaluation and best score: the resumed
    run neither skips the evaluation nor replaces a better best.pt by comparing with a stale best."""
    scores = {1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0, 5: 40.0, 6: 45.0}  # held-out mIoU by step: the best at step 2
    steps, original_step, original_evaluate = [], trainer_module.Trainer._after_step, finetune_module.evaluate_model

    def record_step(self):
        steps.append(self.step)
        original_step(self)

    def scripted(model, dataset, *args, **kwargs):
        metrics = original_evaluate(model, dataset, *args, **kwargs)
        return {**metrics, "mIoU": scores[steps[-1]]} if len(dataset) == 3 else metrics  # the 3 held-out images

    monkeypatch.setattr(trainer_module.Trainer, "_after_step", record_step)
    monkeypatch.setattr(finetune_module, "evaluate_model", scripted)
    args = ["data.root=data", *FINETUNE, "steps=6", "data.select_fraction=0.34", "eval_every=1", "checkpoint_every=2"]
    assert main(["finetune", *args, "name=straight"]) == 0
    with monkeypatch.context() as patch:
        signal_on_micro_batch(patch, {2})  # during step 2, at which a checkpoint and an evaluation are due
        assert main(["finetune", *args, "name=stopped"]) == EXIT_PREEMPTED
    assert load_checkpoint("runs/stopped/checkpoints/last.pt")["extra"]["best_step"] == 2
    assert main(["finetune", *args, "name=stopped", "--resume", "auto"]) == 0
    for name in ("straight", "stopped"):
        metrics = json.loads(Path(f"runs/{name}/metrics.json").read_text())
        assert (metrics["selected_step"], metrics["select_mIoU"]) == (2, 50.0), name
    assert_same_weights(load_checkpoint("runs/straight/checkpoints/best.pt")["model"],
                        load_checkpoint("runs/stopped/checkpoints/best.pt")["model"])


def test_a_second_signal_during_the_save_changes_nothing(data, monkeypatch, capsys):
    args = [*ARGS["pretrain"], *ACCUM]
    assert main(["pretrain", *args, "name=straight"]) == 0
    original = checkpoint_module.save_checkpoint

    def save_interrupted(state, path, **kwargs):  # a SIGINT and a SIGTERM arrive while the file is written
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(state, path, **kwargs)

    with monkeypatch.context() as patch:
        signal_on_micro_batch(patch, {3})
        patch.setattr(trainer_module, "save_checkpoint", save_interrupted)
        assert main(["pretrain", *args, "name=stopped"]) == EXIT_PREEMPTED
    assert "stopped by SIGTERM after step 2 of 6" in capsys.readouterr().err  # the first signal's name
    assert load_checkpoint("runs/stopped/checkpoints/last.pt")["step"] == 2
    assert not list(Path("runs/stopped/checkpoints").glob(".*.tmp*"))
    assert main(["pretrain", *args, "name=stopped", "--resume", "auto"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("stopped"))


def test_resume_auto_on_an_empty_a_resumable_and_a_foreign_run_folder(data, capsys):
    args = [*ARGS["pretrain"], "name=auto"]
    assert main(["pretrain", *args, "steps=2", "--resume", "auto"]) == 0  # empty: starts
    assert load_checkpoint("runs/auto/checkpoints/last.pt")["step"] == 2
    weights = final_weights("auto")
    assert main(["pretrain", *args, "steps=2", "--resume", "auto", "progress=true"]) == 0  # finished: nothing to train
    assert load_checkpoint("runs/auto/checkpoints/last.pt")["step"] == 2
    assert_same_weights(final_weights("auto"), weights)
    before = Path("runs/auto/checkpoints/last.pt").read_bytes()
    assert main(["pretrain", *args, "steps=2", "noise.std=0.3", "--resume", "auto"]) == 1  # foreign: refused
    err = capsys.readouterr().err
    assert "runs/auto holds a run made with another config (noise.std: 0.22 there, 0.3 here)" in err
    assert Path("runs/auto/checkpoints/last.pt").read_bytes() == before
    # the config file's resume: auto does the same; a bare --resume still continues whatever the config
    Path("auto.yaml").write_text("resume: auto\n")
    assert main(["pretrain", "--config", "auto.yaml", *args, "steps=2"]) == 0
    assert main(["pretrain", *args, "steps=3", "--resume"]) == 0
    assert load_checkpoint("runs/auto/checkpoints/last.pt")["step"] == 3


def test_resume_auto_continues_a_run_that_an_older_ddep_made(data, monkeypatch):
    """Its config.yaml lacks the keys added since (their defaults count) and, beside init, holds
    the default model an older ddep recorded instead of init's."""
    assert main(["pretrain", *ARGS["pretrain"], "steps=1", "name=pre"]) == 0
    args = [*ARGS["finetune"], "init=runs/pre/model", "name=old"]
    interrupt_after(monkeypatch, "finetune", args, step=3)
    saved = yaml.safe_load(Path("runs/old/config.yaml").read_text())
    del saved["data"]["allow_trained_images"], saved["data"]["val_split_file"]
    saved["model"]["encoder"] = "resnet50"
    Path("runs/old/config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["finetune", *args, "--resume", "auto"]) == 0
    assert load_checkpoint("runs/old/checkpoints/last.pt")["step"] == 6


def test_checkpoint_minutes_saves_by_the_clock(data, monkeypatch):
    saves, original, clock = [], trainer_module.Trainer.save, iter(range(0, 10_000, 40))  # 40 s pass per reading

    def record(self, name):
        saves.append((name, self.step))
        return original(self, name)

    monkeypatch.setattr(trainer_module.Trainer, "save", record)
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(monotonic=lambda: float(next(clock)), perf_counter=time.perf_counter))
    assert main(["pretrain", *ARGS["pretrain"], "checkpoint_every=100", "checkpoint_minutes=1"]) == 0
    # one reading at start-up, one per step and one per save: a minute has passed at every other step
    assert saves == [("last.pt", 2), ("last.pt", 4), ("last.pt", 6)]


@pytest.mark.slow
def test_sigusr1_to_the_process_group_with_workers_requeues_the_slurm_job(data, tmp_path):
    """SLURM signals every process of the job: the DataLoader worker leaves it to the trainer."""
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    stub.chmod(0o755)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_JOB_ID": "4242", "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "ddep", "pretrain", *ARGS["pretrain"], "steps=400", "checkpoint_every=2",
               "data.num_workers=1", "name=slurm"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not Path("runs/slurm/checkpoints/last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGUSR1)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err
    assert "stopped by SIGUSR1" in err and "DataLoader worker" not in err
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert load_checkpoint("runs/slurm/checkpoints/last.pt")["step"] < 400


ELASTIC_WORKER = '''
"""ddep under torchrun; on the first attempt rank 1 dies (SIGKILL) right after step KILL_AT."""
import os, signal, sys
from ddep.cli import main
from ddep.engine import trainer

if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    original = trainer.Trainer._after_step

    def dying(self):
        original(self)
        if self.step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.Trainer._after_step = dying
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_group_continues_from_the_last_checkpoint(data, tmp_path):
    worker = tmp_path / "elastic_worker.py"
    worker.write_text(ELASTIC_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KILL_AT": "3"}
    # a group that hangs connecting (gloo, rarely, on two busy cores) fails after 30 s and is restarted
    args = ["pretrain", *ARGS["pretrain"], "device=cpu", "checkpoint_every=2", "deterministic=true", "dist_timeout_minutes=0.5"]

    def torchrun(name: str, restarts: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               f"--max-restarts={restarts}", "--monitor-interval=0.5", str(worker), *args, f"name={name}"],
                              env=env, capture_output=True, text=True, timeout=300)

    env["KILL_AT"] = "-1"
    reference = torchrun("reference", 0)
    assert reference.returncode == 0, reference.stderr
    env["KILL_AT"] = "3"
    restarted = torchrun("elastic", 3)  # the same command line: the restarted group resumes on its own
    assert restarted.returncode == 0, restarted.stderr
    assert load_checkpoint("runs/elastic/checkpoints/last.pt")["step"] == 6
    logged = [line.split(",")[0] for line in Path("runs/elastic/log.csv").read_text().splitlines() if ",loss," in line]
    # step 3 ran twice, before the kill and after the restart from 2; the restart dropped the first one's log rows
    started = restarted.stderr.count("randomly initialised encoder")  # each process warns once as it starts
    assert started >= 2 * reference.stderr.count("randomly initialised encoder") and logged == ["1", "2", "3", "4", "5", "6"]
    assert_same_weights(final_weights("reference"), final_weights("elastic"))


EXIT_WITH_A_LIVE_LOADER = """
import sys, torch
from ddep.engine.distributed import DistInfo
from ddep.engine.trainer import training_loader

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.zeros(2)}

batches = iter(training_loader(Items(), 0, 2, 2, DistInfo()))  # two workers that ignore stop signals
next(batches)
sys.exit(0)  # with the iterator alive: Python's exit terminates the workers
"""


def test_a_program_that_exits_with_a_live_loader_is_not_held_by_its_workers(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_LIVE_LOADER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30  # it hung for good before
