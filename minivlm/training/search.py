"""Searches: a sweep file with [search] is an Optuna study whose trials are stage-2 runs.

Design choices:
- A trial is a sweep run (minivlm.training.sweep): its own subprocess and run directory, named from its
  parameters, so a retried trial resumes its own checkpoint; stage 2's writer lock keeps one writer per
  directory. [grid] and [[runs]] entries are enqueued first (by the worker that creates the study), so a
  known baseline runs first; `trials` counts them.
- The study holds which trial runs where (user attrs `run`, `worker` = host:pid, `steps`, `error`) and what
  each reported; the summary is rebuilt from it and the run directories by every worker that finishes.
- The worker polls each trial's metrics.jsonl: every eval row is reported at its optimizer step; a trial
  the pruner stops gets SIGTERM (the trainer checkpoints and exits, as under a scheduler) and is `pruned`.
  A crash or a divergence is `failed` with its `error: ...` line; the study goes on.
- Several workers, one study: the same command on each machine with a postgresql:// storage (psycopg 3;
  users' URLs are mapped to it). A worker killed with -9 takes its trainers with it (parent-death
  signal, minivlm.stop); its running trial is failed and re-enqueued with the same parameters (Optuna's
  RetryHeartbeatStaleTrialCallback) once its heartbeat is stale, or at once by a worker on the same host
  that sees its pid gone; the retry resumes from the checkpoint. A run that already has its final weights
  is told from its metrics, never trained again.
- One machine: the storage defaults to a journal file in the sweep directory, so no server is needed.
- Each trial slot is taken once (minivlm.training.study.slots): a trial asked beyond `trials` by a race
  between workers, or a repeat of a trial's parameters, is dropped (user attr `surplus`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from minivlm.fileio import WriterLock
from minivlm.stop import Interrupted, signal_name, stop_requests
from minivlm.training.study import (
    GRACE_S,
    HEARTBEAT_S,
    METRICS,
    Search,
    check_space,
    fail_stale,
    load_search,
    open_storage,
    open_study,
    slots,
    storage_id,
    trial_id,
)
from minivlm.training.sweep import (
    Outcome,
    PlannedRun,
    SweepSpec,
    finished,
    last_error,
    launch,
    plan,
    metrics_rows,
    read_metrics,
    report,
    run_numbers,
    slot_envs,
)

POLL_S = 0.25
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Active:
    trial: optuna.Trial
    run: PlannedRun
    proc: Any
    offset: int
    t0: float
    reported: set
    pruning: bool = False
    told: bool = False
    read: tuple = (None, 0)  # (inode, bytes) of metrics.jsonl already reported


def new_rows(a: Active) -> list[dict]:
    """The rows appended to the trial's metrics.jsonl since the last poll, whole lines only: a poll reads what is
    new, not the whole file again. A resumed run rewrites the file (a new inode: minivlm.training.metrics), which
    is then read from its start; rows already reported are told by their step."""
    try:
        with open(a.run.cfg.train.run_dir / "metrics.jsonl", "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            start = a.read[1] if a.read[0] == inode else 0
            f.seek(start)
            chunk = f.read()
    except FileNotFoundError:
        return []
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    a.read = (inode, start + end)
    return metrics_rows(chunk[:end].decode())


class Worker:
    """One worker of a study: asks trials while slots are free, runs each as a sweep run, reports its eval
    rows, prunes, tells the outcome, and rebuilds the summary."""

    def __init__(self, spec: SweepSpec, search: Search, config, overrides, where: str, parallel: int,
                 nproc: int, runs_per_gpu: int, train_script: Path):
        self.spec, self.search, self.config, self.overrides, self.where = spec, search, config, list(overrides), where
        base, _ = plan(replace(spec, combos=()), config, overrides, where)
        self.base = base
        self.sweep_dir = Path(base.train.out_dir) / spec.name
        self.envs = slot_envs(parallel, nproc, runs_per_gpu)
        self.nproc, self.train_script = nproc, train_script
        self.storage = open_storage(search.storage, self.sweep_dir)
        self.study = open_study(spec.name, search, self.storage, spec.combos, base.train.max_steps or 10**9)
        self.column = METRICS[search.metric][0]

    # -- trials ------------------------------------------------------------------------------------------------
    def planned(self, params: dict) -> PlannedRun:
        combo = {p.key: params[p.key] for p in self.search.space if p.key in params}
        return plan(replace(self.spec, combos=(combo,)), self.config, self.overrides, self.where)[1][0]

    def ask(self) -> tuple[optuna.Trial, PlannedRun] | None:
        """The next trial for this worker (a waiting one first), or None when the study has all its slots."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and len(slots(self.study)) >= self.search.trials or \
                len(self.study.get_trials(deepcopy=False)) > 10 * self.search.trials:  # a space with fewer points
            return None
        trial = self.study.ask({p.key: p.distribution() for p in self.search.space})
        run = self.planned(trial.params)
        trial.set_user_attr("run", run.name)
        trial.set_user_attr("worker", WORKER)
        taken = slots(self.study)
        mine = [t for t in self.study.get_trials(deepcopy=False) if trial_id(t) == run.name and t.number != trial.number
                and t.state != TrialState.FAIL and not t.user_attrs.get("surplus")]
        if taken.index(run.name) >= self.search.trials or mine:  # a race between workers, or a repeated sample
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return self.ask() if mine else None
        return trial, run

    def start(self, slot: int) -> Active | None:
        asked = self.ask()
        if asked is None:
            return None
        trial, run = asked
        if run.cfg is None:
            self.tell_failed(trial, run.error)
            return self.start(slot)
        d = run.cfg.train.run_dir
        for _ in range(int(GRACE_S / 2 / POLL_S)):  # the trainer of a killed worker may still be saving its checkpoint
            if WriterLock.holder(d) is None:
                break
            time.sleep(POLL_S)
        t0 = time.time()
        if finished(run.cfg):  # trained to its end already (its worker died before telling): told, not retrained
            a = Active(trial, run, None, 0, t0, set())
            self.finish(a, 0)
            return self.start(slot)
        proc, offset = launch(run.cfg, self.train_script, self.nproc, self.envs[slot])
        self.progress(f"trial {trial.number} {run.name} started")
        return Active(trial, run, proc, offset, t0, set())

    def poll(self, a: Active) -> None:
        """Report the trial's new eval rows; SIGTERM it once the pruner says so."""
        key = self.search.metric
        for row in new_rows(a):
            if key in row and row["step"] not in a.reported and not a.pruning:
                a.reported.add(row["step"])
                a.trial.report(row[key], row["step"])
                if a.trial.should_prune():
                    a.pruning = True
                    a.trial.set_user_attr("pruned_at", row["step"])
                    with contextlib.suppress(ProcessLookupError):
                        a.proc.send_signal(signal.SIGTERM)

    def finish(self, a: Active, rc: int, stopping: bool = False) -> None:
        d = a.run.cfg.train.run_dir
        rows = read_metrics(d / "metrics.jsonl")
        steps = max((r["step"] for r in rows if "step" in r), default=0)
        a.trial.set_user_attr("steps", steps)
        a.trial.set_user_attr("wall_s", round(time.time() - a.t0, 1))
        value = run_numbers(rows)[self.column]
        if a.pruning and (rc == 0 or rc == 128 + signal.SIGTERM):
            self.study.tell(a.trial, state=TrialState.PRUNED)
            self.progress(f"trial {a.trial.number} {a.run.name} pruned at step {a.trial.user_attrs['pruned_at']}")
        elif rc == 0 and value != "":
            self.study.tell(a.trial, value)
            self.progress(f"trial {a.trial.number} {a.run.name} done: {self.search.metric} {value:.4f}")
        elif stopping or (rc > 128 and rc - 128 in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
            self.study.tell(a.trial, state=TrialState.FAIL)  # a stop, not a failure: a rerun resumes it
            RetryHeartbeatStaleTrialCallback()(self.study, self.study.get_trials(deepcopy=False)[a.trial.number])
            self.progress(f"trial {a.trial.number} {a.run.name} interrupted at step {steps}")
        else:
            error = last_error(d / "stderr.log", a.offset, rc) if rc else \
                f"no {self.search.metric} in metrics.jsonl; set train.eval_interval (or keep the final eval)"
            self.tell_failed(a.trial, error, a.run.name)
        a.told = True

    def tell_failed(self, trial, error: str, name: str = "") -> None:
        trial.set_user_attr("error", error)
        self.study.tell(trial, state=TrialState.FAIL)
        self.progress(f"trial {trial.number} {name or trial.user_attrs.get('run', '')} failed: {error}")

    def progress(self, event: str) -> None:
        states = [t.state for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
        n = {s: states.count(s) for s in TrialState}
        print(f"search {self.spec.name}: {event} | {n[TrialState.COMPLETE]} done, {n[TrialState.PRUNED]} pruned, "
              f"{n[TrialState.FAIL]} failed, {n[TrialState.RUNNING]} running of {self.search.trials}", flush=True)

    def others_running(self, own: set[int]) -> bool:
        return any(t.number not in own for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> bool:
        print(f"search {self.spec.name}: worker {WORKER}, {self.search.trials} trials ({len(self.spec.combos)} "
              f"enqueued), sampler {self.search.sampler}, pruner {self.search.pruner}, {len(self.envs)} at a time -> "
              f"{self.sweep_dir}", flush=True)
        active: dict[int, Active] = {}
        beat = checked = 0.0
        with stop_requests() as stop:
            try:
                while not stop.requested:
                    own = {a.trial.number for a in active.values()}
                    if time.time() - checked > 2.0:
                        checked = time.time()
                        fail_stale(self.study, self.storage, own)
                    for slot in [s for s in range(len(self.envs)) if s not in active]:
                        a = self.start(slot)
                        if a is not None:
                            active[slot] = a
                    if not active and not self.others_running(own):
                        break
                    time.sleep(POLL_S if active else 2.0)  # idle: another worker's trial may come back as a retry
                    if time.time() - beat > HEARTBEAT_S and isinstance(self.storage, RDBStorage):
                        beat = time.time()
                        for a in active.values():
                            self.storage.record_heartbeat(storage_id(self.study, self.storage, a.trial.number))
                    for slot, a in list(active.items()):
                        self.poll(a)
                        if a.proc.poll() is not None:
                            self.finish(a, a.proc.returncode)
                            del active[slot]
                if stop.requested:
                    for a in active.values():
                        with contextlib.suppress(ProcessLookupError):
                            a.proc.send_signal(stop.signum)
                    for a in active.values():
                        self.finish(a, a.proc.wait(), stopping=True)
                    self.summarise()
                    raise Interrupted(stop.signum, f"search {self.spec.name}: stopped by {signal_name(stop.signum)}; "
                                                   f"rerun the same command to resume")
            except Interrupted as e:
                for a in active.values():
                    with contextlib.suppress(ProcessLookupError):
                        a.proc.send_signal(e.signum)
                    if not a.told:
                        self.finish(a, a.proc.wait(), stopping=True)
                raise
        return self.summarise()

    # -- the summary -------------------------------------------------------------------------------------------
    def summarise(self) -> bool:
        """summary.csv/.md and curves.png from the study and the run directories; prints the best trial."""
        latest: dict[str, Any] = {}
        for t in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            if "run" in t.user_attrs and not t.user_attrs.get("surplus"):
                latest[t.user_attrs["run"]] = t
        retried = {n for t in self.study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
        runs, outcomes, extra = [], {}, {}
        for name, t in latest.items():
            run = self.planned(t.params)
            again = "interrupted" if "failed_trial" in t.system_attrs else "pending"  # a retry waiting for a worker
            status = {TrialState.COMPLETE: "done", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
                      TrialState.WAITING: again}.get(t.state, "failed")
            if t.state == TrialState.FAIL and "error" not in t.user_attrs:
                status = "interrupted" if t.number in retried else "failed"
            runs.append(run)
            outcomes[name] = Outcome(status, t.user_attrs.get("error", ""), t.user_attrs.get("wall_s", ""))
            extra[name] = {"steps": t.user_attrs.get("steps", ""), "worker": t.user_attrs.get("worker", "")}
        if not runs:
            return False
        rows = report(self.sweep_dir, runs, outcomes, plot=True, extra=extra)
        done = [r for r in rows if r["status"] == "done" and r[self.column] != ""]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "pruned", "failed")}
        steps = sum(int(r["steps"] or 0) for r in rows)
        print(f"search {self.spec.name}: {counts['done']} done, {counts['pruned']} pruned, {counts['failed']} failed "
              f"of {self.search.trials}; {steps} steps -> {self.sweep_dir}/summary.md", flush=True)
        if done:
            best = (min if self.search.direction == "minimize" else max)(done, key=lambda r: r[self.column])
            print(f"search {self.spec.name}: best {best['run']} ({self.column} {best[self.column]:.4f}); reproduce: "
                  f"{reproduction(self.config, self.spec, self.overrides, latest[best['run']].params)}", flush=True)
        return bool(done)


def reproduction(config, spec: SweepSpec, overrides: list[str], params: dict) -> str:
    """The stage-2 command that trains the best trial alone."""
    sets = [f"{k}={_value(v)}" for k, v in {**spec.base, **params}.items()] + list(overrides)
    return " ".join(["python stages/train.py --config", str(config), *sets])


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


def run_search(spec: SweepSpec, table: dict, config, overrides, where: str, parallel: int = 1, nproc: int = 1,
               runs_per_gpu: int = 1, storage: str = "", train_script: Path = Path("stages/train.py")) -> bool:
    """Check [search] and its space against the config, then work on the study until it has all its trials."""
    search = load_search(table, where)
    if storage:
        search = replace(search, storage=storage)
    check_space(spec, search, config, overrides, where)
    if len(spec.combos) > search.trials:
        raise ValueError(f"{where}: {len(spec.combos)} enqueued trials ([grid]/[[runs]]) but search.trials = "
                         f"{search.trials}; raise trials")
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines say what its INFO lines would
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # ask/tell beats by hand
            warnings.filterwarnings("ignore", "Fixed parameter", UserWarning)       # an enqueued value off the space
            return Worker(spec, search, config, overrides, where, parallel, nproc, runs_per_gpu, train_script).run()
    finally:
        optuna.logging.set_verbosity(level)
