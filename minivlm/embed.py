"""Stage 1: run the frozen encoder over every unique image once and write the HDF5 cache.

Design choices:
- Work is planned from the records alone (sorted unique keys cut into `cache.shard_size` shards), so a
  rerun, another rank or another node computes the same plan with no coordination. Rank r of a torchrun
  takes shards i with i % world_size == r.
- DataLoader workers decode and preprocess; the main process only runs the encoder and writes. A shard
  is written when its last image is through, then published atomically: a kill loses at most the
  shards in flight, and a rerun skips every published shard.
- A bad image is a failure row (reason kept in its shard), never an exception that stops the run.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from minivlm import __version__, cache, shard
from minivlm.config import RunConfig, RunFailed
from minivlm.dist import Dist
from minivlm.encoder import EncoderSpec, ImageError, features, fingerprint_id, load_encoder, load_image, preprocess
from minivlm.fileio import WriterLock
from minivlm.records import first_record_with, image_keys, load_records, records_hash, resolve_image
from minivlm.stop import Interrupted, ignore_stop_signals, signal_name, stop_requests

OUTSIDE_ROOT = "outside data.image_root (not read)"


class ImageFiles(Dataset):
    """(key, path or None) -> (key, pixels or None, failure reason or None), decoded in a worker."""

    def __init__(self, items: list[tuple[str, Path | None]], processor, max_pixels: int):
        self.items, self.processor, self.max_pixels = items, processor, max_pixels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, path = self.items[i]
        if path is None:
            return key, None, OUTSIDE_ROOT
        try:
            return key, preprocess(self.processor, load_image(path, self.max_pixels)), None
        except ImageError as e:
            return key, None, str(e)
        except Exception as e:  # a processor crash on one odd image must not stop the run
            return key, None, f"preprocessing failed ({type(e).__name__}: {e})"


def _collate(batch):
    return batch


def _check_existing(cache_dir: Path, plan: list[list[str]], spec: EncoderSpec, mine, overwrite: bool) -> set[int]:
    """Published shards of this rank that can be kept. A shard from another encoder spec or a format-1 one is
    refused (or with overwrite, deleted); an unreadable one, or one whose planned images changed, is deleted
    and redone."""
    keep = set()
    n_planned = len(plan)
    existing = sorted(cache.shard_dir(cache_dir).glob("shard-*.h5"))
    for p in existing:
        i = int(p.stem.split("-")[1])
        if not mine(i):
            continue
        try:
            info = shard.read_info(p)
            old, old_plan = json.loads(info.attrs["fingerprint"]), info.attrs["plan"]
        except shard.FormatOne as e:
            if not overwrite:
                raise ValueError(f"{e}; or rerun with --overwrite to re-embed the cache") from None
            old, old_plan = None, None
        except ValueError:
            old, old_plan = None, None
        if old is not None and old == spec.fingerprint and i < n_planned and old_plan == cache.plan_hash(plan[i]):
            keep.add(i)
            continue
        if old is not None and old != spec.fingerprint and not overwrite:
            replace(spec, fingerprint=old).check(spec, "this encoder", f"cache {cache_dir} ({p.name})",
                                               "rerun with --overwrite to replace the cache, or set cache.dir "
                                               "to a new directory")
        if old is not None and old == spec.fingerprint:  # same encoder, other images in this slot: the records changed
            print(f"embed: {p.name} holds other images than the records now plan; re-embedding it", flush=True)
        p.unlink()
    return keep


def run_embed(cfg: RunConfig, dist: Dist, overwrite: bool = False) -> dict | None:
    """Embed every image of data.records and data.val_records into `cfg.cache.dir`. Returns the manifest if this rank wrote it."""
    t0 = time.time()
    files = [f for f in (cfg.data.records, cfg.data.val_records) if f]  # held-out images are cached too
    records = [r for f in files for r in load_records(f)]
    keys = image_keys(records)
    if not keys:
        raise ValueError(f"{cfg.data.records}: no record has an image; nothing to embed")
    rhash = records_hash(*files)
    cache_dir = Path(cfg.cache.dir)
    plan = cache.plan_shards(keys, cfg.cache.shard_size)
    root = Path(cfg.data.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_root {root} is not a directory; point it at the folder the "
                                f"records' image paths are relative to")

    lock = WriterLock(cache_dir, shared=dist.is_distributed, other="another cache.dir")
    try:
        enc = load_encoder(cfg.encoder, dist.device, cfg.cache.dtype)
        spec = EncoderSpec.of_encoder(enc)
        fid = fingerprint_id(spec.fingerprint)
        manifest = cache.read_manifest(cache_dir)
        if manifest and manifest.get("format_version") == 1 and not overwrite:
            raise ValueError(f"cache {cache_dir} is in format 1 (minivlm before 2026-12); {shard.UPGRADE}, or "
                             f"rerun with --overwrite to re-embed it")
        mine = lambda i: i % dist.world_size == dist.rank  # noqa: E731
        if overwrite and dist.is_main:
            (cache_dir / cache.MANIFEST).unlink(missing_ok=True)
        keep = _check_existing(cache_dir, plan, spec, mine, overwrite)
        if manifest and manifest.get("fingerprint_id") == fid and len(keep) == sum(map(mine, range(len(plan)))) \
                and manifest.get("records_hash") == rhash and not overwrite:
            if dist.is_main:
                print(f"embed: cache {cache_dir} is complete ({manifest['counts']['embedded']} images embedded, "
                      f"{len(plan)} shards); nothing to do", flush=True)
            return manifest
        todo = [i for i in range(len(plan)) if mine(i) and i not in keep]
        cache.shard_dir(cache_dir).mkdir(parents=True, exist_ok=True)
        cache.remove_stale_temps(cache_dir, todo)

        items = [(k, resolve_image(root, k)) for i in todo for k in plan[i]]
        outside = [k for k, p in items if p is None]
        for k in outside[:5]:
            print(f"warning: {first_record_with(records, k).where}: image {k!r} resolves outside "
                  f"data.image_root ({root}); recorded as failed, not read", flush=True)
        if len(outside) > 5:
            print(f"warning: {len(outside) - 5} more image paths outside data.image_root", flush=True)

        # A stop signal ends the run between batches: every shard is published whole or not at all.
        with stop_requests("embed: stopped at once by a second signal; the published shards are kept; rerun the "
                           "same command to resume") as stop:
            n_failed = _embed_shards(enc, cfg, dist, cache_dir, plan, todo, items, fid, len(keys), stop)
        info = {"encoder": spec.as_json(), "fingerprint_id": fid, "records": files, "records_hash": rhash,
                "shard_size": cfg.cache.shard_size, "tool_version": __version__}
        manifest = cache.finalize(cache_dir, [len(keys) for keys in plan], info)
    finally:
        lock.release()

    dt = time.time() - t0
    if manifest is None:
        print(f"embed rank {dist.rank}: {len(todo)} shard(s) written, {n_failed} failed images, {dt:.1f} s; "
              f"the last rank to finish writes the manifest", flush=True)
        return None
    c = manifest["counts"]
    gb = sum((cache.shard_dir(cache_dir) / s["file"]).stat().st_size for s in manifest["shards"]) / 1e9
    print(f"embed: {c['images']} images, {c['embedded']} embedded, {c['failed']} failed, "
          f"{len(manifest['shards'])} shards, {gb:.3f} GB, {dt:.1f} s "
          f"({len(items) / max(dt, 1e-9):.0f} img/s this run) -> {cache_dir}", flush=True)
    if c["failed"] > cfg.cache.max_failure_frac * c["images"]:
        raise RunFailed(
            f"{c['failed']} of {c['images']} images failed ({c['failed'] / c['images']:.1%} > "
            f"cache.max_failure_frac={cfg.cache.max_failure_frac:.1%}); see {cache_dir / cache.FAILURES}; "
            f"fix the images and rerun with --overwrite, or raise cache.max_failure_frac")
    return manifest


def _embed_shards(enc, cfg: RunConfig, dist: Dist, cache_dir: Path, plan, todo, items, fid: str,
                  n_total: int, stop: stop_requests) -> int:
    """Encode `items` (the images of shards `todo`, in order) and publish each shard as it completes, until
    the end or a stop request (checked between batches; the shard in flight is dropped)."""
    loader = DataLoader(ImageFiles(items, enc.processor, cfg.encoder.max_image_pixels),
                        batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers,
                        collate_fn=_collate, pin_memory=enc.device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if cfg.encoder.num_workers else None,
                        worker_init_fn=ignore_stop_signals)
    codec = shard.Codec(cfg.cache.dtype, enc.tokens, enc.width)
    meta = dict(fingerprint=json.dumps(enc.fingerprint, sort_keys=True), fingerprint_id=fid)
    shard_iter = iter(todo)
    current = next(shard_iter, None)
    rows: list[np.ndarray] = []
    keys: list[str] = []
    failures: list[tuple[str, str]] = []
    done_in_shard = n_failed = 0
    bar = tqdm(total=len(items), unit="img", desc=f"embed{f' rank {dist.rank}' if dist.is_distributed else ''}",
               disable=None, mininterval=1.0)
    for batch in loader:
        if stop.requested:
            break  # leaving the loop shuts the DataLoader's workers down
        good = [(k, px) for k, px, _ in batch if px is not None]
        stored = codec.encode(features(enc, torch.stack([px for _, px in good]))).cpu().numpy() if good else None
        fi = 0
        for key, px, reason in batch:
            if px is None:
                failures.append((key, reason))
                n_failed += 1
            else:
                rows.append(stored[fi])  # (row_bytes,) uint8
                keys.append(key)
                fi += 1
            done_in_shard += 1
            if done_in_shard == len(plan[current]):
                emb = np.stack(rows) if rows else np.zeros((0, codec.row_bytes), np.uint8)  # (n, row_bytes)
                shard.write_shard(cache.shard_path(cache_dir, current), emb, codec, keys, shard_index=current,
                                  plan=cache.plan_hash(plan[current]), failures=failures, **meta)
                rows, keys, failures, done_in_shard = [], [], [], 0
                current = next(shard_iter, None)
        bar.update(len(batch))
        if n_failed > cfg.cache.max_failure_frac * n_total:
            bar.close()
            raise RunFailed(f"{n_failed} images failed already (> cache.max_failure_frac="
                               f"{cfg.cache.max_failure_frac:.1%} of {n_total}); stopping. Shards written so far "
                               f"are kept. Check data.image_root={cfg.data.image_root} and the images")
    bar.close()
    if stop.requested:
        who = f"embed{f' rank {dist.rank}' if dist.is_distributed else ''}"
        raise Interrupted(stop.signum, f"{who}: stopped by {signal_name(stop.signum)}; the shards published so far "
                                       f"are kept, the one in flight was dropped; rerun the same command to resume")
    assert current is None, "every planned shard must have been written"
    return n_failed

