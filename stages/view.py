"""A local page to look at runs: a sortable table, loss curves, held-out captions side by side, captioning.

    python stages/view.py --runs runs/demo runs/demo_lr [--host 127.0.0.1] [--port 7860] [--n 8]
Each PATH is a run directory, a sweep directory (summary.csv) or a folder of them. The page is served on
127.0.0.1 only (nothing leaves the machine); from another machine, tunnel it with the printed `ssh -L` line.
Needs the `view` extra (pip install -e '.[view]'; `make install` has it).
"""
import argparse
import os

from minivlm.cli import run
from minivlm.config import check_ranges
from minivlm.dist import init_distributed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="PATH",
                   help="run directories, sweep directories or folders of them")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--n", type=int, default=8, help="held-out samples to caption per run (default: %(default)s)")
    a = p.parse_args()
    check_ranges(a, "--{}", port="[1, 65535]", n=">= 1")
    from minivlm.use.runs import Loaded, find_runs
    runs = find_runs(a.runs)  # a missing path is one line before Gradio is even imported
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from minivlm.use.view import serve
    serve(runs, Loaded(init_distributed(process_group=False).device), a.host, a.port, a.n)


if __name__ == "__main__":
    run(main)
