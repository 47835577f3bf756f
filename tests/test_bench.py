"""bench/run.py end to end at smoke size: it runs and writes every figure; make gpu-check's CPU-side parts.
No timing is asserted."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402

RATIOS = ("p1_cached_vs_live", "p1_cached_vs_live_per_image", "p2_cached_vs_ram", "p3_read_vs_raw",
          "p3_read_vs_raw_reopened", "p3_rows_vs_raw", "p3_pread_path_vs_raw_reopened", "p4_embed_vs_encoder",
          "p4_parquet_embed_vs_encoder", "p4_tar_embed_vs_encoder", "p4_tiles_embed_vs_encoder",
          "tar_vs_folder_read_decode", "p5_rss_4n_vs_n")
SECTIONS = ("p1", "p2", "p3", "p4", "p4_tiles", "p5", "end_to_end", "noise", "workload", "sizes")
# Figures that may legitimately be zero or absent: measured noise, page-cache residency (0 after eviction,
# None where mincore is unavailable), reader threads (0: read in the loop), P4-remote's rounds (0: not at smoke
# size), and a crossover that never comes.
MAY_BE_ZERO = {"foreign_cpu_pct", "foreign_cpu_pct_per_train_round", "foreign_cpu_pct_per_round", "spread_pct",
               "resident_pct", "resident_pct_after_evict", "readers", "loader_threads", "remote_rounds",
               "packed_batches"}
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


@pytest.mark.slow
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
    b16 = res["workloads"]["b16"]  # stage 1's peak memory on Parquet files of N and 4N images
    assert b16["p5_embed_rss_4n_vs_n"] > 0 and b16["p5_embed"]["4n"]["file_mb"] > b16["p5_embed"]["n"]["file_mb"]
    for path, v in numbers(res):
        where = "/".join(map(str, path))
        if v is None:
            assert path[-1] in MAY_BE_NONE, f"{where} is null"
        elif set(path) & MAY_BE_ZERO:
            assert v >= 0 and math.isfinite(v), f"{where} = {v}"
        else:
            assert v > 0 and math.isfinite(v), f"{where} = {v}"
    # bench/report.py renders every figure of this format: at smoke size only P4-remote and P9 (no S3 rounds) and MFU
    # (CUDA only) are absent
    page = report.render(out, res)
    assert "Not in this file: P4-remote tars: S3 ÷ local; P4-remote Parquet: S3 ÷ local; P9 mirror: a URL cache " \
           "copied from S3; MFU (bf16)." in page


def test_gpu_tier_on_a_cpu_machine_is_all_skipped_needing_cuda():
    n = (REPO / "tests" / "test_gpu.py").read_text().count("\ndef test_")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                        str(REPO / "tests")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count(": needs CUDA") == n and f"{n} skipped" in r.stdout and "error" not in r.stdout.lower()


def test_make_gpu_check_runs_the_gpu_tier_then_the_cuda_bench_which_refuses_without_cuda():
    r = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    commands = [ln for ln in r.stdout.splitlines() if "pytest" in ln or "bench/run.py" in ln]
    assert r.returncode == 0 and "-m gpu" in commands[0] and commands[-1].endswith("bench/run.py --cuda")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--cuda"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_cuda_bench_mode_writes_p1_to_p4_tokens_and_mfu_for_b16(tmp_path):
    """The CUDA bench's code path at smoke size on CPU (where MFU has no peak to divide by)."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--cuda", "--smoke", "--work",
                        str(tmp_path / "work"), "--out", str(tmp_path / "results")], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [out] = list((tmp_path / "results").glob("*-cuda-smoke.json"))
    res = json.loads(out.read_text())
    assert set(res["workloads"]) == {"b16"} and res["mode"] == "smoke-cuda"
    w = res["workloads"]["b16"]
    for key in ("p1_cached_vs_live", "p2_cached_vs_ram", "p3_read_vs_raw", "p4_embed_vs_encoder", "mfu"):
        assert key in w, key
    assert "p5" not in w and "p5_embed" not in w  # peak memory is the CPU bench's figure
    assert w["p1"]["cached_samples_s"]["median"] > 0 and w["p1"]["cached_tokens_s"] > 0
    assert w["mfu"]["train_gflop_per_sample"] > 0 and w["mfu"]["peak_bf16_tflops"] is None
