"""The study a search works on: [search] and its space (checked against the config before any run), the storage
(a journal file in the sweep directory, or a PostgreSQL URL through psycopg 3), creating or loading the study,
its trial slots and the trials of dead workers.

Design choices:
- Users' postgresql:// URLs work as written (mapped to the installed driver), a Unix socket too.
- The worker that creates the study enqueues the [grid]/[[runs]] trials and seeds its sampler with `seed`, so a
  lone worker is reproducible; a worker that loads it draws from another seed (the same seed would propose
  the same trials).
- Each trial slot is taken once: slots are distinct run names (an enqueued trial not yet taken counts by its
  number); retries share their slot.
- A running trial whose worker is gone is failed and re-enqueued with the same parameters (Optuna's
  RetryHeartbeatStaleTrialCallback): on an RDB storage once its heartbeat is stale, and at once where its
  worker ran on this host and its pid is gone.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from minivlm.training.sweep import SET_BY_SWEEP, SweepSpec, check_caches, plan

SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "asha", "hyperband")
METRICS = {"eval_loss": ("best_eval_loss", "minimize"), "image_gap": ("image_gap", "maximize")}  # eval row key ->
HEARTBEAT_S, GRACE_S = 5, 30     # RDB storages: a trial whose worker is silent for GRACE_S is retried


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
