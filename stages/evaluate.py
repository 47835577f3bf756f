"""Evaluate a trained run on held-out data: eval loss, loss with shuffled images, their gap, and
generated vs reference captions, written to runs/<name>/eval/ (eval.json, captions.md, contact_sheet.png).

    python stages/evaluate.py --run runs/demo [--cache cache/demo] [--records data/demo/val.json] [--n 32]
"""
import argparse

from minivlm.cli import run
from minivlm.config import check_ranges
from minivlm.dist import init_distributed
from minivlm.use.evaluation import evaluate_run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (a finished stages/train.py run)")
    p.add_argument("--cache", default=None, help="embedding cache (default: the run's cache.dir)")
    p.add_argument("--records", default=None, help="held-out records (default: the run's held-out split)")
    p.add_argument("--n", type=int, default=32, help="samples to caption (default: %(default)s)")
    a = p.parse_args()
    check_ranges(a, "--{}", n=">= 1")
    evaluate_run(a.run, a.cache, a.records, a.n, init_distributed(process_group=False).device)


if __name__ == "__main__":
    run(main)
