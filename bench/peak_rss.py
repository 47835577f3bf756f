"""P5 child: train a few steps from a cache through the library path (or, with --embed, run stage 1 on the
config's records) and print peak memory as one JSON line; with --embed also stage 1's wall time (`embed_s`,
run_embed alone: P4-remote times stage 1 as a new process runs it, its metadata asked afresh).

    python bench/peak_rss.py CONFIG.toml --steps 3 [--device cpu] [--embed]

Why not ru_maxrss: a child's ru_maxrss (and the parent's RUSAGE_CHILDREN) starts from the RSS of the
process that forked it, so every child of a big bench process reports the bench's own size. Instead
`total_mb` is this process's peak RSS, VmHWM from /proc/self/status (exact; reset by exec). Stage 2 reads
in this process (reader threads, no worker processes), so that is the job's whole footprint. A cache
that fits in memory is mapped, so the shard pages its steps touched count in it too (shared page cache,
a few rows a step here). Without /proc (not Linux) it falls back to ru_maxrss, which is then an upper
bound.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loops import CachedSource, Setup  # noqa: E402
from minivlm.config import load_config  # noqa: E402
from minivlm.dist import Dist  # noqa: E402
from minivlm.embedding.embed import run_embed  # noqa: E402
from minivlm.training.trainer import train_step  # noqa: E402


def _kb(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--embed", action="store_true", help="run stage 1 (P5: encoder.num_workers=0, all in this process)")
    args = ap.parse_args()
    timed = {}
    if args.embed:
        t0 = time.perf_counter()
        manifest = run_embed(load_config(args.config), Dist(device=args.device))
        source, samples, timed = None, manifest["counts"]["embedded"], {"embed_s": time.perf_counter() - t0}
    else:
        setup = Setup(load_config(args.config), args.device)
        model, opt, scaler = setup.model()
        source = CachedSource(setup, epoch=0)
        for _ in range(args.steps):
            train_step(model, opt, [next(source)], setup.cfg.train, scaler, setup.dtype, args.device)
        samples = len(setup.data.train)
    if Path("/proc/self/status").is_file():
        out = {"total_mb": _kb("/proc/self/status", "VmHWM") / 1024, "method": "VmHWM"}
    else:
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        out = {"total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "method": "ru_maxrss (upper bound)"}
    if source is not None:
        source.close()
    out.update(samples=samples, **timed)
    if args.device.startswith("cuda"):
        import torch
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
