"""minivlm.stop: every stop signal is a clean stop, a second one stops at once, and a child started by a
sweep stops when the sweep dies."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from minivlm.stop import Interrupted, stop_requests, stop_signals_interrupt


def handlers():
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGHUP), (signal.SIGHUP, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGTERM)])
def test_a_first_stop_signal_is_a_request_and_a_second_stops_at_once(first, second):
    before = handlers()
    with pytest.raises(Interrupted, match="^at once$") as e:
        with stop_requests("at once", grace_s=0) as stop:
            assert not stop.requested
            os.kill(os.getpid(), first)
            assert stop.requested and stop.signum == first  # asked, not interrupted: the loop stops itself
            os.kill(os.getpid(), second)
            pytest.fail("the second signal must interrupt at once")
    assert e.value.signum == second and isinstance(e.value, KeyboardInterrupt)
    assert handlers() == before


def test_signals_within_the_grace_period_are_one_request():
    """A scheduler signalling every process of a job, and the launcher forwarding it: one request."""
    with stop_requests("at once", grace_s=60) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_outside_a_loop_sigterm_and_sighup_interrupt_as_ctrl_c_does(sig):
    before = handlers()
    with pytest.raises(Interrupted, match=f"interrupted by {signal.Signals(sig).name}") as e:
        with stop_signals_interrupt():
            os.kill(os.getpid(), sig)
            time.sleep(5)
    assert e.value.signum == sig and handlers() == before


PARENT = """
import subprocess, sys, time
from minivlm.stop import stop_with_this_process
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], preexec_fn=stop_with_this_process(),
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""
CHILD = """
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_child_of_a_killed_parent_gets_sigterm_even_in_its_own_session(tmp_path):
    child_code = CHILD.replace("sys.argv[1]", repr(str(tmp_path / "got")))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)  # the child has set its handler
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while not (tmp_path / "got").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "got").read_text() == "SIGTERM"
    finally:
        parent.kill()
        subprocess.run(["kill", "-9", str(child)], capture_output=True)


def test_a_stop_signal_the_process_was_started_ignoring_stays_ignored():
    """`nohup python stages/train.py &` outlives its terminal: SIGHUP stays ignored, the others still stop it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_requests("at once", grace_s=0) as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
        with stop_signals_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
