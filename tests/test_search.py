"""Searches: a sweep file with [search] is an Optuna study of stage-2 runs, shared by workers through a real
PostgreSQL server (started here from Debian's binaries, never mocked) or a journal file on one machine."""
from __future__ import annotations

import collections
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_stage
from minivlm.training.sweep import load_sweep, plan, run_sweep
from test_sweep import summary, sweep_args, train_processes

SEARCH = ('name = "{name}"\n[base]\n"train.max_steps" = {max_steps}\n"train.eval_interval" = {every}\n'
          '"train.save_interval" = {save}\n{runs}\n[search]\ntrials = {trials}\npruner = "{pruner}"\n'
          'min_steps = {min_steps}\nreduction_factor = 3\nseed = 0\n{more}\n'
          '[search.space]\n"train.lr" = {{ low = 1e-4, high = 1e-2, log = true }}\n')


def search_file(name="s", max_steps=40, every=10, save=4, runs=(), trials=3, pruner="none", min_steps=10, more=""):
    runs = "".join(f'[[runs]]\n"train.lr" = {lr}\n' for lr in runs)
    return SEARCH.format(name=name, max_steps=max_steps, every=every, save=save, runs=runs, trials=trials,
                         pruner=pruner, min_steps=min_steps, more=more)


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    return Path(found[-1]).parent if found[-1] else None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session: initdb in a temporary directory, run as `nobody` when the
    tests run as root (the server refuses root), on a Unix socket only. Yields its socket directory."""
    bindir = pg_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no PostgreSQL server binaries (initdb); .ci/run installs Debian's postgresql")
        pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="pg"))  # short: a socket path has ~100 characters at most
    data, sock = base / "data", base / "sock"
    data.mkdir()
    sock.mkdir()
    as_user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        base.chmod(0o755)
        for d in (data, sock):
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    subprocess.run([bindir / "initdb", "-D", data, "-U", "minivlm", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, cwd=base, **as_user)
    server = subprocess.Popen([bindir / "postgres", "-D", data, "-c", "listen_addresses=", "-c",
                               f"unix_socket_directories={sock}", "-c", "fsync=off", "-c", "max_connections=200"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=base, **as_user)
    import psycopg
    deadline = time.time() + 60
    while True:
        try:
            psycopg.connect(f"host={sock} user=minivlm dbname=postgres").close()
            break
        except psycopg.OperationalError:
            assert server.poll() is None and time.time() < deadline, "postgres did not start"
            time.sleep(0.2)
    yield sock
    server.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients (this process's engine pools too)
    server.wait(30)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request):
    """A fresh database on the session's server, as users write the URL (socket directory as `host`)."""
    import psycopg
    name = "t_" + request.node.name[:40].lower().replace("-", "_").replace("[", "_").replace("]", "")
    with psycopg.connect(f"host={postgres} user=minivlm dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://minivlm@/{name}?host={postgres}"


def worker(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, str(REPO / "stages" / "sweep.py"), *args], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def trials_of(url: str, name: str):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from minivlm.training.study import storage_url
    return optuna.load_study(study_name=name, storage=storage_url(url)).get_trials()


def steps_logged(run_dir: Path) -> list[int]:
    from minivlm.training.sweep import read_metrics
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert all(p.poll() is None for p in procs), f"a worker exited while waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_workers_on_one_postgresql_run_each_trial_once_and_asha_prunes_a_hopeless_lr(
        demo, demo_cache, tmp_path, pg_url, one_thread):
    """Acceptance 1 and 2 in one study: 8 trials (2 enqueued, the second lr = 1e-6), rungs at 20 and 60."""
    sweep = search_file(name="two", max_steps=120, every=20, save=20, runs=(1e-2, 1e-6), trials=8, pruner="asha",
                        min_steps=20)
    args = sweep_args(demo, demo_cache, tmp_path, sweep, "--storage", pg_url)
    first = worker(args, tmp_path / "a.log")
    baseline = tmp_path / "runs" / "two" / "lr=0.01"
    # the baseline reaches its first rung before the second worker starts: 1e-6 then has a rival there
    wait_for(lambda: 20 in steps_logged(baseline), 120, "the baseline's step 20", [first])
    second = worker(args, tmp_path / "b.log")
    assert first.wait(300) == 0 and second.wait(300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    trials = [t for t in trials_of(pg_url, "two") if not t.user_attrs.get("surplus")]
    runs = collections.Counter(t.user_attrs["run"] for t in trials)
    assert len(runs) == 8 and set(runs.values()) == {1}, runs  # each trial exactly once, none retried
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    rows = {r["run"]: r for r in summary(tmp_path / "runs" / "two")}
    assert set(rows) == set(runs) and {r["worker"].split(":")[1] for r in rows.values()} == {
        str(first.pid), str(second.pid)}  # both workers ran trials
    for name in rows:  # each trained once: one start, never resumed, no step twice
        out = (tmp_path / "runs" / "two" / name / "stdout.log").read_text()
        assert out.count("train: ") >= 1 and "resumed" not in out
        steps = steps_logged(tmp_path / "runs" / "two" / name)
        assert len(steps) == len(set(steps)) and int(rows[name]["steps"]) == steps[-1]
    hopeless = rows["lr=1e-6"]
    assert hopeless["status"] == "pruned" and int(hopeless["steps"]) < 60 + 5, hopeless  # by its second rung
    assert sum(int(r["steps"]) for r in rows.values()) <= 0.7 * 8 * 120
    assert (tmp_path / "runs" / "two" / "curves.png").is_file()
    log = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "pruned at step" in log and "reproduce: python stages/train.py --config" in log


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_no_trainer_and_its_trial_resumes_once_elsewhere(
        demo, demo_cache, tmp_path, pg_url, one_thread):
    """Acceptance 3; the two workers start at the same moment on a fresh database (one creates the study)."""
    sweep = search_file(name="kill", max_steps=40, every=10, save=4, trials=2)
    args = sweep_args(demo, demo_cache, tmp_path, sweep, "--storage", pg_url)
    survivor, victim = worker(args, tmp_path / "a.log"), worker(args, tmp_path / "b.log")
    host = socket.gethostname()
    from minivlm.training import checkpoint

    def victims_trial():
        try:
            return next((t.user_attrs["run"] for t in trials_of(pg_url, "kill") if t.state.name == "RUNNING"
                         and t.user_attrs.get("worker") == f"{host}:{victim.pid}"), None)
        except Exception:  # noqa: BLE001 - the study is not created yet
            return None
    run = {}
    wait_for(lambda: run.setdefault("name", victims_trial()) or run.pop("name"), 120, "the victim's trial",
             [survivor, victim])
    run_dir = tmp_path / "runs" / "kill" / run["name"]
    wait_for(lambda: checkpoint.checkpoints(run_dir), 120, "a checkpoint", [victim])
    victim.kill()
    victim.wait()
    wait_for(lambda: not train_processes(run_dir), 30, "the victim's trainer to stop")
    assert survivor.wait(300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert "resumed" in (run_dir / "stdout.log").read_text()
    rows = summary(tmp_path / "runs" / "kill")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    done = {}
    for r in rows:
        d = tmp_path / "runs" / "kill" / r["run"]
        steps = steps_logged(d)
        assert steps == list(range(1, 41)), (r["run"], steps)  # every step once
        done[d] = (d / "stdout.log").read_text().count("train: done")
        assert done[d] == 1  # trained to its end once
    before = {d: (d / "model.safetensors").stat().st_mtime_ns for d in done}
    again = run_stage("sweep.py", *args)  # the rerun: nothing left to train
    assert again.returncode == 0, again.stdout[-2000:]
    assert {d: (d / "model.safetensors").stat().st_mtime_ns for d in done} == before
    assert "2 done, 0 pruned, 0 failed of 2" in again.stdout


@pytest.mark.slow
def test_a_rerun_after_kill_9_of_everything_keeps_done_and_pruned_trials_and_resumes_the_interrupted_one(
        demo, demo_cache, tmp_path, one_thread):
    """Acceptance 4 on the one-machine default (a journal file in the sweep directory, no server)."""
    sweep = search_file(name="all", max_steps=40, every=10, save=4, runs=(3e-3, 1e-6, 2e-3), trials=3,
                        pruner="asha", min_steps=10)
    args = sweep_args(demo, demo_cache, tmp_path, sweep)
    out = tmp_path / "runs" / "all"
    from minivlm.training import checkpoint
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "sweep.py"), *args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: checkpoint.checkpoints(out / "lr=2e-3"), 180, "the third trial's checkpoint", [proc])
    for pid in train_processes(out):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "study.journal").is_file()
    kept = {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in (out / "lr=3e-3", out / "lr=1e-6")}
    r = run_stage("sweep.py", *args)
    assert r.returncode == 0, r.stdout[-3000:]
    assert {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in kept} == kept  # not trained again
    assert "resumed" in (out / "lr=2e-3" / "stdout.log").read_text()
    steps = steps_logged(out / "lr=2e-3")
    assert len(steps) == len(set(steps)) and steps == list(range(1, steps[-1] + 1))
    rows = {row["run"]: row["status"] for row in summary(out)}
    assert rows["lr=3e-3"] == "done" and rows["lr=1e-6"] == "pruned" and rows["lr=2e-3"] in ("done", "pruned")


BAD = [
    ('"train.bogus" = { low = 1, high = 2 }', "", "unknown key train.bogus"),
    ('"train.lr" = { low = 1e-2, high = 1e-4 }', "", "train.lr has low = 0.01 > high = 0.0001; swap them"),
    ('"train.lr" = { low = 1e-4, high = 1e-2 }', 'sampler = "grid"', "search.sampler = 'grid' is unknown"),
    ('"train.lr" = { low = 1e-4, high = 1e-2 }', 'pruner = "asha2"', "search.pruner = 'asha2' is unknown"),
    ('"train.lr" = { low = 1e-4, high = 1e-2 }', 'storage = "postgresql://nobody@/nowhere?host=/nonexistent"',
     "storage postgresql://nobody@/nowhere?host=/nonexistent: cannot open it ("),
]


@pytest.mark.parametrize("space, setting, message", BAD, ids=["key", "bounds", "sampler", "pruner", "storage"])
def test_bad_search_inputs_are_one_line_before_any_run(demo, demo_cache, tmp_path, space, setting, message):
    text = f'name = "bad"\n[search]\ntrials = 2\n{setting}\n[search.space]\n{space}\n'
    args = sweep_args(demo, demo_cache, tmp_path, text)
    with pytest.raises(ValueError) as e:
        run_sweep(args[1], args[3])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "runs" / "bad").exists() or not any((tmp_path / "runs" / "bad").glob("*/"))


def test_search_without_the_extra_installed_is_one_line(demo, demo_cache, tmp_path, monkeypatch):
    args = sweep_args(demo, demo_cache, tmp_path, '[search]\ntrials = 2\n[search.space]\n"train.lr" = [1e-3]\n')
    monkeypatch.setitem(sys.modules, "optuna", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "minivlm.training.search", raising=False)
    monkeypatch.delitem(sys.modules, "minivlm.training.study", raising=False)
    with pytest.raises(ValueError, match=r"\[search\] needs the search extra \(optuna is missing\): pip install"):
        run_sweep(args[1], args[3])


def test_a_grid_sweep_does_not_import_optuna():
    code = ("import sys; from minivlm.training.sweep import load_sweep, plan; "
            "spec = load_sweep('configs/sweeps/demo_lr.toml'); plan(spec, 'configs/demo.toml', [], 'x'); "
            "assert 'optuna' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("sweep, config", [("demo_search", "demo"), ("llava_search", "llava_pretrain")])
def test_shipped_search_files_are_valid_studies_over_config_keys(sweep, config):
    from minivlm.training.study import load_search
    spec = load_sweep(REPO / "configs" / "sweeps" / f"{sweep}.toml")
    search = load_search(spec.search, sweep)
    combos = tuple({p.key: v} for p in search.space for v in p.bounds()) + spec.combos
    _, runs = plan(spec.__class__(spec.name, spec.base, combos), REPO / "configs" / f"{config}.toml", [], sweep)
    assert all(r.cfg is not None for r in runs) and spec.combos and search.pruner == "asha"
    assert {k for c in spec.combos for k in c} <= {p.key for p in search.space}


def test_postgresql_urls_as_users_write_them_use_the_installed_driver():
    import sqlalchemy
    from minivlm.training.study import storage_url
    url = sqlalchemy.make_url(storage_url("postgresql://user@/db?host=/socket/dir"))
    assert (url.drivername, url.username, url.database, url.query["host"]) == ("postgresql+psycopg", "user", "db",
                                                                              "/socket/dir")
    assert url.get_dialect().driver == "psycopg"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
