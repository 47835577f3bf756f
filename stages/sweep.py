"""Sweep: many stage-2 runs against one embedding cache, compared in one table and one plot.

    python stages/sweep.py --config configs/demo.toml --sweep configs/sweeps/demo_lr.toml \
        [section.key=value ...] [--parallel N] [--nproc_per_node K] [--runs_per_gpu K] [--storage URL]
Each run trains in runs/<sweep>/<run>/ (stdout.log, stderr.log beside its metrics); the comparison is
runs/<sweep>/summary.csv, summary.md and curves.png. Rerun the same command to resume: finished runs are
skipped, interrupted ones resume from their checkpoints. Exits non-zero if any run failed.
A sweep file with [search] is an Optuna study (pip install -e '.[search]'): the same command on several
machines with --storage postgresql://user@host/db shares one study; each trial runs once.
"""
from pathlib import Path

from minivlm.cli import parser, run
from minivlm.config import check_ranges
from minivlm.training.sweep import run_sweep


def main():
    p = parser(__doc__.splitlines()[0], ["data", "cache", "encoder", "tokenizer", "model", "train"])
    p.add_argument("--sweep", required=True, help="sweep TOML: name, [base] overrides, [grid] of "
                                                  "section.key = [values], [[runs]] of overrides")
    p.add_argument("--parallel", type=int, default=1, help="runs at once: one GPU each where CUDA exists, "
                                                           "else the CPU cores split between them (default 1)")
    p.add_argument("--nproc_per_node", type=int, default=1, help="launch each run with torchrun on this many "
                                                                 "processes (default 1: plain python)")
    p.add_argument("--runs_per_gpu", type=int, default=1, help="runs sharing one GPU (small models leave most "
                                                               "of a GPU idle): --parallel up to GPUs x K (default 1)")
    p.add_argument("--storage", default="", help="[search] only: the study's database, e.g. postgresql://user@host/db "
                                                 "(default: search.storage, else a file in the sweep directory)")
    args = p.parse_intermixed_args()
    check_ranges(args, "--{}", parallel=">= 1", nproc_per_node=">= 1", runs_per_gpu=">= 1")
    return run_sweep(args.config, args.sweep, args.overrides, args.parallel, args.nproc_per_node,
                     Path(__file__).with_name("train.py"), args.runs_per_gpu, args.storage)


if __name__ == "__main__":
    run(main)
