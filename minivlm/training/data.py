"""Stage-2 data: records joined with cache rows, tokenized once, a resumable shuffled batch sampler, and
the loader.

Design choices:
- The join is by image key through the shards' `keys`; records with an image that failed or is absent are
  dropped and counted, as are records whose images and prompt do not fit tokenizer.max_len or model.max_seq_len
  and the records the sources skipped (one warning line per reason naming the first; data.strict: a stop).
  More records without their images than data.max_dropped_frac is the wrong cache, refused before any step. A
  sample holds any number of images (text-only: none); each is one slot, read as one cache row, and the K slots
  of a batch reach the model in the order its placeholders appear.
- A run needs arrays, not records: per sample its image slots' (shard, row) and its tokens (`text.tokenize`,
  once). The
  first run builds them from the records and keeps them in `<cache.dir>/samples/` (`stored_splits`); a
  rerun, a sweep's next run and the other ranks load them (a million records: seconds and ~150 B a sample,
  against minutes and ~1.5 KB a record). A batch is then a row read per image plus a vectorized pad
  (`text.collate`).
- Image rows are read as stored (minivlm.embedding.shard.RowReader: the only code that knows the row format,
  checks each row's checksum and picks mmap or pread) into one (K, row_bytes) uint8 tensor per read (pinned for
  CUDA; else one of a few reused `Buffers`), in the batches' layout order, and decoded on the training device by
  `to_device`: an 8-bit cache moves 8-bit rows.
- Packing (`train.packing`) lays a micro-batch's samples into rows of at most `capacity` tokens
  (`text.pack`) with positions restarting per sample; it changes how a step's samples are laid out, never
  which samples a step holds, so the schedule, resume and metrics keep their meaning. A micro-batch that
  packs to one sample a row (lengths too alike to share a row) goes as a padded batch: the model's plain
  causal path computes it exactly, without the cost of keeping samples apart.
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
import threading
import weakref
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from minivlm.config import RunConfig
from minivlm.dist import Dist
from minivlm.embedding import cache, mirror
from minivlm.embedding.encoder import EncoderSpec
from minivlm.embedding.shard import Codec, RowReader
from minivlm.fileio import atomic_write
from minivlm.formats.records import Record
from minivlm.formats.sources import SKIP_REASONS, load, open_sources, skip_warnings, sources_hash
from minivlm.training.attention import cu_seqlens_of
from minivlm.training import layout
from minivlm.training.text import TextFormat, Tokens, collate, format_key, load_tokenizer, pack, text_format, tokenize

SAMPLES = "samples"  # <cache.dir>/samples/<key>.npz: a run's splits as arrays (`stored_splits`)


def open_cache(cfg: RunConfig, tokens: int | None = None, width: int | None = None) -> tuple[dict, cache.CacheIndex]:
    """Validate the cache before anything else: complete, published, expected T/D, same encoder spec. A URL
    cache.dir is read through its mirror (minivlm.embedding.mirror), brought up to date here."""
    cache_dir = mirror.local(cfg)
    manifest = cache.load_manifest(cache_dir)
    spec = EncoderSpec.of_manifest(manifest)
    spec.check(EncoderSpec.of_config(cfg.encoder, cfg.cache.dtype), "the config", f"cache {cache_dir}",
               "re-embed into another cache.dir or fix the config")
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
    """A split's samples as arrays: sample i's images are the slots j in [first[i], first[i + 1]) (none:
    text-only), image j's tiles the cache rows layout[j, 0] rows from (shard[j], row[j]) on. `records` is kept
    only where something needs a sample's text or image keys (evaluation's captions); a training run never does."""
    shard: np.ndarray                   # (M,) int64: each image's shard
    row: np.ndarray                     # (M,) int64: its first row
    layout: np.ndarray                  # (M, 5) int64: its tile count, grid rows, grid cols, height, width
    first: np.ndarray                   # (n + 1,) int64: sample i's images start at first[i]
    dropped: int                        # records with an image that is not in the cache
    records: list[Record] | None = None
    skipped: dict = field(default_factory=dict)  # reason -> [count, first where]: the sources' skips, "missing"

    def __len__(self) -> int:
        return len(self.first) - 1

    def slots(self, ix: np.ndarray) -> np.ndarray:
        """(K,) the images of samples `ix`, sample after sample, each sample's in order."""
        return _ranges(self.first[ix], self.first[ix + 1] - self.first[ix])

    @cached_property
    def rows_per_sample(self) -> np.ndarray:
        """(n,) int64: the cache rows (tiles) of each sample's images; kept, as the loader asks twice a batch."""
        tiles = np.concatenate([[0], np.cumsum(self.layout[:, 0])])
        return tiles[self.first[1:]] - tiles[self.first[:-1]]

    def rows(self, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of every cache row the images of samples `ix` read: each image's tiles, in order."""
        slots = self.slots(ix)
        count = self.layout[slots, 0]
        return np.repeat(self.shard[slots], count), _ranges(self.row[slots], count)

    def keep(self, mask: np.ndarray) -> Split:
        """The samples where `mask` is true."""
        ix = np.flatnonzero(mask)
        n = self.first[ix + 1] - self.first[ix]
        slots = self.slots(ix)
        records = [r for r, m in zip(self.records, mask) if m] if self.records is not None else None
        return Split(self.shard[slots], self.row[slots], self.layout[slots], np.concatenate([[0], np.cumsum(n)]),
                     self.dropped, records, self.skipped)


def _ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """start[i], start[i] + 1, ..., start[i] + count[i] - 1 for each i, concatenated."""
    return np.arange(count.sum()) + np.repeat(start - (np.cumsum(count) - count), count)


MISSING = "missing"  # the skip of a record with an image that is not in the cache


def join(records: list[Record], index: cache.CacheIndex, skipped: dict | None = None, strict: bool = False) -> Split:
    """Records whose images are all in the cache (or that have none), with their (shard, row)s and tile layouts;
    the others counted (`skipped`: the sources' skips, kept with them). `strict`: a missing image is a stop."""
    kept, locs, count, dropped, first = [], [], [], 0, ""
    for r in records:
        loc = [index.locations.get(k) for k in r.images]
        if None in loc:
            if strict:
                raise ValueError(f"{r.where}: image {r.images[loc.index(None)]} is not in the cache (it failed at embed: "
                                 f"see the cache's failures.jsonl); set data.strict=false to skip and count such records")
            dropped += 1
            first = first or r.where
        else:
            kept.append(r)
            locs += loc
            count.append(len(loc))
    locs = np.array(locs, np.int64).reshape(-1, 2)
    skipped = dict(skipped or {})
    if dropped:
        skipped[MISSING] = [dropped, first]
    return Split(locs[:, 0].copy(), locs[:, 1].copy(), index.image_tiles(locs[:, 0], locs[:, 1]),
                 np.concatenate([[0], np.cumsum(count, dtype=np.int64)]), dropped, kept, skipped)


def _skips(loaded) -> dict:
    return {r: [n, loaded.first_skip[r]] for r, n in loaded.skipped.items()}


def load_splits(cfg: RunConfig, index: cache.CacheIndex, progress: bool = False) -> tuple[Split, Split]:
    """Train and held-out samples: data.val_records if given, else a hash split by the first image's key.
    `progress`: progress bars, and a warning line for the records skipped (minivlm.formats.sources)."""
    d, strict = cfg.data, cfg.data.strict
    loaded = load([d.records], d, mirror.local(cfg), progress=progress, warn=False)  # load_data warns, once
    records = loaded.records
    if d.val_records:
        held_out = load([d.val_records], d, mirror.local(cfg), progress=progress, warn=False)
        return (join(records, index, _skips(loaded), strict),
                join(held_out.records, index, _skips(held_out), strict))
    held = [bool(r.images) and in_val_split(r.images[0], d.val_frac) for r in records]
    train = [r for r, h in zip(records, held) if not h]
    val = [r for r, h in zip(records, held) if h]
    return join(train, index, _skips(loaded), strict), join(val, index, strict=strict)


def skipped_of(*splits: Split) -> dict:
    """The splits' skips added up: reason -> [count, first where]."""
    out: dict = {}
    for sp in splits:
        for r, (n, first) in sp.skipped.items():
            total, first = out.get(r, (0, first))  # the first split's first record stays the first
            out[r] = [total + n, first]
    return out


def check_dropped(cfg: RunConfig, train: Split, val: Split, skipped: dict) -> None:
    """The wrong cache: more of the records' images missing from it than data.max_dropped_frac, before any step."""
    dropped = train.dropped + val.dropped
    total = dropped + int((np.diff(train.first) > 0).sum() + (np.diff(val.first) > 0).sum())
    if dropped and dropped > cfg.data.max_dropped_frac * total:
        raise ValueError(f"cache {cfg.cache.dir} lacks the images of {dropped} of the {total} records with images "
                         f"({dropped / total:.0%}, above data.max_dropped_frac={cfg.data.max_dropped_frac}; first: "
                         f"{skipped[MISSING][1]}): likely the records of another dataset, or the cache of another "
                         f"embed; point cache.dir at the cache stages/embed.py wrote for {cfg.data.records}")


@dataclass(frozen=True)
class TooLong:
    """Samples left out because their images and prompt do not fit tokenizer.max_len (or model.max_seq_len)."""
    count: int
    first: str                          # where the first of them is ("" when none)

    def warning(self, fmt: TextFormat, cfg: RunConfig) -> str:
        return (f"warning: skipped {self.count} sample(s) whose images and prompt do not fit {fit_setting(fmt, cfg)} "
                f"(first: {self.first}); raise {fit_setting(fmt, cfg).split('=')[0]} to train on them")


def fit_setting(fmt: TextFormat, cfg: RunConfig) -> str:
    """'tokenizer.max_len=512', or 'model.max_seq_len=128' where the model's positions are fewer."""
    return f"tokenizer.max_len={fmt.max_len}" if fmt.max_len == cfg.tokenizer.max_len else \
        f"model.max_seq_len={fmt.max_len}"


def fitting_format(fmt: TextFormat, cfg: RunConfig) -> TextFormat:
    """The text format whose max_len also fits the model's positions: a sample longer than model.max_seq_len
    is left out and counted like one longer than tokenizer.max_len, never a stop at its first step."""
    return dataclasses.replace(fmt, max_len=min(fmt.max_len, cfg.model.max_seq_len))


def split_tokens(fmt: TextFormat, split: Split, progress: bool = False) -> tuple[Split, Tokens, TooLong]:
    """The split's samples that fit tokenizer.max_len, their tokens, and what was left out."""
    layouts = np.split(split.layout, split.first[1:-1]) if fmt.tiling != "none" else None  # per record
    tokens, fits = tokenize(fmt, split.records, layouts, progress)
    out = split.keep(fits) if not fits.all() else split
    first = next((r.where for r, f in zip(split.records, fits) if not f), "")
    return out, tokens, TooLong(int((~fits).sum()), first)


SAMPLES_FORMAT = 4  # bump when what a stored entry holds for the same inputs changes (3: tile layouts; 4: skips)
SPLITS = ("train", "val")


def samples_key(cfg: RunConfig, fmt: TextFormat, manifest: dict) -> str:
    """A hash of everything the stored samples depend on: the record files (JSON by content, Parquet by identity
    and its stored join), how they are read and split, the cache's rows (its manifest) and the text format."""
    d = cfg.data
    h = hashlib.sha256(repr((SAMPLES_FORMAT, d.records, d.val_records, d.val_frac, d.image_column, d.text_column,
                             d.max_images, d.strict, format_key(fmt))).encode())
    for spec in filter(None, (d.records, d.val_records)):
        h.update(sources_hash(open_sources(spec, d)).encode())
    h.update(json.dumps(manifest, sort_keys=True).encode())
    return h.hexdigest()[:32]


def stored_splits(cfg: RunConfig, index: cache.CacheIndex, manifest: dict, fmt: TextFormat, save: bool = False,
                  progress: bool = False) -> tuple[tuple[Split, Tokens, TooLong], ...]:
    """Train and held-out splits with their tokens (and the samples left out as too long), from
    `<cache.dir>/samples/<key>.npz` when a run kept them: a rerun, a sweep's next run and the other ranks load a
    few arrays instead of reading, joining and tokenizing every record again (minutes and ~1.5 KB a record, per
    million records). The first run (`save`) keeps them."""
    path = mirror.local(cfg) / SAMPLES / f"{samples_key(cfg, fmt, manifest)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple((Split(z[f"{s}/shard"], z[f"{s}/row"], z[f"{s}/layout"], z[f"{s}/first"],
                                int(z[f"{s}/dropped"]), skipped=json.loads(str(z[f"{s}/skipped"]))),
                          Tokens(*(z[f"{s}/{f.name}"] for f in dataclasses.fields(Tokens))),
                          TooLong(int(z[f"{s}/too_long"]), str(z[f"{s}/too_long_first"]))) for s in SPLITS)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"data: {path} is unreadable ({e}); reading the records again", flush=True)
    out = []
    for s, sp in zip(SPLITS, load_splits(cfg, index, progress)):
        sp, tokens, too_long = split_tokens(fmt, sp, progress and s == "train")
        out.append((dataclasses.replace(sp, records=None), tokens, too_long))  # the records: ~1.5 KB each
    if save:
        try:
            atomic_write(path, lambda tmp: _save_samples(tmp, out))
        except OSError as e:
            print(f"data: could not keep the samples in {path} ({e}); the next run reads the records again", flush=True)
    return tuple(out)


def _save_samples(path: Path, splits) -> None:
    arrays = {}
    for s, (sp, tokens, too_long) in zip(SPLITS, splits):
        arrays.update({f"{s}/shard": sp.shard, f"{s}/row": sp.row, f"{s}/layout": sp.layout, f"{s}/first": sp.first,
                       f"{s}/dropped": np.int64(sp.dropped), f"{s}/too_long": np.int64(too_long.count),
                       f"{s}/too_long_first": np.array(too_long.first), f"{s}/skipped": np.array(json.dumps(sp.skipped))})
        arrays.update({f"{s}/{f.name}": getattr(tokens, f.name) for f in dataclasses.fields(Tokens)})
    with open(path, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez(f, **arrays)


class Samples:
    """A split's samples: tokenized text, and where each one's images are. `samples[indices]` -> one batch dict:
    input_ids, labels (and positions and cu_seqlens, packed: minivlm.training.attention), `index` (the samples
    in the order laid out), `rows` (their images' cache rows as stored, in that order), `image_index` (which
    projected row each image position takes, where tiles are laid out otherwise than in order: anyres) and
    `shuffled` (for each row, another sample's: the eval's control).

    `packing`: None lays each sample in a row of its own, padded to the batch's longest; an int packs each
    batch's samples into rows of at most that many tokens (0: the batch's longest sample, so a packed batch
    never holds more positions than the padded one)."""

    def __init__(self, split: Split, reader: RowReader, fmt: TextFormat, pin_memory: bool = False,
                 text: Tokens | None = None, packing: int | None = None):
        if text is None:
            split, text, _ = split_tokens(fmt, split)
        self.split, self.reader, self.fmt, self.pin_memory, self.text = split, reader, fmt, pin_memory, text
        self.packing = packing

    def __len__(self):
        return len(self.split)

    @property
    def row_bytes(self) -> int:
        return self.reader.codec.row_bytes

    def close(self):
        self.reader.close()

    def shard_order(self, indices: list[int]) -> list[int]:
        """The batch in (shard, row) order of each sample's first image (text-only samples first, as they came):
        reads walk each file forward."""
        ix, sp = np.asarray(indices, np.int64), self.split
        has = sp.first[ix + 1] > sp.first[ix]
        at = np.minimum(sp.first[ix], max(len(sp.shard) - 1, 0))
        shard = np.where(has, sp.shard[at] if len(sp.shard) else -1, -1)
        return ix[np.lexsort((np.where(has, sp.row[at] if len(sp.row) else 0, ix), shard))].tolist()

    def __getitem__(self, indices: list[int]) -> dict:
        batch = self.text_batches([indices])[0]
        index = batch["index"]
        return {**batch, "rows": self.rows(index), **self.placed(index), "shuffled": self.shuffled(index)}

    def placed(self, index: np.ndarray) -> dict:
        """`image_index` of samples `index` where their tiles are laid out otherwise than in order (anyres)."""
        return {"image_index": self._tensor(self.image_index(index))} if self.fmt.tiling == "anyres" else {}

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """(K, row_bytes) uint8: the images of samples `index` as stored (each image's tiles), sample after sample.
        Its memory is read into again once no tensor or array made from it is left (`Buffers`): keep one of
        those, never a raw pointer."""
        shard, row = self.split.rows(np.asarray(index, np.int64))
        out = (torch.empty(len(shard), self.row_bytes, dtype=torch.uint8, pin_memory=True) if self.pin_memory
               else self._buffers.take(len(shard)))
        self.reader.read(shard, row, out.numpy())
        return out

    @cached_property
    def _buffers(self) -> Buffers:
        return Buffers(self.row_bytes)

    def image_index(self, index: np.ndarray) -> np.ndarray:
        """(positions,) int64: for each image position of samples `index` (in order), the projected row it takes
        among the batch's K rows x T' (minivlm.training.layout; NEWLINE: the newline row)."""
        layouts = self.split.layout[self.split.slots(np.asarray(index, np.int64))]  # (K, 5)
        return layout.image_index(self.fmt.tiling, layouts, self.fmt.image_tokens, self.fmt.image_token)

    def image_rows(self, index: np.ndarray) -> int:
        """The cache rows (tiles) the images of these samples take."""
        return int(self.split.rows_per_sample[index].sum())

    def shuffled(self, index: np.ndarray) -> np.ndarray:
        """(K,) for each cache row of samples `index` (in order), one of the previous sample with images (cyclic):
        every image of a sample replaced by another sample's (row for row, cycling where that one has fewer). With
        fewer than two such samples, the rows themselves."""
        ix = np.asarray(index, np.int64)
        per_image = self.split.first[ix + 1] - self.split.first[ix]
        n = np.bincount(np.repeat(np.arange(len(ix)), per_image), self.split.layout[self.split.slots(ix), 0],
                        minlength=len(ix)).astype(np.int64)       # (B,) rows of each sample
        n = n[n > 0]
        first = np.cumsum(n) - n                                        # (S,) each image sample's first image
        nxt = np.roll(np.arange(len(n)), 1)                             # (S,) the sample whose images it takes
        j = np.arange(n.sum()) - np.repeat(first, n)                    # (K,) the image's place in its sample
        return np.repeat(first[nxt], n) + j % np.repeat(n[nxt], n)

    def arrange(self, indices: list[int]) -> tuple[list[int], list[int]]:
        """A batch's samples in the order laid out, and the samples in each row."""
        if self.packing is None:
            return list(indices), [1] * len(indices)
        lengths = self.text.length[np.asarray(indices, np.int64)]
        rows = pack(lengths, self.packing or int(lengths.max()))
        return [indices[i] for row in rows for i in row], [len(row) for row in rows]

    def text_batches(self, batches: list[list[int]]) -> list[dict]:
        """input_ids, labels (and positions) and index of several batches, collated at once (`text.collate`)."""
        laid = [self.arrange(b) for b in batches]
        ix = np.concatenate([order for order, _ in laid]).astype(np.int64)
        rows = [n for _, r in laid for n in r]
        parts = collate(self.fmt, self.text, ix, rows, [len(r) for _, r in laid], packed=self.packing is not None)
        index = np.split(ix, np.cumsum([len(order) for order, _ in laid])[:-1])
        out = []
        for part, i, (_, r) in zip(parts, index, laid):
            part = part if max(r) > 1 else part[:2]  # one sample a row: a padded batch, nothing to keep apart
            batch = {k: self._tensor(a) for k, a in zip(("input_ids", "labels", "positions"), part)}
            if "positions" in batch:  # flash-attn's sample offsets: a length only the host knows without a sync
                batch["cu_seqlens"] = self._tensor(cu_seqlens_of(part[2]).numpy())
            out.append({**batch, "index": i})
        return out

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        """Pinned for CUDA: a copy from pageable memory may wait for the GPU's stream, pinned ones never do."""
        return torch.from_numpy(a).pin_memory() if self.pin_memory else torch.from_numpy(a)

    def text_tokens(self, index: np.ndarray) -> int:
        """Real text tokens of these samples: no padding, no image placeholder."""
        t = self.text
        return int((t.end[index] - t.start[index] - t.placeholders[index]).sum())

    def positions(self, index: np.ndarray) -> int:
        """The positions these samples fill in a batch (placeholders expanded, no padding)."""
        return int(self.text.length[index].sum())

    def describe_rows(self, index: np.ndarray, limit: int = 8) -> str:
        """'<cache>/shards/shard-00001.h5 rows 3, 9; <cache>/shards/shard-00004.h5 row 0' for these samples."""
        shard, row = self.split.rows(np.asarray(index, np.int64))
        locs = sorted(set(zip(shard.tolist(), row.tolist())))
        if not locs:
            return "no cached rows (text-only samples)"
        by_shard: dict[int, list[int]] = {}
        for s, r in locs[:limit]:
            by_shard.setdefault(s, []).append(r)
        text = "; ".join(f"{self.reader.shards[s].path} row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"
                         for s, rows in by_shard.items())
        return text + (f" and {len(locs) - limit} more" if len(locs) > limit else "")


class Buffers:
    """(n, row_bytes) uint8 tensors to read rows into, each reused once nothing made from it is left. A fresh
    buffer this large is new anonymous pages, which the kernel zeroes on first write: that cost more than
    copying the rows into them (bench P3). Pinned buffers need none of this: torch's pinned allocator already
    reuses them, and only once their copies to the GPU are done. Buffers are 64-byte aligned as torch allocates
    them: memcpy runs ~60 % slower into a buffer 16 bytes past its source's alignment, which is where NumPy's
    allocations land against float16 rows (a multiple of 64 bytes, from byte 2048 of a shard). Up to KEEP
    buffers (~8 MiB each for the loader's reads) stay allocated while the `Samples` lives."""

    KEEP = 8  # the loader's reads in flight for up to 3 reader threads; beyond that a read gets a plain new one

    def __init__(self, row_bytes: int):
        self.row_bytes = row_bytes
        self._kept: list[tuple[np.ndarray, weakref.ref]] = []  # each buffer, and the view last handed out of it
        self._lock = threading.Lock()  # the loader's reader threads share one

    def take(self, n: int) -> torch.Tensor:
        """An (n, row_bytes) uint8 tensor whose contents are undefined."""
        with self._lock:
            free = [i for i, (_, handed) in enumerate(self._kept) if handed() is None]
            fits = [i for i in free if len(self._kept[i][0]) >= n]
            if n and fits:
                i, buf = fits[0], self._kept[fits[0]][0]
            elif n and (free or len(self._kept) < self.KEEP):  # a new buffer, in place of a free one too small
                i, buf = free[0] if free else len(self._kept), torch.empty(n, self.row_bytes, dtype=torch.uint8).numpy()
                if i == len(self._kept):
                    self._kept.append(None)
            else:  # nothing to read, or every kept buffer still in use
                return torch.empty(n, self.row_bytes, dtype=torch.uint8)
            # The weak reference is to the NumPy view: torch.from_numpy's tensor holds it, and so does every
            # tensor made from that one (slices, split parts, .numpy()); the tensors themselves are many.
            view = buf[:n]
            self._kept[i] = (buf, weakref.ref(view))
            return torch.from_numpy(view)


def to_device(batch: dict, device: str, codec: Codec) -> dict:
    """The batch on `device` (asynchronous from pinned memory), its stored rows decoded there into
    `images` (K, T, D), None without images; host-side entries (`index`, `shuffled`) stay."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items() if k != "rows"}
    rows = batch["rows"]
    out["images"] = codec.decode(rows.to(device, non_blocking=True)) if len(rows) else None
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
    """The sampler's batches. Text is collated ~512 samples at a time and image rows are read ~8 MiB at a
    time (per-call and per-handoff costs amortized; larger reads measured slower in bench P3), by `threads` reader
    threads 2 x threads reads ahead of the loop, or with 0 by the loop when it asks (with CUDA's async launches
    that already overlaps the GPU step). A batch's rows are a slice of its read. Iterate it again after
    `sampler.set_position` to go on from elsewhere."""

    TEXT_SAMPLES = 512
    READ_BYTES = 8 << 20

    def __init__(self, dataset: Samples, sampler, threads: int):
        self.dataset, self.sampler, self.threads = dataset, sampler, threads

    def _reads(self):
        """Lists of consecutive text batches, one list per read."""
        ds = self.dataset
        for group in _groups(self.sampler, len, self.TEXT_SAMPLES):
            yield from _groups(ds.text_batches(group), lambda text: ds.image_rows(text["index"]) * ds.row_bytes,
                               self.READ_BYTES)

    def _read(self, texts: list[dict]) -> list[dict]:
        ds = self.dataset
        rows = ds.rows(np.concatenate([t["index"] for t in texts]))  # (K, row_bytes) for all the batches
        parts = rows.split([ds.image_rows(t["index"]) for t in texts])
        # new dicts: the text group still holds its own until its last batch, and must not hold the rows
        return [{**text, "rows": part, **ds.placed(text["index"])} for text, part in zip(texts, parts)]

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
    dropped: int               # records with an image that is not in the cache
    too_long: TooLong          # samples whose images and prompt do not fit tokenizer.max_len
    skipped: dict = field(default_factory=dict)  # reason -> [count, first where], too long included

    def describe_skips(self) -> str:
        """'5 video, 2 mismatch, 1 image not in cache' for the start line ('none' when nothing was skipped)."""
        return ", ".join(f"{n} {'image not in cache' if r == MISSING else r.replace('_', ' ')}"
                         for r, (n, _) in self.skipped.items()) or "none"

    @property
    def codec(self) -> Codec:
        """How the cache stores rows: `to_device` decodes batches with it."""
        return self.index.codec


def load_data(cfg: RunConfig, dist: Dist, tokens: int | None = None, width: int | None = None,
              packing: int | None = None) -> TrainData:
    """Validate the cache, join records with rows, tokenizer + format, the resumable sampler, eval batches.
    `packing`: how training batches are laid out (`Samples`); held-out batches are padded, one sample a row."""
    tc = cfg.train
    manifest, index = open_cache(cfg, tokens, width)
    spec = EncoderSpec.of_manifest(manifest)
    tok = load_tokenizer(cfg.tokenizer, layout.markers(spec.tiles, spec.complete_fingerprint["max_tiles"]))
    fmt = fitting_format(text_format(tok, cfg.tokenizer, cfg.model.image_tokens(index.tokens), spec.tiles), cfg)
    (train_split, train_text, train_long), (val_split, val_text, val_long) = stored_splits(
        cfg, index, manifest, fmt, save=dist.is_main, progress=dist.is_main)
    too_long = TooLong(train_long.count + val_long.count, train_long.first or val_long.first)
    skipped = skipped_of(train_split, val_split)
    check_dropped(cfg, train_split, val_split, skipped)
    if too_long.count and cfg.data.strict:
        raise ValueError(f"{too_long.first}: its images and prompt do not fit {fit_setting(fmt, cfg)}; raise "
                         f"{fit_setting(fmt, cfg).split('=')[0]}, or set data.strict=false to skip and count such samples")
    if dist.is_main:
        missing = f"with an image that is not in cache {cfg.cache.dir} (failed at embed: see its failures.jsonl)"
        for line in skip_warnings({r: n for r, (n, _) in skipped.items()}, {r: w for r, (_, w) in skipped.items()},
                                  {**SKIP_REASONS, MISSING: missing}):
            print(line, flush=True)
        if too_long.count:
            print(too_long.warning(fmt, cfg), flush=True)
    if too_long.count:
        skipped["too_long"] = [too_long.count, too_long.first]
    if not len(train_split):
        raise ValueError(f"no training samples: none of {cfg.data.records}'s images are in cache {cfg.cache.dir}"
                         + (f" ({too_long.count} too long for tokenizer.max_len)" if too_long.count else ""))
    pin = dist.device.startswith("cuda")
    train_ds = Samples(train_split, index.reader(), fmt, pin, train_text, packing)
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
                     train_split.dropped + val_split.dropped, too_long, skipped)


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
