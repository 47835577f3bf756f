"""Sweeps: many stage-2 runs against one embedding cache, compared in one table and one plot.

Design choices:
- A sweep file holds overrides, not a second config system: `[base]` applies to every run, `[grid]` is
  a cartesian product of `section.key = [values]`, `[[runs]]` adds explicit runs. A run's config is the
  config file + [base] + command-line overrides + its combination, resolved before anything trains; a
  combination that makes no valid config is a failed run, not a failed sweep.
- Each cache is validated once (`open_cache`), and every run must ask for the encoder spec and codec its
  cache holds: a sweep over encoder.* alone would need other caches, so it stops before any run. Runs may
  read different caches (`cache.dir` set per run): comparing the same run on a float16 and an int8 cache
  is a sweep of two [[runs]] (configs/sweeps/demo_codecs.toml).
- Each run is a subprocess (stages/train.py on its resolved config.toml): a crash stays inside its run,
  a killed sweep resumes through stage 2's own resume, and finished runs (final weights, same config)
  are skipped without touching their files.
- A stop signal (Ctrl-C, SIGTERM, SIGHUP) is forwarded once to every running run, which checkpoints and
  exits; the sweep waits for them. A run lives in its own session, so a terminal's Ctrl-C does not reach
  it twice, and it gets SIGTERM when the sweep dies (minivlm.stop): no run outlives its sweep.
- The summary's numbers are read back from each run's metrics.jsonl, never from process output.
- One writer per directory: a second sweep on the same sweep directory is refused, and a run whose
  directory another process is writing (a run of a killed sweep still stopping, a `stages/train.py` by
  hand) is skipped and reported `busy`, never started twice.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minivlm.config import (
    RunConfig,
    build_config,
    build_config_strings,
    load_config,
    load_toml,
    merge,
    parse_overrides,
    to_toml,
    to_tree,
)
from minivlm.embedding import cache, mirror
from minivlm.embedding.encoder import EncoderSpec
from minivlm.fileio import WriterLock, atomic_write, atomic_write_text
from minivlm.stop import STOP_SIGNALS, Interrupted, signal_name, stop_requests, stop_with_this_process
from minivlm.training.data import open_cache

SET_BY_SWEEP = ("train.out_dir", "train.run_name")
LOSSES = ("final_train_loss", "best_eval_loss", "image_gap")   # 4 decimals in summary.md


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]                 # section.key -> value, for every run
    combos: tuple[dict[str, Any], ...]   # one per run: the grid's product, then the [[runs]] entries
    search: dict | None = None           # [search] as written (minivlm.training.search reads it); None: a grid


@dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: dict[str, Any]            # the combination, as written in the sweep file
    cfg: RunConfig | None                # None: the combination does not make a valid config
    error: str = ""


@dataclass(frozen=True)
class Outcome:
    status: str                          # done | failed | running | interrupted | busy
    error: str = ""
    wall_s: float | str = ""


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} and {"train.lr": 1} both -> {"train.lr": 1}."""
    out = {}
    for key, value in table.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _tree(flat: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    tree: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if not dot:
            raise ValueError(f"{where}: {key!r} must be section.key, e.g. train.lr")
        tree.setdefault(section, {})[name] = value
    return tree


def _safe(text: str) -> str:
    """A directory name: readable, no path separators, at most ~100 characters."""
    text = re.sub(r"[^\w.,=+-]", "_", text).lstrip(".") or "run"
    return text if len(text) <= 100 else f"{text[:90]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def load_sweep(path: str | Path) -> SweepSpec:
    raw = load_toml(path)
    unknown = sorted(set(raw) - {"name", "base", "grid", "runs", "search"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; a sweep file holds name, [base], [grid], [[runs]] "
                         f"and [search]")
    if not all(isinstance(raw.get(k, {}), dict) for k in ("base", "grid")) or \
            not all(isinstance(r, dict) for r in raw.get("runs", [])):
        raise ValueError(f"{path}: [base] and [grid] must be tables and [[runs]] a list of tables")
    grid = _flatten(raw.get("grid", {}))
    bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if bad:
        raise ValueError(f"{path}: grid key {bad[0]} must be a non-empty list, e.g. \"{bad[0]}\" = [1, 2]")
    runs = [_flatten(r) for r in raw.get("runs", [])]
    searching = "search" in raw  # a search enqueues [grid]/[[runs]]; with neither it starts from nothing
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] \
        if grid or not (runs or searching) else []
    base = _flatten(raw.get("base", {}))
    fixed = [k for k in SET_BY_SWEEP if any(k in d for d in (base, *combos, *runs))]
    if fixed:
        raise ValueError(f"{path}: {fixed[0]} is set by the sweep (runs go to <train.out_dir>/<sweep>/<run>); remove it")
    return SweepSpec(_safe(str(raw.get("name", Path(path).stem))), base, tuple(combos + runs), raw.get("search"))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v and not 1e-2 <= abs(v) < 1e5:
        mantissa, exp = f"{v:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_names(combos: tuple[dict[str, Any], ...]) -> list[str]:
    """`lr=1e-3,projector=linear`: last key part unless two sections share it; unique; filesystem-safe."""
    short = {k: k.rpartition(".")[2] for c in combos for k in c}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    names: list[str] = []
    for combo in combos:
        name = _safe(",".join(f"{k if short[k] in clash else short[k]}={_fmt(v)}" for k, v in combo.items()) or "base")
        unique, i = name, 1
        while unique in names:
            unique, i = f"{name}-{i + 1}", i + 1
        names.append(unique)
    return names


def plan(spec: SweepSpec, config: str | Path, overrides: list[str], where: str) -> tuple[RunConfig, list[PlannedRun]]:
    """The sweep's base config (file + [base] + command line) and every run's resolved config."""
    base = build_config(merge(to_tree(load_config(config)), _tree(spec.base, f"{where} [base]")), f"{where} [base]")
    cli = build_config_strings(parse_overrides(list(overrides)))
    swept = {k for c in spec.combos for k in c}
    clash = [f"{s}.{k}" for s, values in cli.items() for k in values if f"{s}.{k}" in swept]
    if clash:
        raise ValueError(f"override {clash[0]} is swept by {where}; drop it from the command line")
    base = build_config(merge(to_tree(base), cli), "override")
    out_dir = str(Path(base.train.out_dir) / spec.name)
    runs = []
    for name, combo in zip(run_names(spec.combos), spec.combos):
        try:
            tree = _tree({**combo, "train.out_dir": out_dir, "train.run_name": name}, f"{where} run {name}")
            runs.append(PlannedRun(name, combo, build_config(merge(to_tree(base), tree), f"{where} run {name}")))
        except ValueError as e:
            runs.append(PlannedRun(name, combo, None, str(e)))
    return base, runs


def check_caches(runs: list[PlannedRun], where: str) -> None:
    """Every run's cache is complete and holds the features the run asks for (encoder.*, cache.dtype), so a
    sweep that would need another cache stops before any run. Each cache.dir is validated once."""
    manifests: dict[str, dict] = {}
    for run in (r for r in runs if r.cfg is not None):
        d = run.cfg.cache.dir
        if d not in manifests:
            manifests[d] = cache.load_manifest(mirror.local(run.cfg))
        EncoderSpec.of_manifest(manifests[d]).check(
            EncoderSpec.of_config(run.cfg.encoder, run.cfg.cache.dtype), f"{where}: run {run.name}", f"its cache {d}",
            "a run reads a cache embedded as it asks: take encoder.* and cache.dtype out of the sweep, or set "
            "cache.dir with them in each of [[runs]]")
    for d in manifests:
        open_cache(next(r.cfg for r in runs if r.cfg is not None and r.cfg.cache.dir == d))


def finished(cfg: RunConfig) -> bool:
    d = cfg.train.run_dir
    return all((d / f).is_file() for f in ("model.safetensors", "model_config.json", "config.toml")) and \
        (d / "config.toml").read_text() == to_toml(to_tree(cfg))


def slot_envs(parallel: int, nproc: int, runs_per_gpu: int = 1) -> list[dict[str, str]]:
    """One environment per parallel slot: its own GPUs where CUDA exists (shared by up to `runs_per_gpu`
    slots, handed out round-robin), else a share of the CPU cores."""
    import torch
    assert parallel >= 1 and nproc >= 1 and runs_per_gpu >= 1, "stages/sweep.py checks its numbers"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if parallel * nproc > len(gpus) * runs_per_gpu:
            per = f" at {runs_per_gpu} runs per GPU" if runs_per_gpu > 1 else ""
            need = -(-parallel * nproc // runs_per_gpu)
            raise ValueError(f"--parallel {parallel} x --nproc_per_node {nproc} needs {need} GPUs{per}, {len(gpus)} "
                             f"visible; lower --parallel or raise --runs_per_gpu")
        groups = len(gpus) // nproc
        return [{**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus[i % groups * nproc:(i % groups + 1) * nproc])}
                for i in range(parallel)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = {"OMP_NUM_THREADS": str(max(1, cores // (parallel * nproc)))} if parallel * nproc > 1 else {}
    return [{**env, **threads} for _ in range(parallel)]


def launch(cfg: RunConfig, train_script: Path, nproc: int, env: dict) -> tuple[subprocess.Popen, int]:
    """Start stage 2 on the run's resolved config.toml; stdout/stderr append to the run's logs."""
    d = cfg.train.run_dir
    d.mkdir(parents=True, exist_ok=True)
    # The request goes beside config.toml, which stage 2 writes itself and checks on resume.
    atomic_write_text(d / "sweep_run.toml", to_toml(to_tree(cfg)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), str(train_script), "--config", str(d / "sweep_run.toml")]
    with open(d / "stdout.log", "ab") as out, open(d / "stderr.log", "ab") as err:
        offset = err.tell()  # this attempt's stderr starts here (the logs keep every attempt)
        # Its own session: a Ctrl-C at the terminal reaches the sweep alone, which forwards it once; and it
        # stops (SIGTERM) if the sweep dies, even by kill -9.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True, preexec_fn=stop_with_this_process()), offset


def last_error(path: Path, offset: int, returncode: int) -> str:
    """The run's `error: ...` line (stage scripts print one), else its last stderr line, else the exit code."""
    text = path.read_bytes()[offset:].decode(errors="replace")
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [f"exit code {returncode}"])[-1]


def execute(runs: list[PlannedRun], envs: list[dict], train_script: Path, nproc: int,
            outcomes: dict[str, Outcome], on_change) -> None:
    """Run `runs` len(envs) at a time, recording each outcome; a run whose directory another process is
    writing is skipped (`busy`). A stop signal is forwarded to every running run (each saves a checkpoint
    and exits), no other run starts, and once they have exited they are recorded `interrupted` and
    `Interrupted` is raised. A second signal is forwarded too: the runs stop at once."""
    queue, free, active, forwarded = list(runs), list(range(len(envs))), {}, False
    with stop_requests() as stop:
        try:
            while active or queue and not stop.requested:
                while queue and free and not stop.requested:
                    run = queue.pop(0)
                    holder = WriterLock.holder(run.cfg.train.run_dir)
                    if holder is not None:
                        outcomes[run.name] = Outcome("busy", f"{run.cfg.train.run_dir} is being written by another "
                                                             f"process (pid {holder}); not started")
                        print(f"sweep: {run.name} skipped: {outcomes[run.name].error}", flush=True)
                        on_change()
                        continue
                    slot = free.pop(0)
                    print(f"sweep: start {run.name} (logs in {run.cfg.train.run_dir}/stdout.log, stderr.log)",
                          flush=True)
                    active[slot] = (run, *launch(run.cfg, train_script, nproc, envs[slot]), time.time())
                    outcomes[run.name] = Outcome("running")
                if stop.requested and not forwarded:
                    forward(active, stop.signum)
                    forwarded = True
                time.sleep(0.1)
                for slot in reap(active, outcomes, stop.requested):
                    free.append(slot)
                    on_change()
        except Interrupted as second:  # a second signal: the runs stop at once too
            forward(active, second.signum)
            reap(active, outcomes, True, wait=True)
            on_change()
            raise Interrupted(second.signum, f"sweep: stopped at once by a second {signal_name(second.signum)}; rerun "
                                             f"the same command to resume (interrupted runs from their last checkpoint)")
    if stop.requested:
        stopped = ", ".join(r for r, o in outcomes.items() if o.status == "interrupted") or "none"
        raise Interrupted(stop.signum, f"sweep: stopped by {signal_name(stop.signum)}; runs that saved a checkpoint "
                                       f"and stopped: {stopped}; rerun the same command to resume")


def forward(active: dict, signum: int) -> None:
    """The stop signal to every running run (a torchrun agent passes it on to its ranks)."""
    for run, proc, _, _ in active.values():
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def reap(active: dict, outcomes: dict[str, Outcome], stopping: bool, wait: bool = False) -> list[int]:
    """Record the runs that have exited (all of them with `wait`); returns their freed slots. A run that
    a stop signal ended is `interrupted`, not failed: it resumes from its checkpoint."""
    freed = []
    for slot, (run, proc, offset, t0) in list(active.items()):
        if (proc.wait() if wait else proc.poll()) is None:
            continue
        rc, wall = proc.returncode, round(time.time() - t0, 1)
        err = "" if rc == 0 else last_error(run.cfg.train.run_dir / "stderr.log", offset, rc)
        status = "done" if rc == 0 else "interrupted" if stopping or rc - 128 in STOP_SIGNALS else "failed"
        outcomes[run.name] = Outcome(status, err, wall)
        print(f"sweep: {run.name} " + (f"done in {wall}s" if rc == 0 else f"{status}: {err}"), flush=True)
        freed.append(slot)
        del active[slot]
    return freed


def read_metrics(path: Path) -> list[dict]:
    return metrics_rows(path.read_text()) if path.is_file() else []


def metrics_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            rows.append(json.loads(line))
    return rows


def run_numbers(rows: list[dict]) -> dict[str, Any]:
    """Final train loss, best eval loss and the image gap at it, mean logged samples/s."""
    train = [r for r in rows if "loss" in r]
    best = min((r for r in rows if "eval_loss" in r), key=lambda r: r["eval_loss"], default={})
    sps = [r["samples_per_s"] for r in train if "samples_per_s" in r]
    return {"final_train_loss": train[-1]["loss"] if train else "", "best_eval_loss": best.get("eval_loss", ""),
            "image_gap": best.get("image_gap", ""), "samples_per_s": round(sum(sps) / len(sps), 2) if sps else ""}


def summary_rows(runs: list[PlannedRun], outcomes: dict[str, Outcome], metrics: dict[str, list[dict]]) -> list[dict]:
    """One row per run: its overrides, its numbers, its status; best eval loss first, failed runs last."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    rows = []
    for run in runs:
        out = outcomes.get(run.name, Outcome("pending"))
        rows.append({"run": run.name, **{k: run.overrides.get(k, "") for k in keys}, **run_numbers(metrics[run.name]),
                     "wall_s": out.wall_s, "status": out.status, "error": out.error})
    return sorted(rows, key=lambda r: (r["status"] == "failed", r["best_eval_loss"] == "", r["best_eval_loss"] or 0))


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())

    def cell(k, v):
        text = f"{v:.4f}" if isinstance(v, float) and k in LOSSES else _fmt(v)
        return text.replace("|", "\\|")
    lines = [f"# sweep {sweep_dir.name}", "", "| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(cell(k, v) for k, v in r.items()) + " |" for r in rows]
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")


def plot_curves(path: Path, curves: dict[str, list[dict]]) -> bool:
    """Train and eval loss against step, one colour per run; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError:
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(curves.items()):
        for ax, key, style in ((axes[0], "loss", "-"), (axes[1], "eval_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, color=f"C{i % 10}", markersize=3, label=name)
    for ax, title in zip(axes, ("train loss", "eval loss")):
        ax.set(title=title, xlabel="step", ylabel="loss")
        if ax.lines:
            ax.legend(fontsize="small")
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    return True


def report(sweep_dir: Path, runs: list[PlannedRun], outcomes: dict[str, Outcome], plot: bool = False,
           extra: dict[str, dict] | None = None) -> list[dict]:
    """summary.csv + summary.md (and curves.png when `plot`) from the runs' metrics.jsonl; `extra`: more
    columns per run (a search's steps and worker), after the others."""
    metrics = {r.name: read_metrics(r.cfg.train.run_dir / "metrics.jsonl") if r.cfg else [] for r in runs}
    rows = [{**row, **(extra or {}).get(row["run"], {})} for row in summary_rows(runs, outcomes, metrics)]
    write_summary(sweep_dir, rows)
    if plot and not plot_curves(sweep_dir / "curves.png", metrics):
        print("sweep: no curves.png (matplotlib missing); pip install -e '.[plot]' to get the plot")
    return rows


def previous_wall_times(path: Path) -> dict[str, float | str]:
    """Wall times of an earlier invocation's runs (a skipped run keeps the time it took then)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["run"]: float(r["wall_s"]) if r.get("wall_s") else "" for r in csv.DictReader(f)}


def run_sweep(config: str | Path, sweep: str | Path, overrides: list[str] = (), parallel: int = 1,
              nproc_per_node: int = 1, train_script: Path = Path("stages/train.py"), runs_per_gpu: int = 1,
              storage: str = "") -> bool:
    """Plan and validate every run, skip finished ones, run the rest, write the summary; True if none failed.
    A sweep file with [search] is a study instead (minivlm.training.search; Optuna is imported only then)."""
    spec = load_sweep(sweep)
    if spec.search is not None:
        try:
            from minivlm.training.search import run_search
        except ImportError as e:
            raise ValueError(f"{sweep}: [search] needs the search extra ({e.name} is missing): "
                             f"pip install -e '.[search]'") from None
        return run_search(spec, spec.search, config, overrides, str(sweep), parallel, nproc_per_node, runs_per_gpu,
                          storage, train_script)
    if storage:
        raise ValueError(f"--storage is for sweep files with [search]; {sweep} has none")
    base, runs = plan(spec, config, overrides, str(sweep))
    if runs and all(r.cfg is None for r in runs):
        raise ValueError(f"{runs[0].error}; no run of {sweep} makes a valid config, so none started")
    check_caches(runs, str(sweep))
    envs = slot_envs(parallel, nproc_per_node, runs_per_gpu)
    sweep_dir = Path(base.train.out_dir) / spec.name
    previous = previous_wall_times(sweep_dir / "summary.csv")
    outcomes = {r.name: Outcome("failed", r.error) for r in runs if r.cfg is None}
    outcomes |= {r.name: Outcome("done", wall_s=previous.get(r.name, "")) for r in runs if r.cfg and finished(r.cfg)}
    todo = [r for r in runs if r.name not in outcomes]
    with WriterLock(sweep_dir, other="another sweep name"):
        print(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already done or invalid, "
              f"{len(todo)} to run, {parallel} at a time -> {sweep_dir}", flush=True)
        for r in (r for r in runs if r.cfg is None):
            print(f"sweep: {r.name} failed: {r.error}", flush=True)
        report(sweep_dir, runs, outcomes)
        execute(todo, envs, train_script, nproc_per_node, outcomes, lambda: report(sweep_dir, runs, outcomes))
        rows = report(sweep_dir, runs, outcomes, plot=True)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    skipped = [r["run"] for r in rows if r["status"] == "busy"]
    print(f"sweep {spec.name}: {len(rows) - len(failed) - len(skipped)} done, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + (f", {len(skipped)} busy ({', '.join(skipped)}: rerun once their writers stop)" if skipped else "")
          + f" -> {sweep_dir}/summary.md")
    return not failed and not skipped
