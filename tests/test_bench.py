"""bench/run.py end to end at smoke size: it runs and writes every figure. No timing is asserted."""
import json
import math
import os
import subprocess
import sys

from conftest import REPO

RATIOS = ("p1_cached_vs_live", "p1_cached_vs_live_per_image", "p2_cached_vs_ram", "p3_read_vs_raw",
          "p3_read_vs_raw_reopened", "p3_rows_vs_raw", "p3_pread_path_vs_raw_reopened", "p4_embed_vs_encoder",
          "p5_rss_4n_vs_n")
SECTIONS = ("p1", "p2", "p3", "p4", "p5", "end_to_end", "noise", "workload", "sizes")
# Figures that may legitimately be zero or absent: measured noise, page-cache residency (0 after eviction,
# None where mincore is unavailable), reader threads (0: read in the loop), and a crossover that never comes.
MAY_BE_ZERO = {"foreign_cpu_pct", "foreign_cpu_pct_per_train_round", "spread_pct", "resident_pct",
               "resident_pct_after_evict", "readers", "loader_threads"}
MAY_BE_NONE = {"crossover_epochs", "resident_pct", "resident_pct_after_evict"}


def numbers(tree, path=()):
    """(path, value) for every number and None in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, path + (k,))
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v, path)
    elif tree is None or (isinstance(tree, (int, float)) and not isinstance(tree, bool)):
        yield path, tree


def test_smoke_bench_writes_every_figure_positive(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--work", str(tmp_path / "work"),
                        "--out", str(tmp_path / "results")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [out] = list((tmp_path / "results").glob("*.json"))
    assert not list((tmp_path / "results").glob("*.tmp"))
    assert "P1 cached vs live" in r.stdout and str(out) in r.stdout  # the table was printed
    res = json.loads(out.read_text())
    assert set(res["workloads"]) == {"demo", "b16"}
    for name, w in res["workloads"].items():
        for key in RATIOS + SECTIONS:
            assert key in w, f"{name}: {key} missing"
        for k in ("cached_samples_s", "live_samples_s", "live_per_image_samples_s"):
            assert w["p1"][k]["median"] > 0
        for k in ("loader_rows_s", "loader_mb_s", "raw_rows_s", "raw_mb_s"):
            assert k in w["p3"]["warm"] and k in w["p3"]["reopened"]
        for k in ("embed_s", "cached_epoch_s", "live_epoch_s", "embed_plus_1_epoch_s", "live_1_epoch_s",
                  "crossover_epochs"):
            assert k in w["end_to_end"]
    for path, v in numbers(res):
        where = "/".join(map(str, path))
        if v is None:
            assert path[-1] in MAY_BE_NONE, f"{where} is null"
        elif set(path) & MAY_BE_ZERO:
            assert v >= 0 and math.isfinite(v), f"{where} = {v}"
        else:
            assert v > 0 and math.isfinite(v), f"{where} = {v}"
