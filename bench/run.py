"""minivlm benchmarks: the cached pipeline against the seed's live loop and against the limits.

    python bench/run.py                # make bench: full (~6 min on 2 idle CPU cores once artefacts exist, + P8)
    python bench/run.py --workloads none --startup 0   # P8 alone (two searches of the demo, ~10-25 min)
    python bench/run.py --quick        # make bench-quick (~1.5 min once artefacts exist)
    python bench/run.py --smoke --work /tmp/w --out /tmp/r   # tiny sizes, for the test (~30 s)
    python bench/run.py --cuda         # make gpu-check: quick CUDA mode, b16, P1-P4 + tokens/s + MFU

The first run builds the artefacts (~1 min: 4,000 JPEGs, a ViT-B/16-shaped encoder, 1.5 GB of caches).
    python bench/run.py --workloads b16 --steps 6 --repeats 5

Prints a table and writes bench/results/<host>-<date>[-quick|-smoke].json. Every ratio is measured
against its baseline in this same process run; each figure is the median over `repeats` timed windows
after untimed warm-up steps; the train-loop variants are interleaved round by round, and the CPU time
other processes took is recorded, because a shared machine is the largest source of noise. Artefacts
(images, encoders, caches) live in --work (bench/work/) and are reused by later runs. Nothing here
asserts a time.

Figures per workload (demo, b16):
  P1 cached vs live      train samples/s from the cache / a seed-style loop (JPEG decode in workers + encoder
                         forward every step, batched), and / the seed's literal one-image-at-a-time encoder loop
  P2 cached vs RAM       / the same loop with every row already in a RAM tensor and every sample pre-tokenized
  P3 read vs raw         stage-2 Loader alone (no model), rows/s and MB/s / a NumPy memmap of the same
                         bytes read in the same order; warm, and re-opened after evicting the files; with a
                         breakdown: the row reads alone (p3_rows_vs_raw), the same without the per-row
                         checksum, the checksum check alone over rows already read (check_us_per_row, by
                         the cache's algorithm: `checksum`; and as a share of P2's training time), the text
                         collation alone, raw pread, h5py read_direct, and a DataLoader with worker
                         processes returning empty batches (the process boundary stage 2 no longer
                         crosses). Both workloads' caches fit in memory, so the library maps them; the pread
                         path that bigger caches take is measured too (p3_pread_path_vs_raw_reopened)
  codec                  the same run on a cache stored with the 8-bit codec (workloads.CODEC8): its bytes per
                         row, P2 and P3; and every codec's reconstruction error against float16 rows on the
                         encoder's real output for the P4 images (what `stages/embed.py --compare` reports)
  P4 embed vs encoder    run_embed images/s / the encoder forward alone on pre-decoded tensors, same batch size;
                         from the image folder, and from the same images in a MiniMind-V Parquet file (every
                         image in two rows) and in img2dataset tars (a brace pattern); a fresh cache, so the
                         Parquet and tar figures include hashing the images. Also read+decode images/s
                         (no encoder): from the tars (index pass + reads by offset) / from the folder.
                         Tiles: run_embed tiles/s with encoder.tiles = anyres (workloads.TILES) / the encoder
                         alone over the same tiles pre-cut, same batch size, on a fifth of those images
  P4-remote              demo only: stage 1 images/s on the P4 images in tars of 1,000 samples (as the demo's
                         builder writes them), and in P4's Parquet file, read from S3 / from the local files, 2
                         workers, each run a new process (peak_rss.py --embed), local and S3 interleaved. The
                         store is moto's S3 server on loopback behind a proxy adding 30 ms to every request
                         (tests/store.py), as a store across a network answers; with the requests it received
                         per method (a HEAD an image would show here, and cap stage 1 at ~15 img/s)
  P9 mirror              demo only, with P4-remote: the demo cache copied from the same store (30 ms a request) into a
                         fresh mirror (minivlm.embedding.mirror), MB/s with one connection and with the default
                         number; the requests of a copy (GETs per shard) and of a later run on the complete copy
  P7 packing             real text tokens/s training on packed batches (train.packing) / padded batches of the
                         same samples, with each one's share of positions that are padding and the share of
                         micro-batches that pack at all (the rest run as padded batches): on the workload's
                         pretraining records (demo; b16: LLaVA-558K-like captions) and, on the demo cache, an
                         SFT-like set (workloads.sft_records: 1-3 turns, 100-700 words, 1-3 images a sample)
  P5 memory              peak memory training from a cache of N and of 4N images (child processes; see
                         peak_rss.py for why not ru_maxrss); b16 also: stage 1's peak memory on Parquet
                         files of N and 4N photos in one row group (tiny tower, no worker processes)
  end to end             embed once + E epochs vs E epochs of the live loop (projected from the rates above)
Once per bench (bench/startup.py; not in --smoke or --cuda):
  P6 stage-2 start-up    wall time and peak memory of a 1-step training run on 1M records (quick: 100K), LLaVA
                         JSONL and MiniMind-V Parquet: the first run (records read, joined, tokenized, kept)
                         and the rerun (the kept arrays), against the same on the demo's 1,000 records
Once per bench (bench/search.py; not in --smoke or --cuda; alone: --workloads none --startup 0):
  P8 search pruning      one search of the demo with pruner asha / the same trials (random sampler, one seed, the
                         same enqueued baseline) with pruner none: steps trained, wall time, best eval loss found
  tokens/s, MFU          cached samples/s x real text tokens per sample; on CUDA, model FLOPs/s over the
                         device's assumed peak bf16 FLOP/s (minivlm.training.metrics; MINIVLM_PEAK_TFLOPS overrides)

--cuda (make gpu-check) runs the quick sizes with the GPU batch sizes, b16 only, without P5, and writes
bench/results/<host>-<date>-cuda.json; it refuses to run without CUDA (except with --smoke, which
exercises the same path on CPU for the test).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "tests"))  # store.py: P4-remote's S3 store, shared with the tests

import numpy as np  # noqa: E402
import torch  # noqa: E402

import loops  # noqa: E402
import search  # noqa: E402
import startup  # noqa: E402
from minivlm.config import to_toml, to_tree  # noqa: E402
from minivlm.dist import Dist  # noqa: E402
from minivlm.embedding import cache, mirror  # noqa: E402
from minivlm.embedding.embed import run_embed  # noqa: E402
from minivlm.embedding.encoder import load_encoder  # noqa: E402
from minivlm.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from minivlm.formats import remote, sources  # noqa: E402
from minivlm.formats.records import load_records  # noqa: E402
from minivlm.training.metrics import flops_per_token, peak_flops  # noqa: E402
from workloads import BUILDERS, Sizes, Workload, tars_of, with_cache_dir, with_records  # noqa: E402

STARTUP_RECORDS = {"full": 1_000_000, "quick": 100_000, "smoke": 0}  # P6: too slow for the smoke test
SEARCH_TRIALS = {"full": 8, "quick": 8, "smoke": 0}  # P8: two studies of stage-2 subprocesses, minutes
MODES = {  # mode -> workload -> Sizes (CPU); GPU_SIZES replaces some fields on CUDA
    "full": {
        "demo": Sizes(n=1000, batch=32, workers=1, readers=0, enc_batch=64, embed_images=4000, warmup=5, steps=20, live_steps=20,
                      repeats=5, read_rows=8000, cold_rows=4000, rss_steps=5, remote_rounds=2),
        "b16": Sizes(n=1000, batch=8, workers=2, readers=2, enc_batch=16, embed_images=96, warmup=2, steps=4, live_steps=3,
                     repeats=3, read_rows=4000, cold_rows=500, rss_steps=3),  # P3: ~0.15 s windows
    },
    "quick": {
        "demo": Sizes(n=1000, batch=32, workers=1, readers=0, enc_batch=64, embed_images=500, warmup=2, steps=8, live_steps=8,
                      repeats=2, read_rows=2000, cold_rows=1000, rss_steps=2, remote_rounds=1),
        "b16": Sizes(n=1000, batch=8, workers=2, readers=2, enc_batch=16, embed_images=16, warmup=1, steps=1, live_steps=1,
                     repeats=2, read_rows=400, cold_rows=200, rss_steps=1),
    },
    "smoke": {
        "demo": Sizes(n=32, batch=8, workers=1, readers=0, enc_batch=16, embed_images=64, warmup=1, steps=2, live_steps=2,
                      repeats=1, read_rows=64, cold_rows=32, rss_steps=1),
        "b16": Sizes(n=16, batch=4, workers=1, readers=2, enc_batch=8, embed_images=16, warmup=1, steps=2, live_steps=2,
                     repeats=1, read_rows=32, cold_rows=16, rss_steps=1),
    },
}
GPU_SIZES = {"demo": {"workers": 4}, "b16": {"batch": 64, "workers": 8, "readers": 4, "enc_batch": 256, "embed_images": 2048,
                                             "steps": 20, "live_steps": 10, "read_rows": 8000, "cold_rows": 4000}}


CONTENDED_PCT = 10  # other processes' CPU share above which a train round is called contended
REMOTE_LATENCY_S = 0.03  # P4-remote: what the proxy adds to each request (a store's answer across a network)
REMOTE_WORKERS = 2       # P4-remote: encoder.num_workers, local and S3 alike
REMOTE_TAR_SAMPLES = 1000  # P4-remote: samples a tar, as the demo's builder writes them (img2dataset: 10,000)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median, in percent: how noisy a figure's windows were."""
    return 100.0 * (max(xs) - min(xs)) / median(xs) if len(xs) > 1 else 0.0


def figure(rates: list[float]) -> dict:
    return {"median": median(rates), "repeats": rates}


def quiet():
    return contextlib.redirect_stdout(io.StringIO())


def touch(paths) -> None:
    """Read files once so their pages are in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 23):
                pass


# ---- the figures of one workload ----------------------------------------------------------------------

def p4_embed(wl: Workload, enc, pixels: torch.Tensor, device: str, work: Path) -> dict:
    """Rounds of (run_embed into a fresh cache dir, the encoder alone over the same images pre-decoded)."""
    s, root = wl.sizes, work / "p4" / wl.name
    loops.encoder_rate(enc, pixels[:wl.cfg.encoder.batch_size], wl.cfg.encoder.batch_size, device)  # warm-up
    embed_rates, parquet_rates, tar_rates, enc_rates, folder_reads, tar_reads = [], [], [], [], [], []
    for _ in range(s.repeats):
        for cfg, rates in ((wl.embed_cfg, embed_rates), (wl.parquet_embed_cfg, parquet_rates),
                           (wl.tar_embed_cfg, tar_rates)):
            shutil.rmtree(root, ignore_errors=True)  # a fresh cache: Parquet's first embed hashes its images too
            t0 = time.perf_counter()
            with quiet():
                run_embed(with_cache_dir(cfg, root), Dist(device=device))
            rates.append(s.embed_images / (time.perf_counter() - t0))
        enc_rates.append(loops.encoder_rate(enc, pixels, wl.cfg.encoder.batch_size, device))
        folder_reads.append(loops.read_decode_folder(wl.embed_cfg, s.embed_images))
        tar_reads.append(loops.read_decode_tars(wl.tar_embed_cfg))
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    load_encoder(wl.cfg.encoder, device)
    load_s = time.perf_counter() - t0
    return {"embed_img_s": figure(embed_rates), "parquet_embed_img_s": figure(parquet_rates),
            "tar_embed_img_s": figure(tar_rates), "read_decode_folder_img_s": figure(folder_reads),
            "read_decode_tar_img_s": figure(tar_reads),
            "encoder_img_s": figure(enc_rates), "images": s.embed_images,
            "batch_size": wl.cfg.encoder.batch_size, "decode_workers": wl.cfg.encoder.num_workers,
            "encoder_load_s": load_s}


def p4_remote(wl: Workload, device: str, work: Path) -> dict:
    """Rounds of stage 1 on the P4 tars, then on its Parquet file, from the local files and from S3 (interleaved),
    each a new process; per-round S3/local ratios, and the requests the S3 server received in the last round."""
    root = work / "p4-remote" / wl.name
    tar_set = tars_of(Path(wl.embed_cfg.data.records), Path(wl.embed_cfg.data.image_root), work / "p4-remote" /
                      f"{wl.name}-tars-{wl.sizes.embed_images}", REMOTE_TAR_SAMPLES)
    cfgs = {"tar": with_records(wl.embed_cfg, tar_set, num_workers=REMOTE_WORKERS),
            "parquet": with_records(wl.embed_cfg, wl.parquet_embed_cfg.data.records, num_workers=REMOTE_WORKERS)}
    files = [p for cfg in cfgs.values() for p in sources.expand(cfg.data.records)]
    rates = {kind: {"local": [], "s3": []} for kind in cfgs}
    out = {"latency_s": REMOTE_LATENCY_S, "workers": REMOTE_WORKERS, "images": wl.sizes.embed_images}
    with loops.s3_copy(files, REMOTE_LATENCY_S) as (proxy, in_s3):
        for _ in range(wl.sizes.remote_rounds):
            for kind, cfg in cfgs.items():
                for where, c in (("local", cfg), ("s3", in_s3(cfg))):
                    shutil.rmtree(root, ignore_errors=True)  # a fresh cache: the first run's hashing included
                    proxy.reset()
                    run = embed_child(with_cache_dir(c, root / "cache"), root.with_suffix(".toml"), device)
                    rates[kind][where].append(run["samples"] / run["embed_s"])
                out[f"{kind}_requests"] = {"files": len(sources.expand(cfg.data.records)),
                                           **{m: proxy.count(m) for m in ("HEAD", "GET", "LIST")},
                                           "per_file_max": max(proxy.requests.values())}
    shutil.rmtree(root, ignore_errors=True)
    for kind, r in rates.items():
        out[kind] = {"local_img_s": figure(r["local"]), "s3_img_s": figure(r["s3"]),
                     "s3_vs_local": median([b / a for a, b in zip(r["local"], r["s3"])])}
    return out
def p9_mirror(wl: Workload, work: Path) -> dict:
    """Rounds of copying the workload's cache from S3 (REMOTE_LATENCY_S a request) into a fresh mirror, with one
    connection and with mirror.CONNECTIONS (interleaved): MB/s of shard bytes, the requests of a copy per shard,
    and what a later run on the complete copy asks."""
    src = Path(wl.cfg.cache.dir)
    shards = [s["file"] for s in cache.load_manifest(src)["shards"]]
    files = [src / cache.MANIFEST, src / cache.FAILURES, *(cache.shard_dir(src) / name for name in shards)]
    keys = [f"cache/{p.relative_to(src)}" for p in files]
    nbytes = sum(p.stat().st_size for p in files[2:])
    root, rates = work / "p9-mirror" / wl.name, {1: [], mirror.CONNECTIONS: []}
    out = {"latency_s": REMOTE_LATENCY_S, "shards": len(shards), "shard_mb": nbytes / len(shards) / 1e6}
    with loops.s3_copy(files, REMOTE_LATENCY_S, keys) as (proxy, _):
        url = remote.Url.of(f"s3://{loops.S3_BUCKET}/cache", {"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        for _ in range(max(1, wl.sizes.remote_rounds)):
            for n in rates:
                shutil.rmtree(root, ignore_errors=True)
                proxy.reset()
                remote.forget(url.child(cache.MANIFEST))
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    mirror.sync(url, root, n)
                rates[n].append(nbytes / (time.perf_counter() - t) / 1e6)
        out["copy_requests"] = {m: proxy.count(m) for m in ("HEAD", "GET", "LIST")}
        out["gets_per_shard"] = proxy.count("GET", f"{loops.S3_BUCKET}/cache/shards/") / len(shards)
        proxy.reset()
        remote.forget(url.child(cache.MANIFEST))
        mirror.sync(url, root)
        out["later_run_requests"] = {m: proxy.count(m) for m in ("HEAD", "GET", "LIST")}
    shutil.rmtree(root, ignore_errors=True)
    out.update(connections=mirror.CONNECTIONS, one_mb_s=figure(rates[1]),
               default_mb_s=figure(rates[mirror.CONNECTIONS]),
               default_vs_one=median([b / a for a, b in zip(rates[1], rates[mirror.CONNECTIONS])]))
    return out


def p4_tiles(wl: Workload, device: str, work: Path) -> dict:
    """Rounds of (run_embed with tiles into a fresh cache dir, the encoder alone over the same tiles pre-cut)."""
    cfg, root = wl.tiles_embed_cfg, work / "p4-tiles" / wl.name
    enc, batch = load_encoder(cfg.encoder, device), cfg.encoder.batch_size
    images = len(load_records(cfg.data.records))
    pixels = loops.decoded_tiles(cfg, enc, images).to(device)  # (tiles, 3, S, S)
    loops.encoder_rate(enc, pixels[:batch], batch, device)  # warm-up
    embed_rates, enc_rates = [], []
    for _ in range(wl.sizes.repeats):
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        with quiet():
            run_embed(with_cache_dir(cfg, root), Dist(device=device))
        embed_rates.append(len(pixels) / (time.perf_counter() - t0))
        enc_rates.append(loops.encoder_rate(enc, pixels, batch, device))
    shutil.rmtree(root, ignore_errors=True)
    return {"policy": cfg.encoder.tiles, "images": images, "tiles": len(pixels), "batch_size": batch,
            "embed_tiles_s": figure(embed_rates), "encoder_tiles_s": figure(enc_rates)}


def p1_p2_train(wl: Workload, setup: loops.Setup, enc, log, live: bool = True) -> tuple[dict, list[float]]:
    """Rounds of one window per batch source, all on one model: cached, RAM, and with `live` the live loops
    (batched, per image)."""
    s = wl.sizes
    ram = loops.RamBatches(setup.data.train)
    # Model warm-up: on CPU the first steps run 2-5x slower (allocator growth, kernel selection).
    loops.train_window(setup, loops.CachedSource(setup, epoch=s.repeats), 0, max(s.warmup, 3))
    sources = {
        "cached": (lambda r: loops.CachedSource(setup, r), s.steps),
        "ram": (lambda r: loops.RamSource(setup, ram, r), s.steps),
    }
    if live:
        sources.update(live=(lambda r: loops.LiveSource(setup, enc, r, per_image=False), s.live_steps),
                       live_per_image=(lambda r: loops.LiveSource(setup, enc, r, per_image=True), s.live_steps))
    rates, foreign = {k: [] for k in sources}, []
    for r in range(s.repeats):
        meter = loops.CpuMeter()
        for name, (make, steps) in sources.items():
            rates[name].append(loops.train_window(setup, make(r), s.warmup, steps))
        foreign.append(meter.foreign_pct())
        log(f"[{wl.name}]   round {r + 1}/{s.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
            + f" samples/s; other processes used {foreign[-1]:.0f}% of the CPU")
    return rates, foreign


def p3_read(wl: Workload, setup: loops.Setup, device: str, work: Path) -> dict:
    s, ds = wl.sizes, setup.data.train
    cache_dir = Path(wl.cfg.cache.dir)
    raw, offsets = loops.raw_copy(ds, setup.data.manifest, work / "raw" / f"{wl.name}-{cache_dir.name}.npy")
    files = [str(s.path) for s in ds.reader.shards] + [str(raw)]
    row_mb = ds.row_bytes / 1e6
    bs, seed, readers = wl.cfg.train.batch_size, wl.cfg.train.seed, wl.cfg.train.num_workers
    touch(files)
    warm = {k: [] for k in ("raw", "pread", "h5", "rows", "rows_nocheck", "check", "rows_pread", "text", "loader", "ipc")}
    first_batch_s = []
    resident_warm = loops.resident_fraction(files)
    for r in range(s.repeats):
        batches = loops.row_batches(ds, bs, seed, s.read_rows, skip_rows=r * s.read_rows)
        warm["raw"].append(loops.read_raw(raw, offsets, ds, batches))
        warm["pread"].append(loops.read_pread(raw, offsets, ds, batches))
        warm["h5"].append(loops.read_h5(ds, batches))
        warm["rows"].append(loops.read_rows(ds, batches))
        with loops.reading_as(ds, ds.reader.mapped, check=False) as unchecked:
            warm["rows_nocheck"].append(loops.read_rows(unchecked, batches))
        warm["check"].append(loops.check_rows(ds, batches))
        with loops.reading_as(ds, mapped=False) as pread:
            warm["rows_pread"].append(loops.read_rows(pread, batches))
        warm["text"].append(loops.read_text(ds, batches))
        rate, first = loops.read_loader(ds, batches, readers)
        warm["loader"].append(rate)
        first_batch_s.append(first)
        warm["ipc"].append(loops.read_processes(loops.BatchShapes(ds), batches, max(readers, 1), device))
    ds.close()
    cold = {"raw": [], "pread": [], "loader": [], "loader_pread": []}
    resident = []
    for r in range(s.repeats):
        batches = loops.row_batches(ds, bs, seed + 1, s.cold_rows, skip_rows=r * s.cold_rows)
        loops.evict(files)
        resident.append(loops.resident_fraction(files))
        ds.close()  # files re-opened on first read, as a new run opens them
        cold["loader"].append(loops.read_loader(ds, batches, readers)[0])
        ds.close()  # unmapped: an eviction leaves mapped pages in memory
        loops.evict(files)
        with loops.reading_as(ds, mapped=False) as pread:
            cold["loader_pread"].append(loops.read_loader(pread, batches, readers)[0])
        loops.evict(files)
        cold["raw"].append(loops.read_raw(raw, offsets, ds, batches))
        loops.evict(files)
        cold["pread"].append(loops.read_pread(raw, offsets, ds, batches))
    evicted = max(resident) < 0.05 if min(resident) >= 0 else False
    out = {"row_mb": row_mb, "batch_size": bs, "loader_threads": readers, "loader_first_batch_s": median(first_batch_s),
           "checksum": "+".join(sorted({s.checksum for s in ds.reader.shards})),
           "warm": {"rows_per_window": s.read_rows, "resident_pct": 100 * resident_warm if resident_warm >= 0 else None}}
    for k, v in warm.items():
        out["warm"][f"{k}_rows_s"] = figure(v)
        out["warm"][f"{k}_mb_s"] = median(v) * row_mb
        out["warm"][f"{k}_us_per_row"] = 1e6 / median(v)
    out["reopened"] = {"rows_per_window": s.cold_rows,
                       "page_cache": "evicted (posix_fadvise DONTNEED), files re-opened" if evicted
                       else "reopened (page cache warm: eviction had no effect here)",
                       "resident_pct_after_evict": 100 * max(resident) if min(resident) >= 0 else None}
    for k, v in cold.items():
        out["reopened"][f"{k}_rows_s"] = figure(v)
        out["reopened"][f"{k}_mb_s"] = median(v) * row_mb
    return out


def p5_memory(wl: Workload, device: str, work: Path) -> dict:
    out = {}
    for label, cfg in (("n", wl.small_cfg), ("4n", wl.cfg)):
        path = work / "p5" / f"{wl.name}-{label}.toml"
        atomic_write_text(path, to_toml(to_tree(cfg)))
        r = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), str(path), "--steps", str(wl.sizes.rss_steps),
                            "--device", device], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"P5 child for {path} failed:\n{r.stderr[-3000:]}")
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    out["images"] = {"n": wl.sizes.n, "4n": 4 * wl.sizes.n}
    return out


def p5_embed_memory(wl: Workload, device: str, work: Path) -> dict:
    """Stage 1's peak memory on Parquet files of n and 4n images, one row group each (child processes)."""
    out = {}
    for label, cfg in wl.parquet_rss_cfgs.items():
        root = work / "p5" / f"{wl.name}-embed-{label}"
        shutil.rmtree(root, ignore_errors=True)
        out[label] = {**embed_child(with_cache_dir(cfg, root / "cache"), root.with_suffix(".toml"), device),
                      "file_mb": os.path.getsize(cfg.data.records) / 1e6}
        shutil.rmtree(root, ignore_errors=True)
    out["images"] = {"n": wl.sizes.n, "4n": 4 * wl.sizes.n}
    return out


def embed_child(cfg, path: Path, device: str) -> dict:
    """Stage 1 on `cfg` (written to `path`) in a new process, peak_rss.py --embed: its peak memory, the images it
    embedded and run_embed's wall time."""
    atomic_write_text(path, to_toml(to_tree(cfg)))
    r = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), str(path), "--embed", "--device", device],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"stage 1 child for {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def end_to_end(samples: int, embed: dict, cached_sps: float, live_sps: float) -> dict:
    """embed once + E cached epochs vs E live epochs, from the measured rates. The fixed encoder load is in
    both (the live loop loads the encoder too), so it cancels in the crossover."""
    load = embed["encoder_load_s"]
    embed_wall = embed["images"] / embed["embed_img_s"]["median"]
    steady = embed["images"] / max(embed_wall - load, 1e-9)  # images/s once the encoder is loaded
    embed_s = load + samples / steady
    cached_epoch, live_epoch = samples / cached_sps, samples / live_sps
    saved = live_epoch - cached_epoch
    crossover = (samples / steady) / saved if saved > 0 else None
    return {"images": samples, "embed_s": embed_s, "cached_epoch_s": cached_epoch, "live_epoch_s": live_epoch,
            "embed_plus_1_epoch_s": embed_s + cached_epoch, "live_1_epoch_s": load + live_epoch,
            "crossover_epochs": crossover}


def measure(wl: Workload, device: str, work: Path, log, memory: bool = True, flops: bool = False) -> dict:
    """Every figure of one workload; `memory`: P5 too (child processes), `flops`: MFU even off CUDA."""
    s = wl.sizes
    t_start, meter = time.perf_counter(), loops.CpuMeter()
    setup = loops.Setup(wl.cfg, device)
    enc = load_encoder(wl.cfg.encoder, device)
    res = {"workload": wl.info, "sizes": dataclasses.asdict(s), "train_samples": len(setup.data.train)}

    log(f"[{wl.name}] P4 stage 1 vs encoder-only ({s.embed_images} images, {s.repeats} rounds)")
    pixels = loops.decoded_pixels(wl.embed_cfg, enc.processor, s.embed_images).to(device)
    p4 = p4_embed(wl, enc, pixels, device, work)
    p4r = None
    if s.remote_rounds and all(importlib.util.find_spec(m) for m in ("s3fs", "moto")):
        log(f"[{wl.name}] P4-remote stage 1 from S3 ({REMOTE_LATENCY_S * 1e3:.0f} ms a request) vs local, tars and "
            f"Parquet ({s.embed_images} images, {s.remote_rounds} rounds, {REMOTE_WORKERS} workers)")
        p4r = p4_remote(wl, device, work)
    elif s.remote_rounds:
        log(f"[{wl.name}] P4-remote skipped: it needs s3fs and moto[server] (pip install -e '.[dev]')")
    p9 = None
    if p4r is not None:
        log(f"[{wl.name}] P9 mirror: the cache copied from S3 ({REMOTE_LATENCY_S * 1e3:.0f} ms a request), one "
            f"connection and {mirror.CONNECTIONS}")
        p9 = p9_mirror(wl, work)
    log(f"[{wl.name}] P4 tiles: stage 1 vs encoder-only over the same tiles ({wl.tiles_embed_cfg.encoder.tiles})")
    p4t = p4_tiles(wl, device, work)
    log(f"[{wl.name}] P1/P2 train loops: {s.repeats} rounds of cached / RAM / live / live per-image windows "
        f"({s.warmup} + {s.steps} steps, live {s.warmup} + {s.live_steps}; batch {s.batch})")
    rates, round_foreign = p1_p2_train(wl, setup, enc, log)
    log(f"[{wl.name}] P3 read path vs memmap ({s.read_rows} rows warm, {s.cold_rows} re-opened, {s.repeats} rounds)")
    p3 = p3_read(wl, setup, device, work)
    log(f"[{wl.name}] P7 text tokens/s, padded vs packed batches of the same samples ({s.repeats} rounds)")
    p7 = {"pretraining": p7_packing(wl, wl.cfg, device, log)}
    if wl.sft_cfg is not None:
        p7["sft"] = p7_packing(wl, wl.sft_cfg, device, log)
    if wl.tiled_cfg is not None:
        log(f"[{wl.name}] P2 on a cache tiled with encoder.tiles={wl.tiled_cfg.encoder.tiles}")
        tiled = tiled_figures(wl, device, log)
    log(f"[{wl.name}] codec {wl.codec_cfg.cache.dtype}: P2 and P3 on that cache; every codec's error on the "
        f"encoder's output for the P4 images")
    codec = codec_figures(wl, device, work, log, enc, pixels)
    del pixels
    if memory:
        log(f"[{wl.name}] P5 peak memory, caches of {s.n} and {4 * s.n} images")
        p5 = p5_memory(wl, device, work)
    if memory and wl.parquet_rss_cfgs:
        log(f"[{wl.name}] P5 stage 1 peak memory, Parquet files of {s.n} and {4 * s.n} images")
        p5_embed = p5_embed_memory(wl, device, work)
    ds = setup.data.train
    tokens_per_sample = ds.text_tokens(np.arange(len(ds))) / len(ds)

    c, lv, pi, rm = (median(rates[k]) for k in ("cached", "live", "live_per_image", "ram"))
    res.update({
        "p1_cached_vs_live": c / lv,
        "p1_cached_vs_live_per_image": c / pi,
        "p1": {"cached_samples_s": figure(rates["cached"]), "live_samples_s": figure(rates["live"]),
               "live_per_image_samples_s": figure(rates["live_per_image"]),
               "cached_tokens_s": c * tokens_per_sample, "text_tokens_per_sample": tokens_per_sample},
        "p2_cached_vs_ram": c / rm,
        "p2": {"cached_samples_s": figure(rates["cached"]), "ram_samples_s": figure(rates["ram"])},
        "p3_read_vs_raw": p3["warm"]["loader_rows_s"]["median"] / p3["warm"]["raw_rows_s"]["median"],
        "p3_read_vs_raw_reopened": p3["reopened"]["loader_rows_s"]["median"] / p3["reopened"]["raw_rows_s"]["median"],
        "p3_rows_vs_raw": p3["warm"]["rows_rows_s"]["median"] / p3["warm"]["raw_rows_s"]["median"],
        "p3_pread_path_vs_raw_reopened": (p3["reopened"]["loader_pread_rows_s"]["median"]
                                          / p3["reopened"]["raw_rows_s"]["median"]),
        "p3": p3,
        "p4_embed_vs_encoder": p4["embed_img_s"]["median"] / p4["encoder_img_s"]["median"],
        "p4_parquet_embed_vs_encoder": p4["parquet_embed_img_s"]["median"] / p4["encoder_img_s"]["median"],
        "p4_tar_embed_vs_encoder": p4["tar_embed_img_s"]["median"] / p4["encoder_img_s"]["median"],
        "tar_vs_folder_read_decode": p4["read_decode_tar_img_s"]["median"] / p4["read_decode_folder_img_s"]["median"],
        "p4": p4,
        "p7": p7,
        **({"tiled": tiled} if wl.tiled_cfg is not None else {}),
        **({"p4_remote_tar_vs_local": p4r["tar"]["s3_vs_local"],
            "p4_remote_parquet_vs_local": p4r["parquet"]["s3_vs_local"], "p4_remote": p4r} if p4r else {}),
        **({"p9_mirror": p9} if p9 else {}),
        "p4_tiles_embed_vs_encoder": p4t["embed_tiles_s"]["median"] / p4t["encoder_tiles_s"]["median"],
        "p4_tiles": p4t,
        "check_share_of_p2": p3["warm"]["check_us_per_row"] * c * ds.image_rows(np.arange(len(ds))) / len(ds) / 1e6,
        "codec": codec,
        "end_to_end": end_to_end(len(setup.data.train), p4, c, lv),
    })
    if memory:
        res.update(p5_rss_4n_vs_n=p5["4n"]["total_mb"] / p5["n"]["total_mb"], p5=p5)
    if memory and wl.parquet_rss_cfgs:
        res.update(p5_embed_rss_4n_vs_n=p5_embed["4n"]["total_mb"] / p5_embed["n"]["total_mb"], p5_embed=p5_embed)
    if flops or device.startswith("cuda"):
        res["mfu"] = mfu(setup, enc, device, c, lv, p4["encoder_img_s"]["median"])
    setup.close()
    res["noise"] = {"foreign_cpu_pct": meter.foreign_pct(), "foreign_cpu_pct_per_train_round": round_foreign,
                    "contended": median(round_foreign) > CONTENDED_PCT,
                    "spread_pct": {k: spread(v) for k, v in rates.items()}}
    res["wall_s"] = time.perf_counter() - t_start
    return res


def p7_packing(wl: Workload, cfg, device: str, log) -> dict:
    """Real text tokens/s training on padded and on packed batches of the same samples (train.packing off / on:
    one model each, windows interleaved round by round), and the share of computed positions each pads."""
    s = wl.sizes
    setups = {k: loops.Setup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=k == "packed")),
                             device) for k in ("padded", "packed")}
    ds = setups["padded"].data.train
    tokens = ds.text_tokens(np.arange(len(ds))) / len(ds)
    batches = setups["padded"].sampler().batches(0)[:max(s.steps, 1) * s.repeats]
    for setup in setups.values():  # model warm-up, as in P1
        loops.train_window(setup, loops.CachedSource(setup, epoch=s.repeats), 0, max(s.warmup, 3))
    rates, foreign = {k: [] for k in setups}, []
    for r in range(s.repeats):
        meter = loops.CpuMeter()
        for name, setup in setups.items():
            rates[name].append(loops.train_window(setup, loops.CachedSource(setup, r), s.warmup, s.steps) * tokens)
        foreign.append(meter.foreign_pct())
        log(f"[{wl.name}]   P7 round {r + 1}/{s.repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
            + f" text tokens/s; other processes used {foreign[-1]:.0f}% of the CPU")
    out = {"records": cfg.data.records, "samples": len(ds), "text_tokens_per_sample": tokens,
           "images_per_sample": len(ds.split.shard) / len(ds),
           "packed_vs_padded": median(rates["packed"]) / median(rates["padded"]),
           "contended": median(foreign) > CONTENDED_PCT, "foreign_cpu_pct_per_round": foreign}
    for name, setup in setups.items():
        pad, packed = loops.layout_shares(setup.data.train, batches)
        out[name] = {"tokens_s": figure(rates[name]), "pad_frac": pad}
        if name == "packed":
            out["packed_batches"] = packed
        setup.close()
    return out


def tiled_figures(wl: Workload, device: str, log) -> dict:
    """P2 on the cache tiled with workloads.TILES (cached vs all rows in RAM, the same loop), with its rows and
    bytes an image."""
    setup = loops.Setup(wl.tiled_cfg, device)
    rates, _ = p1_p2_train(dataclasses.replace(wl, name=f"{wl.name}-tiled", cfg=wl.tiled_cfg), setup, None, log,
                           live=False)
    ds, manifest = setup.data.train, setup.data.manifest
    files = [Path(wl.tiled_cfg.cache.dir) / "shards" / s["file"] for s in manifest["shards"]]
    out = {"tiles": wl.tiled_cfg.encoder.tiles, "rows_per_image": ds.image_rows(np.arange(len(ds))) / len(ds),
           "bytes_per_image": sum(f.stat().st_size for f in files) / manifest["counts"]["embedded"],
           "p2_cached_vs_ram": median(rates["cached"]) / median(rates["ram"]),
           "p2": {"cached_samples_s": figure(rates["cached"]), "ram_samples_s": figure(rates["ram"])}}
    setup.close()
    return out


def codec_figures(wl: Workload, device: str, work: Path, log, enc, pixels: torch.Tensor) -> dict:
    """The same training run on the cache stored with the 8-bit codec: bytes per row, P2, P3; and every
    codec's reconstruction error on the encoder's output for these images."""
    setup = loops.Setup(wl.codec_cfg, device)
    wl8 = dataclasses.replace(wl, name=f"{wl.name}-{wl.codec_cfg.cache.dtype}", cfg=wl.codec_cfg)
    rates, _ = p1_p2_train(wl8, setup, None, log, live=False)
    p3 = p3_read(wl8, setup, device, work)
    out = {"codec": wl.codec_cfg.cache.dtype, "bytes_per_row": setup.data.train.row_bytes,
           "p2_cached_vs_ram": median(rates["cached"]) / median(rates["ram"]),
           "p2": {"cached_samples_s": figure(rates["cached"]), "ram_samples_s": figure(rates["ram"])},
           "p3_read_vs_raw": p3["warm"]["loader_rows_s"]["median"] / p3["warm"]["raw_rows_s"]["median"],
           "p3_read_vs_raw_reopened": p3["reopened"]["loader_rows_s"]["median"] / p3["reopened"]["raw_rows_s"]["median"],
           "p3": p3, "error_vs_float16": loops.codec_errors(enc, pixels, wl.cfg.encoder.batch_size)}
    setup.close()
    return out


def mfu(setup: loops.Setup, enc, device: str, cached_sps: float, live_sps: float, enc_img_s: float) -> dict:
    """Model FLOPs/s over the assumed peak (None off CUDA or for a device not in minivlm.training.metrics' table)."""
    peak = peak_flops(device)
    model, _, _ = setup.model()
    L = setup.data.train[setup.sampler().batches(0)[0]]["input_ids"].size(1)
    train_f = flops_per_token(model, L) * L
    enc_f = loops.encoder_flops_per_image(enc)
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
           "peak_bf16_tflops": peak / 1e12 if peak else None,
           "train_gflop_per_sample": train_f / 1e9, "encoder_gflop_per_image": enc_f / 1e9}
    if peak:
        out.update(cached=cached_sps * train_f / peak, live=live_sps * (train_f + enc_f) / peak,
                   encoder=enc_img_s * enc_f / peak)
    return out


# ---- output -------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    rows = [("workload", "figure", "measured", "baseline (same run)", "ratio", "noise")]
    for name, r in results["workloads"].items():
        p1, p2, p3, p4, p5, e2e = r["p1"], r["p2"], r["p3"], r["p4"], r.get("p5"), r["end_to_end"]
        p4t = r["p4_tiles"]
        sp = r["noise"]["spread_pct"]
        rows += [
            (name, "P1 cached vs live", f"{p1['cached_samples_s']['median']:.1f} samples/s cached",
             f"{p1['live_samples_s']['median']:.1f} live (batched enc)", f"{r['p1_cached_vs_live']:.2f}x",
             f"±{max(sp['cached'], sp['live']) / 2:.0f}%"),
            (name, "P1 cached vs seed loop", "", f"{p1['live_per_image_samples_s']['median']:.1f} live (per-image enc)",
             f"{r['p1_cached_vs_live_per_image']:.2f}x", f"±{sp['live_per_image'] / 2:.0f}%"),
            (name, "P1 text tokens/s", f"{p1['cached_tokens_s']:,.0f} tokens/s cached",
             f"{p1['text_tokens_per_sample']:.1f} text tokens per sample", "", ""),
            (name, "P2 cached vs RAM", "", f"{p2['ram_samples_s']['median']:.1f} samples/s RAM",
             f"{r['p2_cached_vs_ram']:.2f}", f"±{sp['ram'] / 2:.0f}%"),
        ]
        for label, key, ratio in (("warm", "warm", "p3_read_vs_raw"), ("reopened", "reopened", "p3_read_vs_raw_reopened")):
            q = p3[key]
            rows.append((name, f"P3 read vs raw ({label})",
                         f"{q['loader_rows_s']['median']:,.0f} rows/s {q['loader_mb_s']:,.0f} MB/s",
                         f"{q['raw_rows_s']['median']:,.0f} rows/s {q['raw_mb_s']:,.0f} MB/s memmap",
                         f"{r[ratio]:.2f}", f"±{spread(q['loader_rows_s']['repeats']) / 2:.0f}%"))
        w, c = p3["warm"], p3["reopened"]
        rows.append((name, "  P3 breakdown (warm)", f"rows alone {w['rows_rows_s']['median']:,.0f} rows/s "
                     f"({r['p3_rows_vs_raw']:.2f}); text alone {w['text_rows_s']['median']:,.0f} samples/s",
                     f"pread {w['pread_rows_s']['median']:,.0f} warm, {c['pread_rows_s']['median']:,.0f} "
                     f"re-opened", "", ""))
        rows.append((name, "", f"h5py read_direct {w['h5_rows_s']['median']:,.0f} rows/s",
                     f"worker processes, empty batches {w['ipc_rows_s']['median']:,.0f}", "", ""))
        rows.append((name, "  P3 pread path", f"rows alone {w['rows_pread_rows_s']['median']:,.0f} rows/s warm; "
                     f"loader {c['loader_pread_rows_s']['median']:,.0f} re-opened",
                     "(caches over half the free memory)", f"{r['p3_pread_path_vs_raw_reopened']:.2f}", ""))
        rows.append((name, "  P3 per row (warm)", f"loader {w['loader_us_per_row']:.1f} us, rows alone "
                     f"{w['rows_us_per_row']:.1f} us, {p3['checksum']} check {w['check_us_per_row']:.1f} us",
                     f"check = {100 * r['check_share_of_p2']:.2f}% of P2's training time", "", ""))
        for label, q in r["p7"].items():
            packed = (f"{q['packed']['tokens_s']['median']:,.0f} text tokens/s, {100 * q['packed']['pad_frac']:.0f}% "
                      f"padding, {100 * q['packed_batches']:.0f}% of micro-batches packed")
            padded = (f"{q['padded']['tokens_s']['median']:,.0f} padded, {100 * q['padded']['pad_frac']:.0f}% padding "
                      f"({q['text_tokens_per_sample']:.0f} text tokens, {q['images_per_sample']:.1f} images a sample)")
            rows.append((name, f"P7 packed vs padded ({label})", packed, padded, f"{q['packed_vs_padded']:.2f}x",
                         "CONTENDED" if q["contended"] else ""))
        if "tiled" in r:
            t = r["tiled"]
            rows.append((name, f"P2 tiled ({t['tiles']})", f"{t['p2']['cached_samples_s']['median']:.1f} samples/s "
                         f"cached, {t['rows_per_image']:.1f} rows an image", f"{t['p2']['ram_samples_s']['median']:.1f} "
                         f"RAM; {t['bytes_per_image']:,.0f} bytes an image", f"{t['p2_cached_vs_ram']:.2f}", ""))
        k = r["codec"]
        rows.append((name, f"codec {k['codec']}: P2, P3", f"{k['p2']['cached_samples_s']['median']:.1f} samples/s; "
                     f"{k['p3']['warm']['loader_rows_s']['median']:,.0f} rows/s warm ({k['p3_read_vs_raw']:.2f} of its "
                     f"memmap), re-opened {k['p3_read_vs_raw_reopened']:.2f}",
                     f"{k['bytes_per_row']:,} bytes a row vs {p3['row_mb'] * 1e6:,.0f}", f"{k['p2_cached_vs_ram']:.2f}",
                     ""))
        rows += [(name, f"  {codec} vs float16 rows", f"relative RMS {e['relative_rms']['mean']:.4f} (p99 "
                  f"{e['relative_rms']['p99']:.4f}), cosine {e['cosine']['mean']:.6f}",
                  f"max abs {e['max_abs']['max']:.3g}; {e['bytes_per_row']:,} bytes a row", "", "")
                 for codec, e in k["error_vs_float16"].items()]
        rows += [
            (name, "P4 embed vs encoder", f"{p4['embed_img_s']['median']:.1f} img/s run_embed",
             f"{p4['encoder_img_s']['median']:.1f} img/s encoder alone", f"{r['p4_embed_vs_encoder']:.2f}",
             f"±{spread(p4['embed_img_s']['repeats']) / 2:.0f}%"),
            (name, "P4 embed Parquet vs encoder", f"{p4['parquet_embed_img_s']['median']:.1f} img/s run_embed",
             "(MiniMind-V Parquet, 2 rows an image)", f"{r['p4_parquet_embed_vs_encoder']:.2f}",
             f"±{spread(p4['parquet_embed_img_s']['repeats']) / 2:.0f}%"),
            (name, "P4 embed tars vs encoder", f"{p4['tar_embed_img_s']['median']:.1f} img/s run_embed",
             "(img2dataset tars, brace pattern)", f"{r['p4_tar_embed_vs_encoder']:.2f}",
             f"±{spread(p4['tar_embed_img_s']['repeats']) / 2:.0f}%"),
            (name, "P4 tiles embed vs encoder", f"{p4t['embed_tiles_s']['median']:.1f} tiles/s run_embed",
             f"{p4t['encoder_tiles_s']['median']:.1f} tiles/s encoder alone ({p4t['policy']}: {p4t['tiles']} tiles "
             f"of {p4t['images']} images)", f"{r['p4_tiles_embed_vs_encoder']:.2f}",
             f"±{spread(p4t['embed_tiles_s']['repeats']) / 2:.0f}%"),
            (name, "read+decode tars vs folder", f"{p4['read_decode_tar_img_s']['median']:,.0f} img/s from tars",
             f"{p4['read_decode_folder_img_s']['median']:,.0f} img/s from the folder",
             f"{r['tar_vs_folder_read_decode']:.2f}", f"±{spread(p4['read_decode_tar_img_s']['repeats']) / 2:.0f}%"),
        ]
        q = r.get("p4_remote")
        for kind, label in (("tar", "tars"), ("parquet", "Parquet")) if q else ():
            f, n = q[kind], q[f"{kind}_requests"]
            rows += [(name, f"P4-remote {label} S3 vs local", f"{f['s3_img_s']['median']:.1f} img/s from S3 "
                      f"({q['latency_s'] * 1e3:.0f} ms a request)", f"{f['local_img_s']['median']:.1f} img/s local, "
                      f"{q['workers']} workers", f"{f['s3_vs_local']:.2f}",
                      f"±{spread(f['s3_img_s']['repeats']) / 2:.0f}%"),
                     (name, f"  requests, {label}", f"{n['HEAD']} HEAD, {n['GET']} GET, {n['LIST']} LIST for "
                      f"{n['files']} files", f"at most {n['per_file_max']} of one kind for one file", "", "")]
        if "p9_mirror" in r:
            q = r["p9_mirror"]
            n, later = q["copy_requests"], q["later_run_requests"]
            rows += [(name, "P9 mirror copy from S3", f"{q['default_mb_s']['median']:.1f} MB/s with {q['connections']} "
                      f"connections ({q['latency_s'] * 1e3:.0f} ms a request)", f"{q['one_mb_s']['median']:.1f} MB/s with "
                      f"one; {q['shards']} shards of {q['shard_mb']:.2f} MB", f"{q['default_vs_one']:.2f}x",
                      f"±{spread(q['default_mb_s']['repeats']) / 2:.0f}%"),
                     (name, "  requests, mirror", f"{q['gets_per_shard']:.1f} GET a shard; a copy: {n['HEAD']} HEAD, "
                      f"{n['GET']} GET, {n['LIST']} LIST", f"a later run: {later['HEAD']} HEAD, {later['GET']} GET, "
                      f"{later['LIST']} LIST", "", "")]
        if p5:
            rows.append((name, "P5 peak memory 4N vs N", f"{p5['4n']['total_mb']:,.0f} MB ({p5['images']['4n']} img)",
                         f"{p5['n']['total_mb']:,.0f} MB ({p5['images']['n']} img)", f"{r['p5_rss_4n_vs_n']:.2f}", ""))
        if "p5_embed" in r:
            q = r["p5_embed"]
            rows.append((name, "P5 stage 1 on Parquet, 4N vs N",
                         f"{q['4n']['total_mb']:,.0f} MB ({q['4n']['file_mb']:,.0f} MB file)",
                         f"{q['n']['total_mb']:,.0f} MB ({q['n']['file_mb']:,.0f} MB file)",
                         f"{r['p5_embed_rss_4n_vs_n']:.2f}", ""))
        rows += [
            (name, "end to end, E=1", f"embed+1 epoch {e2e['embed_plus_1_epoch_s']:,.0f} s",
             f"live 1 epoch {e2e['live_1_epoch_s']:,.0f} s ({e2e['images']} samples)",
             f"{e2e['live_1_epoch_s'] / e2e['embed_plus_1_epoch_s']:.2f}x", ""),
            (name, "end to end, crossover", "cache pays off from epoch",
             "" if e2e["crossover_epochs"] is None else f"E* = {e2e['crossover_epochs']:.2f}",
             "never" if e2e["crossover_epochs"] is None else f"E >= {max(1, -(-e2e['crossover_epochs'] // 1)):.0f}", ""),
        ]
        flag = " CONTENDED: rerun on a quiet machine" if r["noise"]["contended"] else ""
        rows.append((name, "noise" + flag, f"other processes: {r['noise']['foreign_cpu_pct']:.0f}% of the CPU",
                     "per train round: " + " ".join(f"{x:.0f}%" for x in r["noise"]["foreign_cpu_pct_per_train_round"]),
                     "", ""))
        if "mfu" in r and "cached" in r["mfu"]:
            m = r["mfu"]
            rows.append((name, "MFU (bf16)", f"cached {100 * m['cached']:.1f}%", f"live {100 * m['live']:.1f}%",
                         f"encoder {100 * m['encoder']:.1f}%", ""))
    if "startup" in results:
        q = results["startup"]
        for layout in ("jsonl", "parquet"):
            f = q[layout]
            rows += [(f"{q['records']:,} {layout}", f"P6 stage-2 start-up {run}",
                      f"{f[f'large_{run}']['wall_s']:.1f} s {f[f'large_{run}']['peak_mb']:,.0f} MB",
                      f"{f[f'small_{run}']['wall_s']:.1f} s {f[f'small_{run}']['peak_mb']:,.0f} MB "
                      f"({q['unique_images']:,} records)", f"+{f[f'{run}_per_million_mb']:,.0f} MB/M",
                      f"+{f[f'{run}_per_million_s']:.1f} s/M") for run in ("first", "rerun")]
    if "search" in results:
        q = results["search"]
        a, n = q["asha"], q["none"]
        rows += [(f"demo, {q['trials']} trials", "P8 search: asha vs none, steps", f"{a['steps']:,} ({a['pruned']} pruned)",
                  f"{n['steps']:,}", f"{q['steps_ratio']:.2f}", ""),
                 (f"demo, {q['trials']} trials", "P8 search: wall time", f"{a['wall_s']:.0f} s", f"{n['wall_s']:.0f} s",
                  f"{q['wall_ratio']:.2f}", ""),
                 (f"demo, {q['trials']} trials", "P8 search: best eval loss", f"{a['best_eval_loss']:.4f}",
                  f"{n['best_eval_loss']:.4f}", f"{q['best_loss_ratio']:.4f}", "")]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine(device: str) -> dict:
    import h5py
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
           "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (make bench-quick)")
    ap.add_argument("--smoke", action="store_true", help="tiny artefacts and 2 steps: checks the plumbing only")
    ap.add_argument("--cuda", action="store_true", help="quick CUDA mode (make gpu-check): b16, P1-P4, tokens/s, MFU")
    ap.add_argument("--workloads", help="comma-separated: demo, b16 (default: both; b16 with --cuda; none: only "
                                        "P6 and P8)")
    ap.add_argument("--search", type=int, help="trials of P8 (search pruning), overriding the mode "
                    f"({', '.join(f'{m}: {n}' for m, n in SEARCH_TRIALS.items())}; 0: skip it)")
    ap.add_argument("--startup", type=int, help="records of P6 (stage-2 start-up), overriding the mode "
                    f"({', '.join(f'{m}: {n or 0:,}' for m, n in STARTUP_RECORDS.items())}; 0: skip it)")
    ap.add_argument("--steps", type=int, help="timed steps per window (train loops), overriding the mode")
    ap.add_argument("--repeats", type=int, help="timed windows per figure, overriding the mode")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="artefacts, reused between runs")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where the results JSON goes")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick or args.cuda else "full"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cuda and device == "cpu" and not args.smoke:
        print("bench --cuda needs a CUDA device and torch sees none here; run make gpu-check on a GPU machine",
              file=sys.stderr)
        return 2
    names = [n.strip() for n in (args.workloads or ("b16" if args.cuda else "demo,b16")).split(",")
             if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {', '.join(BUILDERS)}")

    def log(msg: str) -> None:
        print(f"bench {time.strftime('%H:%M:%S')} {msg}", flush=True)

    t0 = time.perf_counter()
    results = {"mode": mode + ("-cuda" if args.cuda else ""), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(device), "workloads": {}}
    for name in names:
        sizes = MODES[mode][name]
        if device.startswith("cuda") and mode != "smoke":
            sizes = dataclasses.replace(sizes, **GPU_SIZES[name])
        over = {k: v for k, v in (("steps", args.steps), ("live_steps", args.steps), ("repeats", args.repeats)) if v}
        sizes = dataclasses.replace(sizes, **over)
        log(f"[{name}] building artefacts in {args.work} (reused when present)")
        tb = time.perf_counter()
        wl = BUILDERS[name](args.work, sizes, device, smoke=mode == "smoke")
        build_s = time.perf_counter() - tb
        results["workloads"][name] = measure(wl, device, args.work, log, memory=not args.cuda, flops=args.cuda)
        results["workloads"][name]["build_s"] = build_s
    n_startup = STARTUP_RECORDS[mode] if args.startup is None else args.startup
    if n_startup and not args.cuda:
        log(f"[P6] stage-2 start-up on {n_startup:,} records")
        results["startup"] = startup.measure(args.work / "startup", n_startup, log=log)
    n_search = SEARCH_TRIALS[mode] if args.search is None else args.search
    if n_search and not args.cuda:
        log(f"[P8] search pruning: {n_search} trials with asha, then without")
        results["search"] = search.measure(args.work / "search", n_search, log=log)
    results["wall_s"] = time.perf_counter() - t0

    suffix = ("-cuda" if args.cuda else "") + ("" if mode == "full" or (args.cuda and mode == "quick") else f"-{mode}")
    out = args.out / f"{socket.gethostname()}-{datetime.date.today().isoformat()}{suffix}.json"
    atomic_write_json(out, results)
    m = results["machine"]
    print(f"\nminivlm bench ({mode}) on {m['host']}: {m['cpu']}, {m['cores_usable']} cores, torch {m['torch']}, "
          f"{m.get('gpu', 'CPU only')}, {results['wall_s']:.0f} s")
    print(table(results))
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
