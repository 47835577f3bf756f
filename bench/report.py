"""Write docs/performance.md and the README's headline figure from the newest bench results.

    python bench/report.py             # make bench runs it after bench/run.py

Why: numbers copied into prose by hand go stale (the README once showed two "latest" runs disagreeing). Every
benchmark figure the docs show is rendered here, from one file: the newest `bench/results/*.json` by the `date`
inside it, smoke runs excluded. tests/test_docs.py fails when the committed page or the README block differs
from what this script writes.

The page renders the format bench/run.py writes today (`measure`, `table`); a file an older bench wrote lacks
some figures, and the page then lists them as missing rather than failing. Nothing here imports torch: the
script runs in a second.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from minivlm.fileio import atomic_write_text  # noqa: E402

RESULTS = HERE / "results"
PAGE = REPO / "docs" / "performance.md"
README = REPO / "README.md"
WORDS = {"b16": "on ViT-B/16-shaped rows with the MiniMind2 LM", "demo": "on the demo"}  # the headline's workload
HEADLINE = ("<!-- bench:headline -->", "<!-- /bench -->")  # the README's generated block lies between these
MISSING = "—"


def newest(results: Path = RESULTS) -> Path:
    """The newest non-smoke results file by the `date` it records (file names carry only the day)."""
    runs = []
    for path in sorted(results.glob("*.json")):
        res = json.loads(path.read_text(encoding="utf-8"))
        # smoke, smoke-cuda: plumbing checks, not figures; no workload: a P6/P8-only run (bench/run.py --workloads none)
        if "smoke" not in res.get("mode", "").split("-") and res.get("workloads"):
            runs.append((res["date"], path.name, path))
    if not runs:
        raise FileNotFoundError(f"{results} has no bench results (non-smoke *.json); run `make bench` first")
    return max(runs)[2]


# ---- figures ----------------------------------------------------------------------------------------------
# Each row of the page's table: a label and a function of one workload's results to the cell's text. A function
# that meets a key the file lacks raises KeyError: the cell shows MISSING, and a row no workload has is listed
# as missing from the file.

def x(v: float) -> str:
    return f"{v:.2f}×"


def r2(v: float) -> str:
    return f"{v:.2f}"


def med(fig: dict) -> float:
    return fig["median"]


def rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def p3_warm(w: dict) -> str:
    q = w["p3"]["warm"]
    return f"{r2(w['p3_read_vs_raw'])} ({rate(med(q['loader_rows_s']))} ÷ {rate(med(q['raw_rows_s']))} rows/s)"


def p3_check(w: dict) -> str:
    q = w["p3"]["warm"]
    return (f"{q['loader_us_per_row']:.1f} µs a row, of which the {w['p3']['checksum']} check "
            f"{q['check_us_per_row']:.1f} µs ({100 * w['check_share_of_p2']:.2f}% of P2's time)")


def packing(kind: str) -> Callable[[dict], str]:
    def cell(w: dict) -> str:
        q = w["p7"][kind]
        flag = " CONTENDED" if q["contended"] else ""
        return (f"{x(q['packed_vs_padded'])} (padding {100 * q['packed']['pad_frac']:.0f}% vs "
                f"{100 * q['padded']['pad_frac']:.0f}%; {q['images_per_sample']:.1f} images, "
                f"{q['text_tokens_per_sample']:.0f} text tokens a sample; {100 * q['packed_batches']:.0f}% of "
                f"micro-batches pack){flag}")
    return cell


def tiled(w: dict) -> str:
    t = w["tiled"]
    return (f"{r2(t['p2_cached_vs_ram'])} ({t['tiles']}: {t['rows_per_image']:.1f} rows, "
            f"{t['bytes_per_image']:,.0f} bytes an image)")


def codec(w: dict) -> str:
    k = w["codec"]
    return (f"{k['codec']}: {k['bytes_per_row']:,} bytes a row vs {w['p3']['row_mb'] * 1e6:,.0f}; P2 "
            f"{r2(k['p2_cached_vs_ram'])}, P3 warm {r2(k['p3_read_vs_raw'])}, re-opened {r2(k['p3_read_vs_raw_reopened'])}")


def codec_errors(w: dict) -> str:
    errors = w["codec"]["error_vs_float16"]
    return ", ".join(f"{name} {e['relative_rms']['mean']:.4f}" for name, e in errors.items())


def remote(kind: str) -> Callable[[dict], str]:
    def cell(w: dict) -> str:
        q, n = w["p4_remote"], w["p4_remote"][f"{kind}_requests"]
        return (f"{r2(q[kind]['s3_vs_local'])} ({q['latency_s'] * 1e3:.0f} ms a request; {n['HEAD']} HEAD, "
                f"{n['GET']} GET, {n['LIST']} LIST for {n['files']} files)")
    return cell


def mirror_copy(w: dict) -> str:
    q = w["p9_mirror"]
    later = q["later_run_requests"]
    return (f"{q['default_mb_s']['median']:.1f} MB/s with {q['connections']} connections, {q['one_mb_s']['median']:.1f} "
            f"with one ({q['latency_s'] * 1e3:.0f} ms a request; {q['shards']} shards of {q['shard_mb']:.2f} MB; "
            f"{q['gets_per_shard']:.1f} GET a shard; a later run: {later['HEAD']} HEAD, {later['GET']} GET)")


def tiles_embed(w: dict) -> str:
    t = w["p4_tiles"]
    return f"{r2(w['p4_tiles_embed_vs_encoder'])} ({t['policy']}: {t['tiles']} tiles of {t['images']} images)"


def p5_embed(w: dict) -> str:
    q = w["p5_embed"]
    return (f"{r2(w['p5_embed_rss_4n_vs_n'])} ({q['4n']['total_mb']:,.0f} MB for a {q['4n']['file_mb']:,.0f} MB "
            f"file, {q['n']['total_mb']:,.0f} MB for {q['n']['file_mb']:,.0f} MB)")


def end_to_end(w: dict) -> str:
    e = w["end_to_end"]
    return f"{e['embed_plus_1_epoch_s']:,.0f} s vs {e['live_1_epoch_s']:,.0f} s ({e['images']:,} samples)"


def crossover(w: dict) -> str:
    e = w["end_to_end"]["crossover_epochs"]
    return "never" if e is None else f"epoch {pays_from(e)} (E* = {e:.2f})"


def pays_from(crossover_epochs: float) -> int:
    """The first whole epoch by which embedding once has paid for itself."""
    return max(1, -int(-crossover_epochs // 1))


def noise(w: dict) -> str:
    n = w["noise"]
    return (f"{'CONTENDED' if n['contended'] else 'idle'}: other processes {n['foreign_cpu_pct']:.0f}% of the CPU "
            f"(train rounds: {' '.join(f'{v:.0f}%' for v in n['foreign_cpu_pct_per_train_round'])})")


def mfu(w: dict) -> str:
    m = w["mfu"]
    return f"cached {100 * m['cached']:.1f}%, live {100 * m['live']:.1f}%, encoder {100 * m['encoder']:.1f}%"


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("P1 train from cache ÷ live loop (JPEG decode + encoder every step)", lambda w: x(w["p1_cached_vs_live"])),
    ("P1 train from cache ÷ the seed's one-image-at-a-time loop", lambda w: x(w["p1_cached_vs_live_per_image"])),
    ("P1 samples/s from cache, live", lambda w: f"{rate(med(w['p1']['cached_samples_s']))}, "
                                                f"{rate(med(w['p1']['live_samples_s']))}"),
    ("P1 text tokens/s from cache", lambda w: f"{rate(w['p1']['cached_tokens_s'])} "
                                              f"({w['p1']['text_tokens_per_sample']:.0f} a sample)"),
    ("P2 train from cache ÷ all rows in RAM", lambda w: r2(w["p2_cached_vs_ram"])),
    ("P2 on a tiled cache ÷ RAM", tiled),
    ("P3 loader ÷ memmap, warm", p3_warm),
    ("P3 row reads alone ÷ memmap, warm", lambda w: r2(w["p3_rows_vs_raw"])),
    ("P3 loader ÷ memmap, files evicted and re-opened", lambda w: r2(w["p3_read_vs_raw_reopened"])),
    ("P3 the same on the pread path (caches over half the free memory)",
     lambda w: r2(w["p3_pread_path_vs_raw_reopened"])),
    ("P3 per row, warm", p3_check),
    ("codec: the 8-bit cache", codec),
    ("codec: relative RMS error vs float16 rows", codec_errors),
    ("P4 stage 1 ÷ encoder forward alone: image folder", lambda w: r2(w["p4_embed_vs_encoder"])),
    ("P4 the same: MiniMind-V Parquet", lambda w: r2(w["p4_parquet_embed_vs_encoder"])),
    ("P4 the same: img2dataset tars", lambda w: r2(w["p4_tar_embed_vs_encoder"])),
    ("P4 the same: tiles", tiles_embed),
    ("P4 read + decode: tars ÷ folder", lambda w: r2(w["tar_vs_folder_read_decode"])),
    ("P4-remote tars: S3 ÷ local", remote("tar")),
    ("P4-remote Parquet: S3 ÷ local", remote("parquet")),
    ("P9 mirror: a URL cache copied from S3", mirror_copy),
    ("P5 peak memory training, 4N ÷ N images", lambda w: r2(w["p5_rss_4n_vs_n"])),
    ("P5 stage 1 peak memory on Parquet, 4N ÷ N", p5_embed),
    ("P7 packed ÷ padded, text tokens/s: pretraining", packing("pretraining")),
    ("P7 the same: SFT-like (1-3 turns, 1-3 images)", packing("sft")),
    ("end to end: embed once + 1 epoch vs 1 live epoch", end_to_end),
    ("end to end: the cache pays for itself by", crossover),
    ("MFU (bf16)", mfu),
    ("machine load during the run", noise),
]


def cells(fn: Callable[[dict], str], w: dict) -> str | None:
    try:
        return fn(w)
    except KeyError:
        return None


def figures_table(workloads: dict) -> tuple[list[str], list[str]]:
    """(the table's lines, the labels of rows no workload of this file has)."""
    names = list(workloads)
    lines = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    missing = []
    for label, fn in ROWS:
        row = [cells(fn, workloads[n]) for n in names]
        if all(c is None for c in row):
            missing.append(label)
            continue
        lines.append(f"| {label} | " + " | ".join(MISSING if c is None else c for c in row) + " |")
    return lines, missing


def workloads_table(workloads: dict) -> list[str]:
    lines = ["| workload | images | encoder | rows (T × D) | LM | batch |", "| --- | --- | --- | --- | --- | --- |"]
    for name, w in workloads.items():
        d = w["workload"]
        lines.append(f"| {name} | {d['images']} | {d['encoder']} | {d['T']} × {d['D']} | {d['model']} | "
                     f"{w['sizes']['batch']} |")
    return lines


def startup_table(q: dict) -> list[str]:
    lines = [f"Stage 2's start-up on {q['records']:,} records (a 1-step run, `train.max_steps=1`), against the same "
             f"on {q['unique_images']:,} records:", "",
             "| records | run | wall time | peak memory | per million records |", "| --- | --- | --- | --- | --- |"]
    for layout in ("jsonl", "parquet"):
        f = q[layout]
        for run in ("first", "rerun"):
            big, small = f[f"large_{run}"], f[f"small_{run}"]
            lines.append(f"| {layout} | {run} | {big['wall_s']:.1f} s ({small['wall_s']:.1f} s) | "
                         f"{big['peak_mb']:,.0f} MB ({small['peak_mb']:,.0f} MB) | "
                         f"+{f[f'{run}_per_million_s']:.1f} s, +{f[f'{run}_per_million_mb']:,.0f} MB |")
    return lines


def contention(results: dict) -> str:
    parts = [f"{n} {'CONTENDED' if w['noise']['contended'] else 'idle'} ({w['noise']['foreign_cpu_pct']:.0f}% of the "
             f"CPU used by other processes)" for n, w in results["workloads"].items() if "noise" in w]
    return "; ".join(parts) or "not recorded"


def source_line(path: Path, results: dict) -> str:
    m = results["machine"]
    where = m.get("gpu") or f"device {m['device']}"
    return (f"`bench/results/{path.name}` ({results['mode']} run of {results['date']}) on `{m['host']}`: {m['cpu']}, "
            f"{m['cores_usable']} of {m['cores']} cores, {where}, torch {m['torch']}, Python {m['python']}, "
            f"h5py {m['h5py']} (HDF5 {m['hdf5']}). Load: {contention(results)}.")


ABOUT = """\
`make bench` (`python bench/run.py`) measures the cached pipeline against its baselines in one process run and
writes `bench/results/<host>-<date>.json`; `make bench-quick` runs fewer steps and rounds, `make gpu-check` the
quick CUDA mode. Each figure is the median over timed windows after untimed warm-up steps, the variants
interleaved round by round, so a ratio compares two things measured side by side. The bench records how much CPU
other processes took while it ran and flags a run CONTENDED above 10%: rerun those on a quiet machine.
`bench/run.py`'s docstring defines every figure; `python bench/report.py` (run by `make bench`) writes this page."""

MEANING = """\
## Reading the figures

- **P1** is the reason minivlm exists: training from the cache against a loop that decodes JPEGs and runs the
  vision tower at every step (batched, and as the seed did it, one image at a time). On a CPU the tower costs about
  as much as the LM step, so the cached loop gains most where the tower is large next to the LM.
- **P2** asks whether reading the cache costs anything: the same loop with every row already in a RAM tensor. A
  ratio near 1 means training runs at the speed of training from memory.
- **P3** is the loader alone against a NumPy memmap of the same bytes read in the same order: warm (in the page
  cache), and after evicting the files. Rows are read as raw bytes at their offsets, copied out of a read-only
  mapping when the cache fits in half the free memory and with one `pread` a row otherwise (the pread path), and
  each row is checked against its checksum in the reader threads. The per-row line shows what that check costs.
- **codec** is the same run on an 8-bit cache (`cache.dtype`): half the bytes a row, and each codec's error
  against float16 rows on the bench tower's output (random weights: a real tower's activations need
  `stages/embed.py --compare`, see [the cache](cache.md#codecs-smaller-rows)).
- **P4** is stage 1 against the tower's forward alone on pre-decoded images: near 1, decoding and writing hide
  behind the tower; far below 1 (the demo's tiny tower), the tower is not what limits stage 1. **P4-remote** reads
  the same inputs from an S3 server behind a proxy that adds latency to every request, and counts the requests.
  **P9** copies the demo cache from that store into a fresh mirror (a URL `cache.dir`, [the cache](cache.md#several-machines-a-shared-filesystem-or-a-url-and-a-mirror)),
  with one connection and with the default number, and counts the GETs a shard and a later run's requests.
- **P5** is peak memory for a 4× larger cache (or Parquet file) over a smaller one: near 1, memory does not grow
  with the data. **P6** is stage 2's start-up: the first run reads, joins and tokenizes the records; the rerun
  loads the arrays it kept. **P7** is packing (`train.packing`) against padded batches of the same samples. A
  micro-batch whose samples cannot share a row runs as a padded batch, so where none packs (captions of alike
  lengths) both sides do the same work on the model; what remains is the host's packing pass (~0.1 ms a
  micro-batch) and the bench's noise.
- **end to end** projects embed-once-then-train against the live loop from the rates above: the epoch from which
  the cache has paid for itself, for one run; every further run of a sweep gains the whole P1 ratio.

The b16 rows are synthetic but have the real shape and format; its ViT-B/16 has random weights and does the real
compute.

On a GPU, `make gpu-check` runs the CUDA test tier (`pytest -m gpu`: bf16 steps with fused AdamW and pinned batches
that never sync with the host between log steps, exact resume on CUDA, `torch.compile` on and off, DDP over NCCL
with one rank, stage 1 on CUDA against CPU within fp16 tolerance), then the bench in quick CUDA mode on the b16
workload: P1-P4 with the GPU batch sizes, samples/s, text tokens/s and MFU (against the device's assumed peak bf16
FLOP/s), written to `bench/results/<host>-<date>-cuda.json`; this script renders such a file too."""


def render(path: Path, results: dict) -> str:
    """docs/performance.md for one results file."""
    workloads = results["workloads"]
    figures, missing = figures_table(workloads)
    lines = ["# Performance", "",
             "<!-- Written by `python bench/report.py` from the newest bench/results file: edit the script, not this "
             "page. -->", "", ABOUT, "", "## The run shown", "", source_line(path, results), "",
             *workloads_table(workloads), "", "## Figures", "", *figures, ""]
    if missing:
        lines += [f"Not in this file: {'; '.join(missing)}. (An older bench did not measure them, or this run's mode "
                  f"or workloads skip them: see `bench/run.py`.)", ""]
    if "startup" in results:
        lines += ["## Stage 2 start-up (P6)", "", *startup_table(results["startup"]), ""]
    else:
        lines += ["P6 (stage 2's start-up) is not in this file.", ""]
    if "search" in results:
        lines += ["## Search pruning (P8)", "", *search_table(results["search"]), ""]
    return "\n".join([*lines, MEANING, ""])


def search_table(q: dict) -> list[str]:
    lines = [f"One search of the demo ({q['trials']} trials of at most {q['max_steps']} steps, one enqueued baseline, "
             f"the random sampler with one seed) with `pruner = \"asha\"` against the same trials with "
             f"`pruner = \"none\"`:", "", "| pruner | steps trained | wall time | best eval loss | pruned |",
             "| --- | --- | --- | --- | --- |"]
    for name in ("asha", "none"):
        f = q[name]
        lines.append(f"| {name} | {f['steps']:,} | {f['wall_s']:.0f} s | {f['best_eval_loss']:.4f} | {f['pruned']} |")
    return lines + ["", f"asha / none: {q['steps_ratio']:.2f} of the steps, {q['wall_ratio']:.2f} of the wall time, "
                        f"best eval loss x{q['best_loss_ratio']:.4f} (target: at most half the steps, within 2%)."]


def headline(path: Path, results: dict) -> str:
    """The README's block: P1 on the real-shaped workload (b16) and the demo, and the crossover epoch."""
    w = results["workloads"]
    name = "b16" if "b16" in w else next(iter(w))
    big, on = w[name], WORDS.get(name, f"on the {name} workload")
    e = big["end_to_end"]["crossover_epochs"]
    pays = "never pays for itself" if e is None else f"has paid for itself by epoch {pays_from(e)}"
    demo = f" ({x(w['demo']['p1_cached_vs_live'])} on the demo)" if "demo" in w and name != "demo" else ""
    m = results["machine"]
    where = m.get("gpu") or f"{m['cores_usable']} {m['cpu']} CPU cores"
    return (f"Measured on {where} (`bench/results/{path.name}`, {results['date'][:10]}): training from the cache "
            f"runs **{x(big['p1_cached_vs_live'])}** the samples/s of the live loop {on}{demo}, and embedding once "
            f"{pays} within a single run. Every figure, and how it is measured: "
            f"[docs/performance.md](docs/performance.md).")


def with_headline(readme: str, block: str) -> str:
    """README text with the block between the HEADLINE markers replaced by `block`."""
    start, end = HEADLINE
    if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
        raise ValueError(f"README.md needs one {start} ... {end} block for the bench headline")
    head, rest = readme.split(start)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


def expected(results_dir: Path = RESULTS, readme: str | None = None) -> tuple[Path, str, str]:
    """(the results file, the page, the README) as this script writes them."""
    path = newest(results_dir)
    results = json.loads(path.read_text(encoding="utf-8"))
    readme = README.read_text(encoding="utf-8") if readme is None else readme
    return path, render(path, results), with_headline(readme, headline(path, results))


def main() -> int:
    path, page, readme = expected()
    atomic_write_text(PAGE, page)
    atomic_write_text(README, readme)
    print(f"report: {PAGE.relative_to(REPO)} and the README's headline from bench/results/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
