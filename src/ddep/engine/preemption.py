"""Stopping cleanly when a scheduler takes the machine back.

SLURM sends SIGTERM (or, with ``--signal``, SIGUSR1) some time before it kills a job, spot
instances and torchrun send SIGTERM, a person presses Ctrl-C (SIGINT). While a run trains,
:class:`StopSignals` records such a signal instead of dying; the Trainer stops at the next
micro-batch, writes ``last.pt`` and exits with :data:`EXIT_PREEMPTED`. A signal in the middle of
an accumulated step does not wait for the step's other micro-batches (torchrun kills its workers
30 s after forwarding a signal, by default): the step's partial gradients are dropped and the
checkpoint holds the state at the step's start, so a resumed run redoes that step exactly. The
time from the signal to the checkpoint is thus one micro-batch and one save. Further signals
during the save are recorded and change nothing. Under SLURM a SIGUSR1 also requeues the job
(``scontrol requeue $SLURM_JOB_ID``), which restarts the same command line: with
``--resume auto`` it continues from the checkpoint.
"""
from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: The exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL:
#: "try again later"), told apart from success (0) and errors (1).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A run stopped by a signal after saving its checkpoint; the message names both."""


class StopSignals:
    """While installed, SIGTERM/SIGINT/SIGUSR1 are recorded (the first one wins), not fatal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() at the first signal
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        else:
            log.warning("%s received again: still stopping", signal.Signals(signum).name)


def worker_init(release: multiprocessing.synchronize.Event) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn``: the worker leaves stop signals to the main process, which
    shuts it down (SLURM and a terminal's Ctrl-C signal the whole process group), until the main
    process sets ``release`` (it does when it exits, see :func:`release_at_exit`); from then on a
    SIGTERM ends the worker, so that Python's exit-time terminate of its children is not waited
    on forever."""
    return functools.partial(_ignore_stop_signals, release=release)


def _ignore_stop_signals(worker_id: int, release: multiprocessing.synchronize.Event) -> None:
    def ignore_unless_released(signum: int, frame: FrameType | None) -> None:
        if release.is_set():
            os._exit(0)  # the main process is exiting: nothing of this worker's is worth keeping

    for signum in STOP_SIGNALS:
        signal.signal(signum, ignore_unless_released)


def release_at_exit() -> multiprocessing.synchronize.Event:
    """An event set when this process exits (before multiprocessing terminates its children),
    for :func:`worker_init`; one per process."""
    global _release
    if _release is None:
        _release = multiprocessing.Event()
        atexit.register(_release.set)  # registered after multiprocessing's own: runs before it
    return _release


_release: multiprocessing.synchronize.Event | None = None


def requeue_slurm_job() -> None:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM; a failure is a warning."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        log.info("SLURM job %s requeued", job)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue SLURM job %s (%s): resubmit it", job, e)
