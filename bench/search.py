"""P8: what pruning saves in a search. One study with `pruner = "asha"` against the same trials with
`pruner = "none"` on the demo: steps trained, wall time and the best eval loss each found.

    python bench/search.py [--trials 8] [--max_steps 120] [--work bench/work/search] [--out FILE.json]

Both studies are `stages/sweep.py` commands as a user runs them (one worker, one trial at a time, a journal file
in the sweep directory; one compute thread, as on a shared machine), on one demo cache, with the random sampler and one seed: both draw the same trials, after
the same enqueued baseline, so the only difference is what the pruner stopped. Rungs at min_steps = max_steps / 6
and x3 (ASHA, reduction factor 3). The numbers come from each study's summary.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SWEEP = """name = "{name}"
[base]
"train.max_steps" = {max_steps}
"train.eval_interval" = {every}
"train.save_interval" = {every}
[[runs]]
"train.lr" = 2e-3
"model.projector" = "mlp"
[search]
trials = {trials}
sampler = "random"
pruner = "{pruner}"
min_steps = {every}
reduction_factor = 3
seed = 0
[search.space]
"train.lr" = {{ low = 1e-4, high = 1e-2, log = true }}
"model.projector" = ["linear", "mlp"]
"""


def demo_cache(work: Path, log) -> Path:
    """The demo (as `make demo-data` builds it) embedded once in `work`; reused when present."""
    sys.path.insert(0, str(REPO))
    from minivlm.config import load_config, to_toml, to_tree
    from minivlm.demo.folder import make_demo
    from minivlm.dist import Dist
    from minivlm.embedding.embed import run_embed
    config = work / "demo.toml"
    if not config.is_file():
        log(f"[P8] building the demo and its cache in {work}")
        make_demo(work / "demo", seed=0)
        d = work / "demo"
        cfg = load_config(REPO / "configs" / "demo.toml", [
            f"data.records={d}/train.json", f"data.val_records={d}/val.json", f"data.image_root={d}/images",
            f"encoder.name_or_path={d}/encoder", f"tokenizer.name_or_path={d}/tokenizer", f"cache.dir={work}/cache",
            f"train.out_dir={work}/runs"])
        run_embed(cfg, Dist())
        config.write_text(to_toml(to_tree(cfg)))
    return config


def study(config: Path, work: Path, pruner: str, trials: int, max_steps: int, log) -> dict:
    name = f"p8_{pruner}"
    sweep = work / f"{name}.toml"
    sweep.write_text(SWEEP.format(name=name, max_steps=max_steps, every=max(1, max_steps // 6), trials=trials,
                                  pruner=pruner))
    out = work / "runs" / name
    if out.exists():  # a fresh study each time: the figures are one whole search
        subprocess.run(["rm", "-rf", str(out)], check=True)
    log(f"[P8] {trials} trials of at most {max_steps} steps, pruner {pruner}")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "stages" / "sweep.py"), "--config", str(config), "--sweep",
                        str(sweep), f"train.out_dir={work / 'runs'}"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"P8 search {name} failed: {(r.stdout + r.stderr)[-2000:]}")
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    done = [float(row["best_eval_loss"]) for row in rows if row["status"] == "done" and row["best_eval_loss"]]
    return {"wall_s": round(wall, 1), "steps": sum(int(row["steps"] or 0) for row in rows),
            "best_eval_loss": min(done), "trials": {row["run"]: row["status"] for row in rows},
            "pruned": sum(row["status"] == "pruned" for row in rows)}


def measure(work: Path, trials: int = 8, max_steps: int = 120, log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    config = demo_cache(work, log)
    asha = study(config, work, "asha", trials, max_steps, log)
    none = study(config, work, "none", trials, max_steps, log)
    return {"trials": trials, "max_steps": max_steps, "asha": asha, "none": none,
            "same_trials": set(asha["trials"]) == set(none["trials"]),
            "steps_ratio": round(asha["steps"] / none["steps"], 3),
            "wall_ratio": round(asha["wall_s"] / none["wall_s"], 3),
            "best_loss_ratio": round(asha["best_eval_loss"] / none["best_eval_loss"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--max_steps", type=int, default=120)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "search")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = measure(args.work, args.trials, args.max_steps)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
