"""P5 child: train a few steps from a cache through the library path and print peak memory as one JSON line.

    python bench/peak_rss.py CONFIG.toml --steps 3 [--device cpu]

Why not ru_maxrss: a child's ru_maxrss (and the parent's RUSAGE_CHILDREN) starts from the RSS of the
process that forked it, so every child of a big bench process reports the bench's own size. Instead:
- `main_mb`: this process's peak RSS, VmHWM from /proc/self/status (exact; reset by exec);
- `workers_mb`: the peak of the DataLoader workers' summed PSS (proportional set size: pages shared with
  the main process count 1/n), sampled every 10 ms (their memory is steady, so sampling catches it);
- `total_mb` = main_mb + workers_mb: the job's peak footprint, slightly over (shared pages counted in
  main's RSS and again, in part, in the workers' PSS).
Without /proc (not Linux) it falls back to ru_maxrss, which is then an upper bound.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loops import CachedSource, Setup  # noqa: E402
from minivlm.config import load_config  # noqa: E402
from minivlm.trainer import train_step  # noqa: E402


def _kb(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class WorkersPss(threading.Thread):
    """Samples the summed PSS of this process's children (the DataLoader workers); keeps the peak (KiB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.01):
            kids = 0
            for c in _children(me):
                try:
                    kids += _kb(f"/proc/{c}/smaps_rollup", "Pss")
                except OSError:  # a worker exiting between listing and reading
                    pass
            self.peak = max(self.peak, kids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    proc = Path("/proc/self/smaps_rollup").is_file()
    sampler = WorkersPss()
    if proc:
        sampler.start()
    setup = Setup(load_config(args.config), args.device)
    model, opt, scaler = setup.model()
    source = CachedSource(setup, epoch=0)
    for _ in range(args.steps):
        train_step(model, opt, [next(source)], setup.cfg.train, scaler, setup.dtype, args.device)
    if proc:
        sampler.stop.set()
        sampler.join()
        main_mb, workers_mb = _kb("/proc/self/status", "VmHWM") / 1024, sampler.peak / 1024
        out = {"main_mb": main_mb, "workers_mb": workers_mb, "total_mb": main_mb + workers_mb,
               "method": "main VmHWM + workers' sampled PSS"}
    else:
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        out = {"main_mb": rss, "total_mb": rss, "workers_mb": 0.0, "method": "ru_maxrss (upper bound)"}
    source.close()
    out["samples"] = len(setup.data.train)
    if args.device.startswith("cuda"):
        import torch
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
