"""Stage 1: run the frozen encoder over every unique image once and write the HDF5 cache.

Design choices:
- Work is planned from the records alone (unique keys cut into `cache.shard_size` shards: folder keys
  sorted, keys of images inside files in first-occurrence order, `sources.plan`), so a rerun, another rank
  or another node computes the same plan with no coordination. Rank r of a torchrun takes shards i with
  i % world_size == r.
- DataLoader workers each take whole shards of their rank (the j-th with j % num_workers == worker), read,
  decode, cut into tiles and preprocess them in plan order (`encoder.tile_pixels`, the function captioning
  calls); the main process only runs the encoder and writes. A shard is written when its last image is
  through, then published atomically: a kill loses at most the shards in flight (one per worker), and a rerun
  skips every published shard.
- An image is as many rows as it has tiles (one with `encoder.tiles = none`), consecutive in its shard; the
  tower runs on at most `encoder.batch_size` tiles at once, and progress counts tiles beside images.
- A bad image is a failure row (reason kept in its shard), never an exception that stops the run.
- A URL cache.dir (s3://...) is written in its mirror as a local cache is, each shard uploaded as it is
  published and the manifest last (minivlm.embedding.mirror.Upload); a rerun first copies down what the
  store holds.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from minivlm import __version__
from minivlm.config import RunConfig, RunFailed
from minivlm.dist import Dist
from minivlm.embedding import cache, mirror, shard
from minivlm.embedding.encoder import (
    EncoderSpec,
    ImageError,
    decode_image,
    features,
    fingerprint_id,
    load_encoder,
    load_image,
    tile_pixels,
)
from minivlm.embedding.tiles import Tiling
from minivlm.fileio import WriterLock
from minivlm.formats import remote, sources
from minivlm.formats.records import first_record_with
from minivlm.stop import Interrupted, ignore_stop_signals, signal_name, stop_requests

OUTSIDE_ROOT = "outside data.image_root (not read)"


class ShardImages(IterableDataset):
    """Shards (index, [(key, where)]) -> (shard, key, tiles or None, failure reason or None, source or None) in
    plan order within each shard; tiles: (pixels (n, 3, S, S), layout (rows, cols, height, width)) from
    `tile_pixels`. `where` is
    a folder image's path (None: outside the root) or (source, row) of an image inside a file; `source` names
    that row in a failure. Each DataLoader worker takes whole shards."""

    def __init__(self, shards: list[tuple[int, list]], files: list[sources.Source], processor, tiling: Tiling,
                 max_pixels: int):
        self.shards, self.files, self.processor, self.tiling = shards, files, processor, tiling
        self.max_pixels = max_pixels

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = sources.ImageReader(self.files)
        for j, (index, items) in enumerate(self.shards):
            if j % workers == worker:
                for key, where in items:
                    yield (index, key, *self._pixels(reader, key, where))

    def _pixels(self, reader: sources.ImageReader, key: str, where):
        if where is None:
            return None, OUTSIDE_ROOT, None
        source = None if isinstance(where, (Path, remote.Url)) else sources.describe(self.files, where)
        try:
            image = load_image(where, self.max_pixels) if isinstance(where, Path) else \
                self._fetch(where) if source is None else self._decode(reader, key, where)
            return tile_pixels(self.processor, self.tiling, image), None, source
        except ImageError as e:
            return None, str(e), source
        except Exception as e:  # a processor crash on one odd image must not stop the run
            return None, f"preprocessing failed ({type(e).__name__}: {e})", source

    def _fetch(self, url: remote.Url):
        """A folder image under a URL image root: read (retried), then decoded as a local file is."""
        try:
            return decode_image(url.read_bytes(), self.max_pixels)
        except FileNotFoundError:
            raise ImageError("missing") from None
        except remote.RemoteError as e:
            raise ImageError(str(e)) from None

    def _decode(self, reader: sources.ImageReader, key: str, where):
        try:
            data = reader.read(where)
        except ValueError as e:  # a page that no longer reads (the file changed since it was hashed), or a remote
            # read that failed every retry (remote.RemoteError): this image's failure
            raise ImageError(str(e)) from None
        if hashlib.sha256(data).hexdigest() != key:
            raise ImageError("bytes differ from their stored SHA-256 (the file changed since it was hashed; rerun embed)")
        return decode_image(data, self.max_pixels)


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
    specs = [f for f in (cfg.data.records, cfg.data.val_records) if f]  # held-out images are cached too
    upload = mirror.Upload(cfg) if remote.is_url(cfg.cache.dir) else None  # a URL: written in its mirror, uploaded
    cache_dir = upload.mirror if upload else Path(cfg.cache.dir)
    loaded = sources.load(specs, cfg.data, cache_dir, dist.rank, progress=dist.is_main)
    planned = sources.plan(loaded, sources.image_root(cfg.data))
    if not planned.keys:
        raise ValueError(f"{cfg.data.records}: no record has an image; nothing to embed")
    rhash = sources.sources_hash(loaded.sources)
    size = cfg.cache.shard_size
    plan = sources.cut(planned.keys, size)

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
        if upload and not overwrite:
            upload.pull()
        keep = _check_existing(cache_dir, plan, spec, mine, overwrite)
        if manifest and manifest.get("fingerprint_id") == fid and len(keep) == sum(map(mine, range(len(plan)))) \
                and manifest.get("records_hash") == rhash and not overwrite:
            if dist.is_main:
                print(f"embed: cache {cache_dir} is complete ({manifest['counts']['embedded']} images embedded, "
                      f"{len(plan)} shards); nothing to do", flush=True)
            if upload:
                upload.finish(manifest)
            return manifest
        todo = [i for i in range(len(plan)) if mine(i) and i not in keep]
        cache.shard_dir(cache_dir).mkdir(parents=True, exist_ok=True)
        cache.remove_stale_temps(cache_dir, todo)

        shards = [(i, list(zip(plan[i], planned.where[i * size:(i + 1) * size]))) for i in todo]
        outside = [k for _, items in shards for k, where in items if where is None]
        for k in outside[:5]:
            print(f"warning: {first_record_with(loaded.records, k).where}: image {k!r} resolves outside "
                  f"data.image_root ({cfg.data.image_root}); recorded as failed, not read", flush=True)
        if len(outside) > 5:
            print(f"warning: {len(outside) - 5} more image paths outside data.image_root", flush=True)

        n_items = sum(len(items) for _, items in shards)
        # A stop signal ends the run between batches: every shard is published whole or not at all.
        with stop_requests("embed: stopped at once by a second signal; the published shards are kept; rerun the "
                           "same command to resume") as stop:
            n_failed = _embed_shards(enc, cfg, dist, cache_dir, plan, shards, loaded.sources, fid, len(planned.keys),
                                     stop, upload.shard if upload else None)
        info = {"encoder": spec.as_json(), "fingerprint_id": fid, "records": specs, "records_hash": rhash,
                **sources.manifest_info(loaded), "shard_size": cfg.cache.shard_size, "tool_version": __version__}
        manifest = cache.finalize(cache_dir, [len(keys) for keys in plan], info)
        if upload:
            upload.finish(manifest)
    finally:
        if upload:
            upload.close()
        lock.release()

    dt = time.time() - t0
    if manifest is None:
        print(f"embed rank {dist.rank}: {len(todo)} shard(s) written, {n_failed} failed images, {dt:.1f} s; "
              f"the last rank to finish writes the manifest", flush=True)
        return None
    c = manifest["counts"]
    gb = sum((cache.shard_dir(cache_dir) / s["file"]).stat().st_size for s in manifest["shards"]) / 1e9
    tiles = f" as {c['tiles']} tiles" if "tiles" in c else ""
    print(f"embed: {c['images']} images, {c['embedded']} embedded{tiles}, {c['failed']} failed, "
          f"{len(manifest['shards'])} shards, {gb:.3f} GB, {dt:.1f} s "
          f"({n_items / max(dt, 1e-9):.0f} img/s this run) -> {cfg.cache.dir}", flush=True)
    if c["failed"] > cfg.cache.max_failure_frac * c["images"]:
        raise RunFailed(
            f"{c['failed']} of {c['images']} images failed ({c['failed'] / c['images']:.1%} > "
            f"cache.max_failure_frac={cfg.cache.max_failure_frac:.1%}); see {cache_dir / cache.FAILURES}; "
            f"fix the images and rerun with --overwrite, or raise cache.max_failure_frac")
    return manifest


def _embed_shards(enc, cfg: RunConfig, dist: Dist, cache_dir: Path, plan, shards, files, fid: str, n_total: int,
                  stop: stop_requests, published=None) -> int:
    """Encode the images of `shards` ((index, [(key, where)]) of this rank) and publish each shard as it
    completes (then `published(path)`: its upload), until the end or a stop request (checked between batches;
    the shards in flight are dropped)."""
    loader = DataLoader(ShardImages(shards, files, enc.processor, enc.tiling, cfg.encoder.max_image_pixels),
                        batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers,
                        collate_fn=_collate, pin_memory=enc.device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if cfg.encoder.num_workers else None,
                        worker_init_fn=ignore_stop_signals)
    codec = shard.Codec(cfg.cache.dtype, enc.tokens, enc.width)
    meta = dict(fingerprint=json.dumps(enc.fingerprint, sort_keys=True), fingerprint_id=fid)
    pending: dict[int, tuple[list, list, list, list]] = {}  # shard -> its rows, keys, tiles, failures so far
    n_failed = n_written = n_images = n_tiles = 0
    bar = tqdm(total=sum(len(items) for _, items in shards), unit="img", mininterval=1.0, disable=None,
               desc=f"embed{f' rank {dist.rank}' if dist.is_distributed else ''}")
    for batch in loader:
        if stop.requested:
            break  # leaving the loop shuts the DataLoader's workers down
        stored = _stored_rows(enc, codec, [tiled[0] for _, _, tiled, _, _ in batch if tiled is not None])
        at = 0
        for index, key, tiled, reason, source in batch:
            rows, keys, layout, failures = pending.setdefault(index, ([], [], [], []))
            if tiled is None:
                failures.append((key, reason) if source is None else (key, reason, source))
                n_failed += 1
                if remote.gave_up(reason):  # the store, not the image: stop rather than publish it as failed
                    bar.close()
                    raise RunFailed(f"{source or key}: {reason} (the published shards are kept, the ones in flight "
                                    f"dropped)")
            else:
                pixels, image_layout = tiled
                rows.append(stored[at:at + len(pixels)])
                keys.append(key)
                layout.append((len(pixels), *image_layout))
                at += len(pixels)
                n_images, n_tiles = n_images + 1, n_tiles + len(pixels)
            if len(keys) + len(failures) == len(plan[index]):
                emb = np.concatenate(rows) if rows else np.zeros((0, codec.row_bytes), np.uint8)  # (n, row_bytes)
                shard.write_shard(cache.shard_path(cache_dir, index), emb, codec, keys, shard_index=index,
                                  plan=cache.plan_hash(plan[index]), failures=failures,
                                  tiles=np.array(layout, np.int64).reshape(-1, 5), **meta)
                if published:
                    published(cache.shard_path(cache_dir, index))
                del pending[index]
                n_written += 1
        bar.update(len(batch))
        if n_tiles != n_images:
            bar.set_postfix_str(f"{n_tiles} tiles", refresh=False)
        if n_failed > cfg.cache.max_failure_frac * n_total:
            bar.close()
            raise RunFailed(f"{n_failed} images failed already (> cache.max_failure_frac="
                               f"{cfg.cache.max_failure_frac:.1%} of {n_total}); stopping. Shards written so far "
                               f"are kept. Check the images of data.records={cfg.data.records}"
                               + (f" under data.image_root={cfg.data.image_root}" if cfg.data.image_root else ""))
    bar.close()
    if stop.requested:
        who = f"embed{f' rank {dist.rank}' if dist.is_distributed else ''}"
        raise Interrupted(stop.signum, f"{who}: stopped by {signal_name(stop.signum)}; the shards published so far "
                                       f"are kept, the ones in flight were dropped; rerun the same command to resume")
    assert not pending and n_written == len(shards), "every planned shard must have been written"
    return n_failed


def _stored_rows(enc, codec: shard.Codec, pixels: list[torch.Tensor]) -> np.ndarray | None:
    """Each image's tiles ((n, 3, S, S) pixels, in order) -> their stored rows (sum of n, row_bytes), the tower
    run on at most encoder.batch_size tiles at once; None for no image."""
    if not pixels:
        return None
    tiles, step = torch.cat(pixels), enc.cfg.batch_size  # (sum n, 3, S, S)
    return np.concatenate([codec.encode(features(enc, tiles[a:a + step])).cpu().numpy()
                           for a in range(0, len(tiles), step)])
