"""Sweeps: many stage-2 runs against one cache, a summary read back from the runs, resumable, failures contained."""
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_stage, train_config
from minivlm.config import RunConfig, TrainConfig, load_config, to_toml, to_tree
from minivlm.dist import Dist
from minivlm.fileio import WriterLock
from minivlm.training import checkpoint
from minivlm.training.sweep import (
    LOSSES,
    Outcome,
    PlannedRun,
    load_sweep,
    plan,
    read_metrics,
    report,
    run_numbers,
    slot_envs,
)
from minivlm.training.trainer import fit


def sweep_args(demo, demo_cache, tmp_path, sweep: str, *extra: str) -> list[str]:
    """A tiny train config (the conftest's) as the sweep's --config, plus the sweep file."""
    (tmp_path / "base.toml").write_text(to_toml(to_tree(train_config(demo, demo_cache, tmp_path))))
    (tmp_path / "sweep.toml").write_text(sweep)
    return ["--config", str(tmp_path / "base.toml"), "--sweep", str(tmp_path / "sweep.toml"), *extra]


def summary(sweep_dir) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def mtimes(run_dir) -> dict:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


@pytest.mark.slow
def test_grid_sweep_writes_each_run_and_a_summary_read_from_their_metrics(demo, demo_cache, tmp_path):
    sweep = '[base]\n"train.max_steps" = 3\n[grid]\n"train.lr" = [1e-3, 3e-3]\n"model.projector" = ["linear", "mlp"]\n'
    r = run_stage("sweep.py", *sweep_args(demo, demo_cache, tmp_path, sweep, "--parallel", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    sweep_dir = tmp_path / "runs" / "sweep"  # name defaults to the file's stem
    names = {f"lr={lr},projector={p}" for lr in ("1e-3", "3e-3") for p in ("linear", "mlp")}
    assert {d.name for d in sweep_dir.iterdir() if d.is_dir()} == names
    rows = summary(sweep_dir)
    assert {row["run"] for row in rows} == names and all(row["status"] == "done" for row in rows)
    for row in rows:
        run_dir = sweep_dir / row["run"]
        assert (run_dir / "model.safetensors").is_file() and 'projector = "' in (run_dir / "config.toml").read_text()
        expected = run_numbers(read_metrics(run_dir / "metrics.jsonl"))
        assert {k: float(row[k]) for k in expected} == expected
        assert float(row["wall_s"]) > 0 and row["train.lr"] in ("0.001", "0.003")
    assert [float(row["best_eval_loss"]) for row in rows] == sorted(float(row["best_eval_loss"]) for row in rows)
    assert "| run | train.lr | model.projector |" in (sweep_dir / "summary.md").read_text()
    with Image.open(sweep_dir / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


@pytest.mark.slow
def test_killed_sweep_reruns_to_completion_skipping_finished_runs_and_resuming_the_interrupted_one(
        demo, demo_cache, tmp_path, one_thread):
    sweep = ('name = "k"\n[base]\n"train.max_steps" = 40\n"train.save_interval" = 4\n"train.deterministic" = true\n'
             '[grid]\n"train.lr" = [1e-3, 2e-3]\n')
    args = sweep_args(demo, demo_cache, tmp_path, sweep)
    first, second = tmp_path / "runs" / "k" / "lr=1e-3", tmp_path / "runs" / "k" / "lr=2e-3"
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "sweep.py"), *args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.checkpoints(second) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    seen = checkpoint.checkpoints(second)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's process group: its runs live in sessions of their own ...
    proc.wait()
    deadline = time.time() + 30
    while train_processes(tmp_path / "runs") and time.time() < deadline:  # ... and stop when it dies
        time.sleep(0.05)
    assert not train_processes(tmp_path / "runs") and WriterLock.holder(second) is None, "the run outlived its sweep"
    assert not (second / "model.safetensors").exists(), "killed too late"
    assert seen and checkpoint.checkpoints(second)[-1].name > seen[-1].name  # it saved at its next step, then stopped
    assert "by SIGTERM; checkpoint step-" in (second / "stderr.log").read_text()
    before = mtimes(first)
    r = run_stage("sweep.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert mtimes(first) == before  # not retrained, not rewritten
    assert "resumed" in (second / "stdout.log").read_text() and (second / "model.safetensors").is_file()
    rows = {row["run"]: row for row in summary(tmp_path / "runs" / "k")}
    assert [row["status"] for row in rows.values()] == ["done", "done"]
    straight = load_config(second / "config.toml", [f"train.out_dir={tmp_path}", "train.run_name=straight"])
    fit(straight, Dist())  # the interrupted run as if it had never stopped (one thread, as the sweep's runs)
    assert (second / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    numbers = run_numbers(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    assert {k: float(rows["lr=2e-3"][k]) for k in LOSSES} == {k: numbers[k] for k in LOSSES}


def train_processes(under: Path) -> list[int]:
    """Live stages/train.py processes (torchrun ranks too) whose command line names a path under `under`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # gone meanwhile
            continue
        if any(c.endswith(b"stages/train.py") for c in cmd) and any(str(under).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def results(sweep_dir: Path) -> dict:
    """Each run's losses as summary.csv holds them, and its final weights."""
    return {row["run"]: ({k: row[k] for k in LOSSES + ("final_train_loss",)},
                         (sweep_dir / row["run"] / "model.safetensors").read_bytes()) for row in summary(sweep_dir)}


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_every_run_with_a_checkpoint_and_the_rerun_gives_the_same_results(
        demo, demo_cache, tmp_path):
    """(kill -9 of a sweep: test_killed_sweep_reruns_to_completion_skipping_finished_runs_and_resuming_the_interrupted_one)"""
    sweep = ('name = "p"\n[base]\n"train.max_steps" = 400\n"train.deterministic" = true\n"train.freeze_llm" = 0\n'
             '[grid]\n"train.lr" = [1e-3, 2e-3]\n')
    args = sweep_args(demo, demo_cache, tmp_path, sweep, "--parallel", "2")
    ref = run_stage("sweep.py", *args, f"train.out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "stopped"
    runs = [out / "p" / name for name in ("lr=1e-3", "lr=2e-3")]  # as planned
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "sweep.py"), *args, f"train.out_dir={out}"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not all((r / "metrics.jsonl").is_file() for r in runs) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # the sweep alone: its runs live in sessions of their own
        t0 = time.time()
        assert proc.wait(60) == 128 + signal.SIGTERM
        while train_processes(out) and time.time() < t0 + 30:
            time.sleep(0.1)
        assert not train_processes(out), "a run outlived its sweep by 30 s"
        stopped = [r.name for r in runs if not (r / "model.safetensors").exists()]
        assert stopped, "every run had finished before the signal"
        assert all(checkpoint.checkpoints(out / "p" / name) for name in stopped)
        err.seek(0)
        assert err.read() == (f"sweep: stopped by SIGTERM; runs that saved a checkpoint and stopped: "
                              f"{', '.join(stopped)}; rerun the same command to resume\n")
    assert {row["run"]: row["status"] for row in summary(out / "p")} == {
        r.name: "interrupted" if r.name in stopped else "done" for r in runs}
    r = run_stage("sweep.py", *args, f"train.out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert results(out / "p") == results(tmp_path / "ref" / "p")


@pytest.mark.slow
def test_failing_runs_are_reported_and_the_others_still_run(demo, demo_cache, tmp_path):
    sweep = ('name = "bad"\n[base]\n"train.max_steps" = 2\n'
             '[[runs]]\n"train.batch_size" = 1000\n'   # valid config, fails when training starts
             '[[runs]]\n"train.bogus" = 1\n'           # unknown key: fails before anything runs
             '[[runs]]\n"train.lr" = 1e-3\n'
             '[[runs]]\n"train.lr" = 2e-3\n')          # its directory is being written by another process
    busy = tmp_path / "runs" / "bad" / "lr=2e-3"
    with WriterLock(busy):  # this test process: the sweep, a subprocess, sees a writer holding it
        r = run_stage("sweep.py", *sweep_args(demo, demo_cache, tmp_path, sweep))
    assert r.returncode == 1 and "2 failed" in r.stdout and "1 busy (lr=2e-3" in r.stdout
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # not started: nothing written
    rows = {row["run"]: row for row in summary(tmp_path / "runs" / "bad")}
    assert rows["lr=2e-3"]["status"] == "busy" and f"(pid {os.getpid()})" in rows["lr=2e-3"]["error"]
    assert rows["lr=1e-3"]["status"] == "done" and rows["lr=1e-3"]["error"] == ""
    assert rows["batch_size=1000"]["status"] == "failed" and "lower the batch size" in rows["batch_size=1000"]["error"]
    assert rows["bogus=1"]["status"] == "failed" and "unknown key train.bogus" in rows["bogus=1"]["error"]
    assert list(rows)[0] == "lr=1e-3"  # failed runs sort last
    assert not (tmp_path / "runs" / "bad" / "bogus=1").exists()


@pytest.mark.slow
def test_sweep_over_another_encoder_than_the_cache_stops_before_any_run(demo, demo_cache, tmp_path):
    sweep = 'name = "enc"\n[grid]\n"encoder.pool" = [2, 1]\n'
    r = run_stage("sweep.py", *sweep_args(demo, demo_cache, tmp_path, sweep))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "run pool=1 has encoder.pool=1 where its cache" in r.stderr and "has encoder.pool=2;" in r.stderr
    assert not (tmp_path / "runs" / "enc").exists()


@pytest.mark.parametrize("sweep, config", [("demo_lr", "demo"), ("llava_lr", "llava_pretrain")])
def test_shipped_sweep_files_give_six_valid_distinct_runs(sweep, config):
    spec = load_sweep(REPO / "configs" / "sweeps" / f"{sweep}.toml")
    _, runs = plan(spec, REPO / "configs" / f"{config}.toml", [], sweep)
    assert len({r.name for r in runs}) == 6 and all(r.cfg and r.cfg.train.out_dir == f"runs/{sweep}" for r in runs)


def test_summary_without_matplotlib_still_writes_the_table_sorted_by_eval_loss(tmp_path, monkeypatch, capsys):
    runs = [PlannedRun(n, {"train.lr": lr}, RunConfig(train=TrainConfig(out_dir=str(tmp_path), run_name=n)))
            for n, lr in (("a", 1e-3), ("b", 2e-3), ("c", 3e-3))]
    for run, loss in zip(runs, (2.0, 1.0, 0.5)):
        run.cfg.train.run_dir.mkdir()
        (run.cfg.train.run_dir / "metrics.jsonl").write_text(
            '{"step": 1, "loss": 3.0, "samples_per_s": 10}\n{"step": 2, "loss": 2.5, "samples_per_s": 20}\n'
            f'{{"step": 2, "eval_loss": {loss}, "image_gap": 0.1}}\n')
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    outcomes = {"a": Outcome("done"), "b": Outcome("done"), "c": Outcome("failed", "error: boom")}
    report(tmp_path, runs, outcomes, plot=True)
    assert [(row["run"], row["samples_per_s"]) for row in summary(tmp_path)] == [("b", "15.0"), ("a", "15.0"), ("c", "15.0")]
    assert not (tmp_path / "curves.png").exists() and "pip install -e '.[plot]'" in capsys.readouterr().out


def test_parallel_slots_get_their_own_gpus_or_a_share_of_the_cores(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(2, 2)] == ["0,1", "2,3"]  # 2 runs x torchrun on 2 GPUs
    with pytest.raises(ValueError, match="needs 6 GPUs, 4 visible"):
        slot_envs(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(2, 1)] == ["5", "7"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [e["OMP_NUM_THREADS"] for e in slot_envs(4, 1)] == ["2"] * 4


@pytest.mark.slow
def test_failed_runs_print_their_one_line_reasons_on_the_console(demo, demo_cache, tmp_path, capsys):
    sweep = ('name = "why"\n[base]\n"train.max_steps" = 2\n'
             '[[runs]]\n"train.batch_size" = 1000\n'   # fails when training starts
             '[[runs]]\n"train.bogus" = 1\n')          # fails before anything runs
    args = sweep_args(demo, demo_cache, tmp_path, sweep)
    from minivlm.training.sweep import run_sweep
    assert run_sweep(args[1], args[3], train_script=REPO / "stages" / "train.py") is False
    out = capsys.readouterr().out
    assert "sweep: bogus=1 failed: " in out and "unknown key train.bogus" in out
    assert "sweep: batch_size=1000 failed: error: " in out and "lower the batch size" in out


def test_a_key_unknown_to_every_run_is_refused_before_any_run(demo, demo_cache, tmp_path):
    sweep = 'name = "nokey"\n[grid]\n"train.bogus" = [1, 2]\n'
    args = sweep_args(demo, demo_cache, tmp_path, sweep)
    from minivlm.training.sweep import run_sweep
    with pytest.raises(ValueError, match=r"unknown key train\.bogus.*no run of .* makes a valid config, so none "
                                         r"started") as e:
        run_sweep(args[1], args[3])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs" / "nokey").exists()  # no summary, no empty curves.png


def test_runs_per_gpu_deals_slots_round_robin_over_the_gpus(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(4, 1, 2)] == ["0", "1", "0", "1"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(2, 1, 3)] == ["0", "1"]  # fewer runs: one GPU each
    with pytest.raises(ValueError, match="needs 3 GPUs at 2 runs per GPU, 2 visible"):
        slot_envs(5, 1, 2)
