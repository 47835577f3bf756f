"""Fault injection shared by the stage tests: run a stage as a user does and kill -9 it at a random
moment, or give it a small filesystem that fills up. Stage-agnostic (embed, train, sweep, export)."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    killed: bool      # we killed it (it had not finished by itself)
    after_s: float    # the random delay drawn


def kill_at_random(script: str, args: list[str], rng: random.Random, within_s: float, group: bool = False,
                   timeout_s: float = 300) -> Outcome:
    """Run `stages/<script> args` from the repo root and SIGKILL it after a delay drawn uniformly from
    [0, within_s): the main process only, as `kill -9 PID` does (its DataLoader workers live on for a
    moment), or with `group` its whole process group (a sweep and its runs, a lost machine).
    Returns once it is dead or finished by itself; output goes through files, so no pipe ever blocks it."""
    delay = rng.uniform(0, within_s)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / script), *args], cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            proc.wait(delay)
            killed = False
        except subprocess.TimeoutExpired:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            killed = True
        proc.wait(timeout_s)
        out.seek(0)
        err.seek(0)
        return Outcome(proc.returncode, out.read(), err.read(), killed, delay)


class SmallDisk:
    """A tmpfs of a given size mounted at `path`; `resize` grows or shrinks it in place (files kept)."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[SmallDisk]:
    """Mount a `size`-byte tmpfs at `path`, or skip the test (saying why) where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI and the dev VMs run tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs CAP_SYS_ADMIN")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
