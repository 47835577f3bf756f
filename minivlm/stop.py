"""How a stage stops: SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, a scheduler's preemption) and SIGHUP
(a closed terminal) all mean "stop cleanly", and no process outlives the one that started it.

Design choices:
- Outside a loop that can stop at a boundary, a stop signal raises `Interrupted` (a KeyboardInterrupt),
  as Ctrl-C does: the stage ends with one line and exit 128 + the signal's number (`cli.run`); the atomic
  writers (minivlm.fileio) drop what was being written.
- Inside such a loop (`stop_requests`: training steps, embed batches, a sweep's runs) the first signal
  only asks for a stop: the loop finishes its step, saves or publishes, then raises `Interrupted`. A
  second signal raises at once. Signals within `GRACE_S` of the first are the same request: a scheduler
  that signals every process of a job reaches the processes their launcher forwards the signal to.
- No orphans (Linux): a sweep's runs and the ranks of a torchrun get SIGTERM as their parent-death signal
  (`prctl(PR_SET_PDEATHSIG)`), so they stop the same way when their launcher dies, even by kill -9.
  A process started by hand gets none: `nohup python stages/train.py &` outlives its shell, as asked.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time
from typing import Callable

import torch

from minivlm.dist import Dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the stage: exit 128 + `signum`, with `str(self)` as its one line (none if empty)."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}" if message is None else message)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_interrupt():
    """While the block runs, SIGTERM and SIGHUP interrupt as Ctrl-C does (handlers restored after). A rank
    of a torchrun also stops when its agent dies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _handle(_raise)
    if "TORCHELASTIC_RUN_ID" in os.environ and not _die_with_parent(os.getppid()):  # a torchrun rank
        os.kill(os.getpid(), signal.SIGTERM)  # its agent is gone already
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handle(handler) -> dict:
    """`handler` for every stop signal this process does not ignore (`nohup` ignores SIGHUP, a shell's
    background job SIGINT: they stay ignored); returns the handlers it replaced."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN}


def ignore_stop_signals(*_) -> None:
    """A worker process's init (DataLoader `worker_init_fn`): stop signals sent to the whole process group
    (a scheduler, `kill -TERM -PGID`) are for the main process, which stops its workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class stop_requests(contextlib.AbstractContextManager):
    """Within the block the first stop signal sets `signum` (the loop stops at its next boundary); a second
    one, `grace_s` or more later, raises `Interrupted(signum, at_once)` wherever the loop is."""

    def __init__(self, at_once: str | None = None, grace_s: float = GRACE_S):
        self.at_once, self.grace_s = at_once, grace_s
        self.signum: int | None = None
        self.at, self.previous = 0.0, {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = _handle(self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
        elif time.monotonic() - self.at >= self.grace_s:
            raise Interrupted(signum, self.at_once)

    def agreed(self, dist: Dist, boundary: bool) -> bool:
        """Whether to stop now. One process: at any boundary. Ranks agree at `boundary` steps only, where they
        read the step's numbers anyway (no extra host sync); every rank stops if one was asked to."""
        if not dist.is_distributed:
            return self.requested
        if not boundary:
            return False
        flag = torch.tensor([float(self.requested)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _libc():
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path, use_errno=True) if path else None
    return libc if libc is not None and hasattr(libc, "prctl") else None


def _die_with_parent(parent: int, libc=None) -> bool:
    """SIGTERM to this process when its parent dies (Linux; elsewhere nothing). False if `parent` died
    before the signal was armed (it will never come)."""
    libc = libc or _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


def stop_with_this_process() -> Callable[[], None] | None:
    """A `Popen(preexec_fn=...)` making the child stop (SIGTERM) when this process dies; None where the
    platform has no parent-death signal. libc is loaded here, before the fork, not in the child."""
    libc, parent = _libc(), os.getpid()
    if libc is None:
        return None

    def preexec():
        if not _die_with_parent(parent, libc):
            os._exit(128 + signal.SIGTERM)  # the sweep is gone already: never start the run
    return preexec
