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
- Each trial slot is taken once: a worker counts distinct run names (enqueued trials not yet taken count
  too) and a trial asked beyond `trials` by a race between workers is dropped (user attr `surplus`).
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
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from minivlm.fileio import WriterLock
from minivlm.stop import Interrupted, signal_name, stop_requests
from minivlm.training.sweep import (
    SET_BY_SWEEP,
    Outcome,
    PlannedRun,
    SweepSpec,
    check_caches,
    finished,
    last_error,
    launch,
    plan,
    read_metrics,
    report,
    run_numbers,
    slot_envs,
)

SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "asha", "hyperband")
METRICS = {"eval_loss": ("best_eval_loss", "minimize"), "image_gap": ("image_gap", "maximize")}  # eval row key ->
HEARTBEAT_S, GRACE_S = 5, 30     # RDB storages: a trial whose worker is silent for GRACE_S is retried
POLL_S = 0.25
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Param:
    """One key of [search.space]: floats {low, high, log}, ints {low, high, step}, or a list of choices."""
    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices:
            return optuna.distributions.CategoricalDistribution(self.choices)
        ints = isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)
        if ints and not self.log:
            return optuna.distributions.IntDistribution(self.low, self.high, step=self.step or 1)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def bounds(self) -> list:
        return list(self.choices) or [self.low, self.high]


@dataclass(frozen=True)
class Search:
    trials: int
    space: tuple[Param, ...]
    metric: str = "eval_loss"
    sampler: str = "tpe"
    pruner: str = "none"
    min_steps: int = 1
    reduction_factor: int = 3
    seed: int = 0
    storage: str = ""

    @property
    def direction(self) -> str:
        return METRICS[self.metric][1]


def _param(key: str, value: Any, where: str) -> Param:
    if isinstance(value, list):
        if not value or not all(isinstance(v, (str, int, float, bool)) for v in value):
            raise ValueError(f"{where}: {key} must be a non-empty list of values, e.g. [\"linear\", \"mlp\"]")
        return Param(key, choices=tuple(value))
    if not isinstance(value, dict) or not {"low", "high"} <= set(value) or set(value) - {"low", "high", "log", "step"}:
        raise ValueError(f"{where}: {key} must be {{ low = ..., high = ..., log = true }}, {{ low, high, step }} "
                         f"or a list of choices")
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ValueError(f"{where}: {key} low and high must be numbers")
    if low > high:
        raise ValueError(f"{where}: {key} has low = {low} > high = {high}; swap them")
    if log and (low <= 0 or step is not None):
        raise ValueError(f"{where}: {key} with log = true needs low > 0 and no step")
    return Param(key, low, high, bool(log), step)


def load_search(table: Any, where: str) -> Search:
    """[search] of a sweep file, checked on its own (its keys against the config: `check_space`)."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [search] must be a table")
    known = {"trials", "metric", "sampler", "pruner", "min_steps", "reduction_factor", "seed", "storage", "space"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key search.{unknown[0]}; [search] holds {', '.join(sorted(known))}")
    choices = {"metric": tuple(METRICS), "sampler": SAMPLERS, "pruner": PRUNERS}
    for key, allowed in choices.items():
        if key in table and table[key] not in allowed:
            raise ValueError(f"{where}: search.{key} = {table[key]!r} is unknown; use one of {', '.join(allowed)}")
    for key, low in (("trials", 1), ("min_steps", 1), ("reduction_factor", 2), ("seed", 0)):
        if key in table and (not isinstance(table[key], int) or table[key] < low):
            raise ValueError(f"{where}: search.{key} must be an integer >= {low}")
    if "trials" not in table:
        raise ValueError(f"{where}: [search] needs trials (the study's size, enqueued [grid]/[[runs]] included)")
    space = table.get("space")
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{where}: [search] needs [search.space], e.g. \"train.lr\" = {{ low = 1e-4, high = 1e-2, "
                         f"log = true }}")
    flat = {k: v for k, v in _flat_space(space)}
    fixed = [k for k in SET_BY_SWEEP if k in flat]
    if fixed:
        raise ValueError(f"{where}: {fixed[0]} is set by the sweep; remove it from [search.space]")
    return Search(space=tuple(_param(k, v, f"{where} [search.space]") for k, v in flat.items()),
                  **{k: v for k, v in table.items() if k != "space"})


def _flat_space(space: dict, prefix: str = ""):
    """"train.lr" = {low..} and [search.space.train] lr = {low..} both -> ("train.lr", {low..})."""
    for key, value in space.items():
        if isinstance(value, dict) and not {"low", "high"} & set(value):
            yield from _flat_space(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_space(spec: SweepSpec, search: Search, config, overrides, where: str) -> None:
    """Every space key and bound (and each enqueued trial) makes a valid config and reads the cache as it is,
    before any run: a key that is not a config key, a bound of the wrong type or range is one line."""
    keys = [p.key for p in search.space]
    extra = sorted({k for c in spec.combos for k in c} - set(keys))
    if extra:
        raise ValueError(f"{where}: {extra[0]} is set by [grid]/[[runs]] but not in [search.space]; enqueued trials "
                         f"set space keys only (put fixed values in [base])")
    combos = tuple({p.key: v} for p in search.space for v in p.bounds()) + spec.combos
    _, runs = plan(replace(spec, combos=combos), config, overrides, where)
    bad = next((r for r in runs if r.cfg is None), None)
    if bad is not None:
        raise ValueError(f"{where} [search.space]: {bad.error}")
    check_caches(runs, where)


def storage_url(url: str) -> str:
    """postgresql:// and postgres:// as users write them -> the installed driver (psycopg 3)."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def open_storage(url: str, sweep_dir: Path):
    """The study's storage: a journal file in the sweep directory, else an RDB URL (retried a few times: two
    workers creating the tables at once race, and one of them loses)."""
    if not url:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    connect = {"connect_args": {"connect_timeout": 10}} if storage_url(url).startswith("postgresql") else {}
    for attempt in range(3):
        try:
            return RDBStorage(storage_url(url), engine_kwargs=connect, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
        except Exception as e:  # noqa: BLE001 - any driver error is "cannot reach the storage"
            last = e
            time.sleep(0.2 + attempt / 2)
    reason = str(getattr(last, "orig", None) or last).strip().splitlines()[0]
    raise ValueError(f"storage {url}: cannot open it ({reason}); start the database server or fix --storage / "
                     f"search.storage")


def _sampler(search: Search, seed: int):
    return (optuna.samplers.TPESampler if search.sampler == "tpe" else optuna.samplers.RandomSampler)(seed=seed)


def _pruner(search: Search, max_steps: int):
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=search.min_steps - 1)
    if search.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=search.min_steps,
                                                      reduction_factor=search.reduction_factor)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=search.min_steps, reduction_factor=search.reduction_factor,
                                              max_resource=max(max_steps, search.min_steps))
    return optuna.pruners.NopPruner()


def open_study(name: str, search: Search, storage, enqueued: tuple[dict, ...], max_steps: int) -> optuna.Study:
    """Create the study, or load it where another worker (or an earlier run) did. Its creator enqueues the
    [grid]/[[runs]] trials and seeds its sampler with `seed` (a lone worker is reproducible); other workers
    wait for the enqueued trials and draw from other seeds (the same seed would propose the same trials)."""
    pruner = _pruner(search, max_steps)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=_sampler(search, search.seed),
                                    pruner=pruner, direction=search.direction)
        for combo in enqueued:
            study.enqueue_trial(combo)
        study.set_user_attr("enqueued", len(enqueued))
        return study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner,
                              sampler=_sampler(search, search.seed + 1 + os.getpid() % 100_000))
    if study.direction.name.lower() != search.direction:
        raise ValueError(f"study {name} in {search.storage or 'the sweep directory'} maximises or minimises "
                         f"otherwise than search.metric = {search.metric!r}; use another sweep name")
    for _ in range(300):  # its creator is enqueueing them now
        if "enqueued" in study.user_attrs:
            break
        time.sleep(0.1)
    return study


def trial_id(trial) -> str:
    """A trial slot: its run name once a worker took it, else its number (an enqueued trial not yet taken)."""
    return trial.user_attrs.get("run") or f"#{trial.number}"


def slots(study: optuna.Study) -> list[str]:
    """The study's trial slots in the order they were taken (retries share their slot)."""
    out: dict[str, None] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.user_attrs.get("surplus"):
            out.setdefault(trial_id(t), None)
    return list(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def storage_id(study: optuna.Study, storage, number: int) -> int:
    """The storage's id of trial `number` (heartbeats and state changes address trials by it)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def fail_stale(study: optuna.Study, storage, own: set[int]) -> None:
    """Running trials of dead workers -> failed and re-enqueued (same parameters): those whose heartbeat is
    stale (RDB storages), and at once those of a worker on this host whose pid is gone."""
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if where != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or t.number in own:
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            tid = storage_id(study, storage, t.number)
            if storage.set_trial_state_values(tid, state=TrialState.FAIL):
                RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(tid))


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
        for row in read_metrics(a.run.cfg.train.run_dir / "metrics.jsonl"):
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
