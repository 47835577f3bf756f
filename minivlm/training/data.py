"""Stage-2 data: records joined with cache rows, tokenized once, a resumable shuffled batch sampler, and
the loader.

Design choices:
- The join is by image key through the shards' `keys`; records whose image failed or is absent are
  dropped and counted. Text-only records stay (they get no placeholders and a zero image slot).
- A run needs arrays, not records: per sample its (shard, row) and its tokens (`text.tokenize`, once). The
  first run builds them from the records and keeps them in `<cache.dir>/samples/` (`stored_splits`); a
  rerun, a sweep's next run and the other ranks load them (a million records: seconds and ~150 B a sample,
  against minutes and ~1.5 KB a record). A batch is then a row read per image plus a vectorized pad
  (`text.collate`).
- Image rows are read as stored (minivlm.embedding.shard.RowReader: the only code that knows the row format, checks
  each row's CRC-32 and picks mmap or pread) into one preallocated (B, row_bytes) uint8 tensor per batch
  (pinned for CUDA), in (shard, row) order within the batch, and decoded on the training device by
  `to_device`: an 8-bit cache moves 8-bit rows.
- Batches are read in this process, by `num_workers` threads running ahead of the step, not by
  DataLoader worker processes: handing a batch across the process boundary capped the read path at
  ~3.5k B/16 rows/s on 2 cores, against ~20k for the reads themselves.
- The sampler's order is a pure function of (seed, epoch); a step takes the next global batch of it,
  split across ranks and micro-steps. Its position is (epoch, sample), saved in checkpoints, so a resumed
  run sees exactly the samples it would have seen, also on another number of ranks (same global batch).
- A batch keeps the sample indices it holds (`index`, on the host): the loop counts real text tokens
  and image rows from them without reading a device tensor, and a step whose loss is not finite can
  name the shards and rows it read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from minivlm.config import RunConfig
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.encoder import EncoderSpec
from minivlm.embedding.shard import Codec, RowReader
from minivlm.fileio import atomic_write
from minivlm.formats.records import Record
from minivlm.formats.sources import open_sources, read_records, sources_hash
from minivlm.training.text import TextFormat, Tokens, collate, format_key, load_tokenizer, text_format, tokenize

SAMPLES = "samples"  # <cache.dir>/samples/<key>.npz: a run's splits as arrays (`stored_splits`)


def open_cache(cfg: RunConfig, tokens: int | None = None, width: int | None = None) -> tuple[dict, cache.CacheIndex]:
    """Validate the cache before anything else: complete, published, expected T/D, same encoder spec."""
    cache_dir = Path(cfg.cache.dir)
    manifest = cache.load_manifest(cache_dir)
    spec = EncoderSpec.of_manifest(manifest)
    spec.check(EncoderSpec.of_config(cfg.encoder, cfg.cache.dtype), "the config", f"cache {cache_dir}",
               "re-embed into another cache.dir or fix the config")
    if spec.tiles != "none":
        raise ValueError(f"cache {cache_dir} holds tiled images (encoder.tiles={spec.tiles!r}), which stage 2 cannot "
                         f"read yet; train on a cache embedded with encoder.tiles=none")
    for name, want, got in (("T (image tokens)", tokens, manifest["tokens"]), ("D (width)", width, manifest["width"])):
        if want is not None and want != got:
            raise ValueError(f"cache {cache_dir} has {name} = {got}, the model expects {want}; use the cache "
                             f"this model was trained on, or start a new run")
    return manifest, cache.build_index(cache_dir, manifest)


def in_val_split(key: str, frac: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2 ** 64 < frac


@dataclass(frozen=True)
class Split:
    """A split's samples as arrays: where each one's image row is (shard -1: text-only). `records` is kept only
    where something needs a sample's text or image key (evaluation's captions); a training run never does."""
    shard: np.ndarray                   # (n,) int64, -1 for a text-only sample
    row: np.ndarray                     # (n,) int64, 0 for a text-only sample
    dropped: int                        # records whose image is not in the cache
    records: list[Record] | None = None

    def __len__(self) -> int:
        return len(self.shard)


def join(records: list[Record], index: cache.CacheIndex) -> Split:
    """Records whose image is in the cache (or that have none), with its (shard, row); the others counted."""
    kept, locs, dropped, text_only = [], [], 0, (-1, 0)
    for r in records:
        loc = text_only if r.image is None else index.locations.get(r.image)
        if loc is None:
            dropped += 1
        else:
            kept.append(r)
            locs.append(loc)
    locs = np.array(locs, np.int64).reshape(-1, 2)
    return Split(locs[:, 0].copy(), locs[:, 1].copy(), dropped, kept)


def load_splits(cfg: RunConfig, index: cache.CacheIndex) -> tuple[Split, Split]:
    """Train and held-out samples: data.val_records if given, else a hash split by image key."""
    records = read_records(cfg.data.records, cfg.data, cfg.cache.dir)
    if cfg.data.val_records:
        train, val = records, read_records(cfg.data.val_records, cfg.data, cfg.cache.dir)
    else:
        train = [r for r in records if not (r.image and in_val_split(r.image, cfg.data.val_frac))]
        val = [r for r in records if r.image and in_val_split(r.image, cfg.data.val_frac)]
    return join(train, index), join(val, index)


def split_tokens(fmt: TextFormat, split: Split, progress: bool = False) -> Tokens:
    return tokenize(fmt, split.records, (split.shard >= 0).tolist(), progress)


SAMPLES_FORMAT = 1  # bump when what a stored entry holds for the same inputs changes
SPLITS = ("train", "val")


def samples_key(cfg: RunConfig, fmt: TextFormat, manifest: dict) -> str:
    """A hash of everything the stored samples depend on: the record files (JSON by content, Parquet by identity
    and its stored join), how they are read and split, the cache's rows (its manifest) and the text format."""
    d = cfg.data
    h = hashlib.sha256(repr((SAMPLES_FORMAT, d.records, d.val_records, d.val_frac, d.image_column, d.text_column,
                             format_key(fmt))).encode())
    for spec in filter(None, (d.records, d.val_records)):
        h.update(sources_hash(open_sources(spec, d)).encode())
    h.update(json.dumps(manifest, sort_keys=True).encode())
    return h.hexdigest()[:32]


def stored_splits(cfg: RunConfig, index: cache.CacheIndex, manifest: dict, fmt: TextFormat, save: bool = False,
                  progress: bool = False) -> tuple[tuple[Split, Tokens], tuple[Split, Tokens]]:
    """Train and held-out splits with their tokens, from `<cache.dir>/samples/<key>.npz` when a run kept them:
    a rerun, a sweep's next run and the other ranks load a few arrays instead of reading, joining and tokenizing
    every record again (minutes and ~1.5 KB a record, per million records). The first run (`save`) keeps them."""
    path = Path(cfg.cache.dir) / SAMPLES / f"{samples_key(cfg, fmt, manifest)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple((Split(z[f"{s}/shard"], z[f"{s}/row"], int(z[f"{s}/dropped"])),
                          Tokens(*(z[f"{s}/{f.name}"] for f in dataclasses.fields(Tokens)))) for s in SPLITS)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"data: {path} is unreadable ({e}); reading the records again", flush=True)
    splits = load_splits(cfg, index)
    out = tuple((dataclasses.replace(sp, records=None), split_tokens(fmt, sp, progress and s == "train"))
                for s, sp in zip(SPLITS, splits))
    del splits  # the records: ~1.5 KB each
    if save:
        try:
            atomic_write(path, lambda tmp: _save_samples(tmp, out))
        except OSError as e:
            print(f"data: could not keep the samples in {path} ({e}); the next run reads the records again", flush=True)
    return out


def _save_samples(path: Path, splits) -> None:
    arrays = {}
    for s, (sp, tokens) in zip(SPLITS, splits):
        arrays.update({f"{s}/shard": sp.shard, f"{s}/row": sp.row, f"{s}/dropped": np.int64(sp.dropped)})
        arrays.update({f"{s}/{f.name}": getattr(tokens, f.name) for f in dataclasses.fields(Tokens)})
    with open(path, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez(f, **arrays)


class Samples:
    """A split's samples: tokenized text, and where each one's image rows are. `samples[indices]` -> one
    padded batch dict (input_ids, labels, has_image, index, and `rows`: the images as stored)."""

    def __init__(self, split: Split, reader: RowReader, fmt: TextFormat, pin_memory: bool = False,
                 text: Tokens | None = None):
        self.split, self.reader, self.fmt, self.pin_memory = split, reader, fmt, pin_memory
        self.text = text if text is not None else split_tokens(fmt, split)
        self.shard, self.row = split.shard, split.row  # (n,): -1 / 0 for text-only samples

    def __len__(self):
        return len(self.split)

    @property
    def row_bytes(self) -> int:
        return self.reader.codec.row_bytes

    def close(self):
        self.reader.close()

    def shard_order(self, indices: list[int]) -> list[int]:
        """The batch in (shard, row) order (text-only samples first, as they came): reads walk each file forward."""
        ix = np.asarray(indices, np.int64)
        return ix[np.lexsort((np.where(self.shard[ix] < 0, ix, self.row[ix]), self.shard[ix]))].tolist()

    def __getitem__(self, indices: list[int]) -> dict:
        return {**self.text_batches([indices])[0], "rows": self.rows(indices)}

    def rows(self, indices) -> torch.Tensor:
        """(B, row_bytes) uint8: each sample's image rows as stored, zeros for text-only samples."""
        ix = np.asarray(indices, np.int64)
        out = torch.empty(len(ix), self.row_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        self.reader.read(self.shard[ix], self.row[ix], out.numpy())
        return out

    def text_batches(self, batches: list[list[int]]) -> list[dict]:
        """input_ids, labels and has_image of several batches, collated at once (`text.collate`)."""
        ix, sizes = np.concatenate(batches), [len(b) for b in batches]
        has_image = np.split(self.shard[ix] >= 0, np.cumsum(sizes)[:-1])
        index = np.split(ix, np.cumsum(sizes)[:-1])
        return [{"input_ids": self._tensor(ids), "labels": self._tensor(labels), "has_image": self._tensor(has),
                 "index": i} for (ids, labels), has, i in zip(collate(self.fmt, self.text, ix, sizes), has_image, index)]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        """Pinned for CUDA: a copy from pageable memory may wait for the GPU's stream, pinned ones never do."""
        return torch.from_numpy(a).pin_memory() if self.pin_memory else torch.from_numpy(a)

    def text_tokens(self, index: np.ndarray) -> int:
        """Real text tokens of these samples: no padding, no image placeholder."""
        return int((self.text.end[index] - self.text.start[index] - (self.text.image_at[index] >= 0)).sum())

    def image_rows(self, index: np.ndarray) -> int:
        return int((self.shard[index] >= 0).sum())

    def describe_rows(self, index: np.ndarray, limit: int = 8) -> str:
        """'<cache>/shards/shard-00001.h5 rows 3, 9; <cache>/shards/shard-00004.h5 row 0' for these samples."""
        ix = np.asarray(index, np.int64)
        locs = sorted({(s, r) for s, r in zip(self.shard[ix].tolist(), self.row[ix].tolist()) if s >= 0})
        if not locs:
            return "no cached rows (text-only samples)"
        by_shard: dict[int, list[int]] = {}
        for s, r in locs[:limit]:
            by_shard.setdefault(s, []).append(r)
        text = "; ".join(f"{self.reader.shards[s].path} row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"
                         for s, rows in by_shard.items())
        return text + (f" and {len(locs) - limit} more" if len(locs) > limit else "")


def to_device(batch: dict, device: str, codec: Codec) -> dict:
    """The batch on `device` (asynchronous from pinned memory), its stored rows decoded there into
    `images` (B, T, D); host-side entries (`index`) stay."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items() if k != "rows"}
    out["images"] = codec.decode(batch["rows"].to(device, non_blocking=True))
    return out


class BatchSampler:
    """The epoch's order cut into optimizer steps of one global batch, resumable mid-epoch on any number of ranks.

    A step consumes the next `global_batch` = batch_size x grad_accum x world_size samples of the epoch's
    order (a pure function of seed and epoch), cut into micro-batches of batch_size: micro-batch j of a step
    is rank j % world_size's micro-step j // world_size. So runs with the same global batch read the same
    samples at every step whatever their ranks and accumulation (2 ranks x 1 or 1 rank x 2), and the cursor
    is global: the epoch and the samples of its order consumed. An epoch's tail shorter than a step is
    dropped (every rank gets the same number of batches, so DDP ranks never wait on a collective another
    rank will not reach); unshuffled batches (held-out ones) keep the tail. One process with grad_accum 1
    reads consecutive batches of the order, as minivlm always has.
    """

    def __init__(self, dataset: Samples, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, grad_accum: int = 1):
        self.dataset, self.batch_size, self.seed, self.grad_accum = dataset, batch_size, seed, grad_accum
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * grad_accum * world_size
        self.epoch, self.start = 0, 0  # start: samples of the epoch's order consumed

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def __len__(self) -> int:
        """This rank's batches in an epoch."""
        if self.shuffle:
            return self.steps_per_epoch * self.grad_accum
        return len(range(self.rank, -(-len(self.dataset) // self.batch_size), self.world_size))

    def set_position(self, epoch: int, sample: int) -> None:
        """Go on from `sample` (samples of epoch `epoch`'s order consumed: whole steps)."""
        assert sample % self.global_batch == 0, "a cursor between steps"
        self.epoch, self.start = epoch, sample

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of the epoch, in order (grad_accum of them per step)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        end, bs = self.steps_per_epoch * self.global_batch if self.shuffle else n, self.batch_size
        return [self.dataset.shard_order(order[i:i + bs]) for i in range(0, end, bs)[self.rank::self.world_size]]

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start // self.global_batch * self.grad_accum:]


def _groups(items, size, limit: int):
    """Consecutive items cut into lists whose sizes sum to at least `limit` (the last may hold less)."""
    group, n = [], 0
    for item in items:
        group.append(item)
        n += size(item)
        if n >= limit:
            yield group
            group, n = [], 0
    if group:
        yield group


def _ahead(pool: ThreadPoolExecutor, fn, items, depth: int):
    """fn(item) in order, `pool` computing up to `depth` items ahead of the consumer."""
    items = iter(items)
    pending = deque(pool.submit(fn, x) for x in islice(items, depth))
    while pending:
        result = pending.popleft()
        pending.extend(pool.submit(fn, x) for x in islice(items, 1))
        yield result.result()


class Loader:
    """The sampler's batches. Text is collated ~512 samples at a time and image rows are read ~1 MiB
    at a time (per-call costs amortized: bench P3), by `threads` reader threads 2 x threads reads ahead
    of the loop, or with 0 by the loop when it asks (with CUDA's async launches that already overlaps
    the GPU step). A batch's rows are a slice of its read. Iterate it again after
    `sampler.set_position` to go on from elsewhere."""

    TEXT_SAMPLES = 512
    READ_BYTES = 1 << 20

    def __init__(self, dataset: Samples, sampler, threads: int):
        self.dataset, self.sampler, self.threads = dataset, sampler, threads

    def _reads(self):
        """Lists of (indices, text) of consecutive batches, one list per read."""
        ds = self.dataset
        for group in _groups(self.sampler, len, self.TEXT_SAMPLES):
            yield from _groups(zip(group, ds.text_batches(group)), lambda job: len(job[0]) * ds.row_bytes,
                               self.READ_BYTES)

    def _read(self, jobs: list) -> list[dict]:
        rows = self.dataset.rows(np.concatenate([ix for ix, _ in jobs]))  # (N, row_bytes) for all the jobs' batches
        parts = rows.split([len(ix) for ix, _ in jobs])
        # new dicts: the text group still holds its own until its last batch, and must not hold the rows
        return [{**text, "rows": part} for (_, text), part in zip(jobs, parts)]

    def __iter__(self):
        if not self.threads:
            for jobs in self._reads():
                yield from self._read(jobs)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="minivlm-read")
        try:
            for batches in _ahead(pool, self._read, self._reads(), 2 * self.threads):
                yield from batches
        finally:  # also when the loop stops mid-epoch and drops this iterator
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TrainData:
    manifest: dict
    index: cache.CacheIndex
    tokenizer: object
    fmt: TextFormat
    train: Samples
    sampler: BatchSampler
    eval_batches: list[dict]   # held-out batches, read once and kept in memory
    val: Samples               # closed after reading them; names their cache rows
    dropped: int               # records whose image is not in the cache

    @property
    def codec(self) -> Codec:
        """How the cache stores rows: `to_device` decodes batches with it."""
        return self.index.codec


def load_data(cfg: RunConfig, dist: Dist, tokens: int | None = None, width: int | None = None) -> TrainData:
    """Validate the cache, join records with rows, tokenizer + format, the resumable sampler, eval batches."""
    tc = cfg.train
    manifest, index = open_cache(cfg, tokens, width)
    tok = load_tokenizer(cfg.tokenizer)
    fmt = text_format(tok, cfg.tokenizer, index.tokens)
    (train_split, train_text), (val_split, val_text) = stored_splits(cfg, index, manifest, fmt, save=dist.is_main,
                                                                    progress=dist.is_main)
    if not len(train_split):
        raise ValueError(f"no training samples: none of {cfg.data.records}'s images are in cache {cfg.cache.dir}")
    pin = dist.device.startswith("cuda")
    train_ds = Samples(train_split, index.reader(), fmt, pin, train_text)
    val_ds = Samples(val_split, index.reader(), fmt, pin, val_text)
    sampler = BatchSampler(train_ds, tc.batch_size, tc.seed, dist.rank, dist.world_size, grad_accum=tc.grad_accum)
    if sampler.steps_per_epoch < 1:
        raise ValueError(f"{len(train_ds)} training samples make no full step of train.batch_size={tc.batch_size} x "
                         f"train.grad_accum={tc.grad_accum} x {dist.world_size} ranks; lower the batch size")
    # The first eval_batches global batches of the held-out set, split as a step is: the same samples on any
    # number of ranks (a rank may hold none; every rank still joins the evaluation's all-reduce).
    val_sampler = BatchSampler(val_ds, tc.batch_size, tc.seed, dist.rank, dist.world_size, shuffle=False,
                               grad_accum=tc.grad_accum)
    eval_batches = [val_ds[ix] for ix in val_sampler.batches(0)[:tc.eval_batches * tc.grad_accum]]
    val_ds.close()
    return TrainData(manifest, index, tok, fmt, train_ds, sampler, eval_batches, val_ds,
                     train_split.dropped + val_split.dropped)


def step_batches(loader: Loader, sampler: BatchSampler, state):
    """The micro-batches of each optimizer step from `state` (epoch, sample) on, epoch after epoch. The
    caller advances `state.sample` by `sampler.global_batch` after each step; an epoch's tail shorter than a
    step is skipped, and the next epoch starts only when another step is asked for (so a run ending on an
    epoch's last step saves that epoch's cursor)."""
    while True:
        sampler.set_position(state.epoch, state.sample)
        it = iter(loader)
        while state.sample < sampler.steps_per_epoch * sampler.global_batch:
            yield [next(it) for _ in range(sampler.grad_accum)]
        state.epoch, state.sample = state.epoch + 1, 0
