"""Runs as the view page sees them: found from paths, described from their own files, loaded when first used.

Design choices:
- A path is a run directory (config.toml, metrics.jsonl or model_config.json in it), a sweep directory
  (summary.csv) or a folder holding either; a missing path is a FileNotFoundError naming it.
- A run's row is read from its files, never from a process: numbers from metrics.jsonl through the sweep's own
  `run_numbers` (so they equal summary.csv's), a sweep's overrides and status from its summary.csv, read by
  column name so columns added later (steps, worker) are tolerated, and `running` while a process holds the
  run directory's writer lock.
- Loaded lazily and kept: a run's model and tokenizer on first caption, the vision tower once per fingerprint
  (runs of one sweep share it). A tower that cannot be loaded or whose fingerprint differs is that run's error,
  one line; other runs go on.
- A caption streams: generation runs in a worker thread and hands each step's tokens over (`generate`'s
  `on_token`), so the page shows the text as it grows; the final text is `caption_files`' own.
- Held-out captions (greedy, from the cached rows, as stages/evaluate.py makes them) are kept in the run
  directory (`view/held_out.json`, written atomically) keyed by n and the weights file's size and mtime, so
  reopening computes nothing and a retrained run is captioned again.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from minivlm.embedding.encoder import Encoder, fingerprint_id
from minivlm.fileio import WriterLock, atomic_write_json
from minivlm.formats.records import resolve_image
from minivlm.training.data import Samples
from minivlm.training.sweep import read_metrics, run_numbers
from minivlm.training.text import decode
from minivlm.use.captioner import Captioner, caption_files, load_run, load_run_encoder
from minivlm.use.evaluation import caption_samples, held_out

RUN_FILES = ("config.toml", "metrics.jsonl", "model_config.json", "sweep_run.toml")
WEIGHTS = "model.safetensors"
HELD_OUT = Path("view") / "held_out.json"
COLUMNS = ("run", "overrides", "status", "step", "best_eval_loss", "image_gap", "samples_per_s")


@dataclass(frozen=True)
class Run:
    name: str                  # the run directory's name, `<sweep>/<run>` for a sweep's
    dir: Path
    summary: dict = field(default_factory=dict)  # its summary.csv row, {} outside a sweep

    @property
    def overrides(self) -> dict[str, str]:
        """The sweep's overrides (summary.csv's section.key columns) this run was given."""
        return {k: v for k, v in self.summary.items() if "." in k and v != ""}

    @property
    def weights(self) -> Path:
        return self.dir / WEIGHTS

    def caption_disabled(self) -> str:
        """Why this run cannot caption yet, "" when it can."""
        if self.weights.is_file():
            return ""
        return f"{self.name}: no {WEIGHTS} yet (training not finished); caption disabled"


def is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def read_summary(sweep_dir: Path) -> list[dict]:
    """summary.csv's rows as written (strings), whatever its columns."""
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(io.StringIO(f.read())))


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under `paths`: run directories, sweep directories (their summary.csv's runs) and folders of
    either (one level down), in order, each once."""
    runs: list[Run] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory; pass a run directory, a sweep directory "
                                    f"(summary.csv) or a folder of them")
        found = _runs_in(path) or [r for child in sorted(p for p in path.iterdir() if p.is_dir())
                                   for r in _runs_in(child)]
        if not found:
            raise ValueError(f"{path}: no runs in it (no {', '.join(RUN_FILES)} or summary.csv here or one level "
                             f"down); pass a run directory from stages/train.py or a sweep directory")
        runs += [r for r in found if r.dir.resolve() not in {x.dir.resolve() for x in runs}]
    return runs


def _runs_in(path: Path) -> list[Run]:
    if (path / "summary.csv").is_file():
        return [Run(f"{path.name}/{row['run']}", path / row["run"], row) for row in read_summary(path)]
    return [Run(path.name, path)] if is_run_dir(path) else []


def status(run: Run) -> str:
    """running (a process writes it now), a sweep's pruned / failed, done (final weights), else what the sweep
    recorded, else interrupted (metrics but no final weights) or pending."""
    if run.dir.is_dir() and WriterLock.holder(run.dir) is not None:
        return "running"
    recorded = run.summary.get("status", "")
    if recorded in ("pruned", "failed"):
        return recorded
    if run.weights.is_file():
        return "done"
    if recorded and recorded != "running":
        return recorded
    return "interrupted" if (run.dir / "metrics.jsonl").is_file() else "pending"


def _num(v, digits: int) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return ""


def run_row(run: Run) -> dict[str, str]:
    """The table's row: numbers from metrics.jsonl (summary.csv's when the run has none), losses to 4 decimals
    as summary.md writes them."""
    metrics = read_metrics(run.dir / "metrics.jsonl")
    numbers = run_numbers(metrics) if metrics else run.summary
    return {"run": run.name, "overrides": " ".join(f"{k}={v}" for k, v in run.overrides.items()),
            "status": status(run), "step": str(max((r["step"] for r in metrics if "step" in r), default="")),
            "best_eval_loss": _num(numbers.get("best_eval_loss"), 4), "image_gap": _num(numbers.get("image_gap"), 4),
            "samples_per_s": _num(numbers.get("samples_per_s"), 2)}


def curves(run: Run) -> list[dict]:
    """(run, kind, step, loss) points: kind "train" (loss) or "eval" (eval_loss)."""
    return [{"run": run.name, "kind": kind, "step": r["step"], "loss": r[key]}
            for r in read_metrics(run.dir / "metrics.jsonl") for kind, key in (("train", "loss"), ("eval", "eval_loss"))
            if key in r]


class Loaded:
    """Captioners loaded on first use and kept; one vision tower per fingerprint, shared by the runs that ask
    for it. Thread-safe: the page serves requests on several threads."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.runs: dict[Path, Captioner] = {}
        self.towers: dict[str, Encoder | Exception] = {}
        self.lock = threading.Lock()

    def captioner(self, run: Run, with_encoder: bool = True) -> Captioner:
        """The run's model (and tower); ValueError / FileNotFoundError / OSError with one line if not loadable."""
        with self.lock:
            if run.dir not in self.runs:
                reason = run.caption_disabled()
                if reason:
                    raise FileNotFoundError(reason)
                self.runs[run.dir] = load_run(run.dir, self.device, with_encoder=False)
            cap = self.runs[run.dir]
            if with_encoder and cap.encoder is None:
                vc = cap.model.config
                key = f"{vc.encoder.name_or_path}:{fingerprint_id(vc.encoder.fingerprint)}"
                if key not in self.towers:
                    try:
                        self.towers[key] = load_run_encoder(run.dir, vc, self.device)
                    except (ValueError, OSError) as e:
                        self.towers[key] = e
                tower = self.towers[key]
                if isinstance(tower, Exception):
                    raise ValueError(f"{run.name}: {str(tower).splitlines()[0]}")
                cap.encoder = tower
            return cap

    def caption(self, run: Run, paths: list[str], prompt: str = "", **kw) -> list[tuple[str, str | None, str | None]]:
        """stages/caption.py's (path, caption, error) per image (or one for a prompt with <image> tags)."""
        cap = self.captioner(run)
        cap.model.eval()
        return caption_files(cap, paths, prompt=prompt, **kw)

    def caption_stream(self, run: Run, paths: list[str], prompt: str = "", every_s: float = 0.2, **kw):
        """`caption`, streamed: yields ("partial", {prompt number: text so far}) at most every `every_s` while
        tokens come, then ("done", caption's result). A run that cannot caption raises as `caption` does."""
        steps: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["done"] = self.caption(run, paths, prompt, on_token=lambda first, t: steps.put((first, t)), **kw)
            except Exception as e:  # raised again in the caller's thread
                result["error"] = e
            finally:
                steps.put(None)
        threading.Thread(target=work, daemon=True).start()
        tokens: dict[int, list[int]] = {}
        last = time.monotonic()
        while (item := steps.get()) is not None:
            first, step = item
            for i, t in enumerate(step):
                tokens.setdefault(first + i, []).append(t)
            if time.monotonic() - last >= every_s:
                fmt = self.runs[run.dir].fmt
                eos = fmt.eos_id
                yield "partial", {i: decode(fmt, row[:row.index(eos) + 1] if eos in row else row)
                                  for i, row in tokens.items()}
                last = time.monotonic()
        if "error" in result:
            raise result["error"]
        yield "done", result["done"]

    def held_out(self, run: Run, n: int) -> list[dict]:
        """The run's greedy captions of n held-out samples (id, images, image paths, prompt, reference,
        generated), computed once and kept in the run directory."""
        path, stat = run.dir / HELD_OUT, run.weights.stat() if run.weights.is_file() else None
        key = {"n": n, "weights_size": stat and stat.st_size, "weights_mtime_ns": stat and stat.st_mtime_ns}
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            kept = json.loads(path.read_text())
            if {k: kept.get(k) for k in key} == key:
                return kept["samples"]
        cap = self.captioner(run, with_encoder=False)
        cap.model.eval()
        cfg, index, split = held_out(run.dir, cap.model.config, None, None)
        ds = Samples(split, index.reader(), cap.fmt)
        try:
            samples = caption_samples(cap, ds, index.codec, n)
        finally:
            ds.close()
        for s in samples:
            s["image_paths"] = [str(p) if p is not None else "" for p in
                                (resolve_image(cfg.data.image_root, k) for k in s["images"])]
        atomic_write_json(path, {**key, "samples": samples})
        return samples
