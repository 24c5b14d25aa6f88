"""Preemption: stop signals end a run at the next micro-batch with a checkpoint, --resume auto
continues it exactly, and torchrun's elastic restarts continue from the last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fake_data import FINETUNE, PRETRAIN, interrupt_after
from ddep.cli import main
from ddep.engine import checkpoint as checkpoint_module
from ddep.engine import finetune as finetune_module
from ddep.engine import trainer as trainer_module
from ddep.engine.checkpoint import load_checkpoint
from ddep.engine.preemption import EXIT_PREEMPTED
from ddep.engine.run import config_differences
from test_engine import DROPOUT_MODEL
from test_reliability import assert_same_weights, final_weights, logged_steps

ARGS = {"pretrain": ["data.root=data/images", *PRETRAIN, "steps=6"],
        "finetune": ["data.root=data", *FINETUNE, "steps=6", "eval_every=3"]}
ACCUM = ["optim.grad_accum=2", "data.batch_size=2", "checkpoint_every=100", "deterministic=true"]


def signal_on_micro_batch(monkeypatch, calls: set[int], signum=signal.SIGTERM) -> list[int]:
    """Send ``signum`` to this process at the start of the given micro-batches (1-based); the
    returned list counts the micro-batches that reached ``backward``."""
    original, seen = trainer_module.Trainer.backward, [0]

    def backward(self, loss):
        seen[0] += 1
        if seen[0] in calls:
            os.kill(os.getpid(), signum)
        return original(self, loss)

    monkeypatch.setattr(trainer_module.Trainer, "backward", backward)
    return seen


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_sigterm_after_a_step_saves_it_and_resume_auto_gives_the_same_weights(data, monkeypatch, capsys, stage):
    assert main([stage, *ARGS[stage], *ACCUM, "name=straight"]) == 0
    with monkeypatch.context() as patch:
        signal_on_micro_batch(patch, {6})  # the second half of step 3 (two micro-batches a step)
        assert main([stage, *ARGS[stage], *ACCUM, "name=stopped"]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert f"ddep {stage}: stopped by SIGTERM after step 3 of 6; checkpoint runs/stopped/checkpoints/last.pt (step 3, " in err
    assert load_checkpoint("runs/stopped/checkpoints/last.pt")["step"] == 3 == logged_steps("stopped")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert main([stage, *ARGS[stage], *ACCUM, "name=stopped", "--resume", "auto"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("stopped"))


@pytest.mark.parametrize("signalled, saved", [(6, 1), (2, 0)])
def test_sigterm_within_an_accumulated_step_stops_at_the_next_micro_batch_and_the_resumed_run_redoes_the_step(
        data, monkeypatch, capsys, signalled, saved):
    """The stop waits for one micro-batch, not for the step's other three: the checkpoint holds the
    step's start (weights, batch-norm statistics, dropout and noise streams), so the resumed run
    equals an uninterrupted one; a stop in the first step saves step 0."""
    args = ["finetune", *ARGS["finetune"], *DROPOUT_MODEL, "steps=3", "optim.grad_accum=4", "data.batch_size=2",
            "deterministic=true"]
    assert main([*args, "name=straight"]) == 0
    with monkeypatch.context() as patch:
        seen = signal_on_micro_batch(patch, {signalled})
        assert main([*args, "name=stopped"]) == EXIT_PREEMPTED
    assert seen[0] == signalled  # the signalled micro-batch was the last one run
    err = capsys.readouterr().err
    assert (f"stopped by SIGTERM during step {saved + 1} of 3 (a resumed run redoes it); checkpoint "
            f"runs/stopped/checkpoints/last.pt (step {saved}, written ") in err
    state = load_checkpoint("runs/stopped/checkpoints/last.pt")
    assert state["step"] == saved
    assert main([*args, "name=stopped", "--resume", "auto"]) == 0
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
        signal_on_micro_batch(patch, {3})  # during step 2
        patch.setattr(trainer_module, "save_checkpoint", save_interrupted)
        assert main(["pretrain", *args, "name=stopped"]) == EXIT_PREEMPTED
    assert "stopped by SIGTERM during step 2 of 6" in capsys.readouterr().err  # the first signal's name
    assert load_checkpoint("runs/stopped/checkpoints/last.pt")["step"] == 1
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
    """Its config.yaml lacks the keys added since (their defaults count), holds one ddep no longer
    has and, beside init, the default model an older ddep recorded instead of init's."""
    assert main(["pretrain", *ARGS["pretrain"], "steps=1", "name=pre"]) == 0
    args = [*ARGS["finetune"], "init=runs/pre/model", "name=old"]
    interrupt_after(monkeypatch, "finetune", args, step=3)
    saved = yaml.safe_load(Path("runs/old/config.yaml").read_text())
    del saved["data"]["allow_trained_images"], saved["data"]["val_split_file"]
    saved["data"]["val_batch_size"] = 1  # removed: it never did anything
    saved["model"]["encoder"] = "resnet50"
    Path("runs/old/config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["finetune", *args, "--resume", "auto"]) == 0
    assert load_checkpoint("runs/old/checkpoints/last.pt")["step"] == 6


def test_a_setting_ddep_no_longer_has_is_no_difference_but_an_option_it_lacks_is():
    config = {"seed": 0, "data": {"split": "train", "options": {}}}
    saved = {"seed": 0, "data": {"split": "train", "val_batch_size": 4, "options": {"num_classes": 3}}}
    assert config_differences(saved, config) == ["data.options.num_classes: 3 there, None here"]


def test_a_run_resumed_on_another_kind_of_device_warns_reseeds_and_finishes(data, monkeypatch, caplog):
    """A GPU generator's state (16 bytes: seed and offset) cannot set a CPU generator, nor a CPU's
    a GPU's (a ``device: auto`` run moved between machines): the resumed run says so and goes on."""
    args = [*ARGS["pretrain"], "checkpoint_every=2", "name=moved"]
    interrupt_after(monkeypatch, "pretrain", args, step=2)
    path = Path("runs/moved/checkpoints/last.pt")
    state = load_checkpoint(path)
    for rng in state["rng"].get("ranks", [state["rng"]]):
        rng["generator"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator saves it
    torch.save(state, path)
    seen = []
    original = trainer_module.load_resumable
    monkeypatch.setattr(trainer_module, "load_resumable", lambda p, map_location: seen.append(map_location) or original(p, map_location))
    assert main(["pretrain", *args, "--resume", "auto"]) == 0
    assert "runs/moved/checkpoints/last.pt: saved on another kind of device than this run's cpu" in caplog.text
    assert logged_steps("moved") == 6
    # read onto the CPU whatever the device: Adam keeps its step counters where they were loaded,
    # and on a GPU they would cost a sync per parameter tensor and step
    assert seen == ["cpu"]


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


TORCHRUN_WORKER = """
\"\"\"ddep under torchrun, with the faults the test asks for through the environment.\"\"\"
import os, signal, sys, time
from ddep.cli import main
from ddep.engine import trainer

env, seen = os.environ, [0]
restart, node, rank = int(env["TORCHELASTIC_RESTART_COUNT"]), env.get("NODE", "0"), env["RANK"]
after_step, backward = trainer.Trainer._after_step, trainer.Trainer.backward


def faulty_after_step(self):
    after_step(self)
    if restart == 0 and rank == "1" and self.step == int(env.get("KILL_WORKER_AT", -1)):
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dies; its agent restarts the group
    if node == "1" and self.step == int(env.get("KILL_NODE_AT", -1)):
        os.kill(os.getppid(), signal.SIGKILL)  # the whole node dies: its torchrun agent, then its worker
        os.kill(os.getpid(), signal.SIGKILL)


def slow_backward(self, loss):
    seen[0] += 1
    if node == "0" and seen[0] == int(env.get("SIGNAL_AGENT_AT", -1)):
        os.kill(os.getppid(), signal.SIGUSR1)  # what srun does to the node's torchrun on SLURM's --signal
    time.sleep(float(env.get("SLOW", 0)))
    return backward(self, loss)


trainer.Trainer._after_step, trainer.Trainer.backward = faulty_after_step, slow_backward
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_on_one_node_and_on_two_a_restart_a_signal_and_a_lost_node_all_end_in_the_uninterrupted_weights(data, tmp_path):
    """Two processes: torchrun's restart of a killed worker continues from the last checkpoint; on
    two nodes (two torchrun agents on 127.0.0.1, c10d rendezvous) SLURM's SIGUSR1 to one node's
    agent stops both ranks at the next micro-batch with a checkpoint, well inside torchrun's
    shutdown timeout that the rest of the step would overrun, and requeues the job; a node lost
    afterwards costs the steps since the last checkpoint, and the resumed job ends as an
    uninterrupted one."""
    worker = tmp_path / "torchrun_worker.py"
    worker.write_text(TORCHRUN_WORKER)
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.args"}\n')
    stub.chmod(0o755)
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    # a group that hangs connecting (gloo, rarely, on two busy cores) fails after 30 s and is restarted
    args = ["pretrain", *ARGS["pretrain"], "steps=4", "optim.grad_accum=4", "data.batch_size=2", "checkpoint_every=2",
            "device=cpu", "deterministic=true", "dist_timeout_minutes=0.5", "--resume", "auto"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--monitor-interval=0.5"]

    def one_node(name: str, restarts: int, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*torchrun, "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}", str(worker), *args,
                               f"name={name}"], env={**base, **env}, capture_output=True, text=True, timeout=300)

    def two_nodes(name: str, **env: str) -> list[subprocess.Popen]:
        rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                      "--rdzv-id=4242", "--local-addr=127.0.0.1", "--max-restarts=0", "--shutdown-timeout=6",
                      "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1"]
        return [subprocess.Popen([*torchrun, *rendezvous, str(worker), *args, f"name={name}"], stderr=subprocess.PIPE, text=True,
                                 env={**base, **env, "NODE": str(node), "SLURM_JOB_ID": "4242"}) for node in (0, 1)]

    def finish(agents: list[subprocess.Popen]) -> list[tuple[int, str]]:
        return [(agent.communicate(timeout=300)[1], agent.returncode)[::-1] for agent in agents]

    reference = one_node("reference", 0)
    assert reference.returncode == 0, reference.stderr
    restarted = one_node("restarted", 3, KILL_WORKER_AT="3")  # the same command line: the new group resumes on its own
    assert restarted.returncode == 0, restarted.stderr
    started = "randomly initialised encoder"  # each process warns once as it starts
    assert restarted.stderr.count(started) >= 2 * reference.stderr.count(started) > 0  # the group started again
    logged = [line.split(",")[0] for line in Path("runs/restarted/log.csv").read_text().splitlines() if ",loss," in line]
    assert logged == ["1", "2", "3", "4"]  # step 3 ran twice; the restart from 2 dropped the first one's log rows
    assert_same_weights(final_weights("reference"), final_weights("restarted"))

    # SIGUSR1 at the start of step 2's first of four micro-batches of 2 s: the step would end 8 s later, past
    # torchrun's 6 s shutdown timeout
    (node0, err0), (node1, err1) = finish(two_nodes("nodes", SLOW="2", SIGNAL_AGENT_AT="5"))
    assert node0 != 0 and node1 != 0, err0 + err1
    both = err0 + err1
    assert "stopped by SIGUSR1 during step 2 of 4 (a resumed run redoes it); checkpoint runs/nodes/checkpoints/last.pt (step 1" in both
    assert "Unable to shutdown process" not in both  # no worker was SIGKILLed by torchrun
    assert load_checkpoint("runs/nodes/checkpoints/last.pt")["step"] == 1
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]  # by rank 0 alone

    (node0, err0), (node1, err1) = finish(two_nodes("nodes", KILL_NODE_AT="3"))  # requeued: resumes, then node 1 dies
    assert node1 == -signal.SIGKILL and node0 != 0, err0
    assert load_checkpoint("runs/nodes/checkpoints/last.pt")["step"] == 2
    (node0, err0), (node1, err1) = finish(two_nodes("nodes"))  # requeued again
    assert node0 == node1 == 0, err0 + err1
    assert_same_weights(final_weights("reference"), final_weights("nodes"))


SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm.sh"
SRUN_STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$STUBS/srun.args"
trap 'echo USR1 > "$STUBS/srun.signal"; exit 75' USR1
while true; do sleep 0.05; done
"""


def test_the_slurm_script_passes_sigusr1_to_srun_and_waits_for_it_with_torchrun_arguments_that_parse(tmp_path):
    """examples/slurm.sh with stub srun and scontrol: SLURM's B:USR1 reaches srun (which passes it
    to the tasks, torchrun), the script waits for srun and exits with its status, and torchrun
    accepts the command line (rendezvous on the first node, SIGUSR1 handled)."""
    from torch.distributed.run import get_args_parser

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN_STUB)
    (stubs / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUBS": str(stubs), "SLURM_JOB_ID": "77",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]"}
    script = subprocess.Popen(["bash", str(SLURM_SCRIPT), "pretrain", "data.root=/data/in21k"], env=env, text=True)
    deadline = time.monotonic() + 30
    while not (stubs / "srun.args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the script reaches its wait
    script.send_signal(signal.SIGTERM)  # preemption: SLURM signals the tasks itself; the script keeps waiting
    time.sleep(0.2)
    assert script.poll() is None and not (stubs / "srun.signal").exists()
    script.send_signal(signal.SIGUSR1)
    assert script.wait(timeout=30) == EXIT_PREEMPTED  # srun's status, not the interrupted wait's
    assert (stubs / "srun.signal").read_text().strip() == "USR1"
    srun = (stubs / "srun.args").read_text().splitlines()
    assert srun[0] == "torchrun"
    args = get_args_parser().parse_args(srun[1:])
    assert (args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.rdzv_backend) == ("2", "gpu-a:29500", "77", "c10d")
    assert "SIGUSR1" in args.signals_to_handle.split(",") and args.shutdown_timeout == 120
    assert (args.module, args.training_script, args.training_script_args) == (
        True, "ddep", ["pretrain", "data.root=/data/in21k", "--resume", "auto"])


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
