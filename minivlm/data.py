"""Stage-2 data: records joined with cache rows, a resumable shuffled batch sampler, and the loader.

Design choices:
- The join is by image key through the shards' `keys`; records whose image failed or is absent are
  dropped and counted. Text-only records stay (they get no placeholders and a zero image slot).
- One `__getitem__` per batch: the batch sampler hands the dataset a list of indices, the worker fills a
  preallocated (B, T, D) float16 tensor row by row with `read_direct` (never a list index into h5py).
  Within a batch, rows are read in (shard, row) order: same batch, better locality on disk.
- HDF5 handles are opened lazily inside the process that reads (a DataLoader worker after it starts)
  and are never carried across a fork.
- The sampler's order is a pure function of (seed, epoch, rank, world size); its position is
  (epoch, batch), saved in checkpoints, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minivlm import cache
from minivlm.config import RunConfig
from minivlm.encoder import fingerprint_diff, spec_of
from minivlm.records import Record, load_records
from minivlm.text import IGNORE, TextFormat, encode_sample


def open_cache(cfg: RunConfig, tokens: int | None = None, width: int | None = None) -> tuple[dict, cache.CacheIndex]:
    """Validate the cache before anything else: complete, published, expected T/D, same encoder spec."""
    cache_dir = Path(cfg.cache.dir)
    manifest = cache.load_manifest(cache_dir)
    fields = manifest.get("fingerprint_fields", {})
    wrong = fingerprint_diff(spec_of(cfg.encoder), fields)
    if wrong:
        k = wrong[0]
        raise ValueError(f"cache {cache_dir} was embedded with encoder.{k}={fields[k]!r}, the config asks for "
                         f"{spec_of(cfg.encoder)[k]!r}; re-embed into another cache.dir or fix the config")
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
    records: list[Record]
    locations: list[tuple[int, int] | None]   # (shard, row) per record, None for text-only
    dropped: int                               # records whose image is not in the cache


def join(records: list[Record], index: cache.CacheIndex) -> Split:
    kept, locs, dropped = [], [], 0
    for r in records:
        if r.image is None:
            kept.append(r)
            locs.append(None)
        elif r.image in index.locations:
            kept.append(r)
            locs.append(index.locations[r.image])
        else:
            dropped += 1
    return Split(kept, locs, dropped)


def load_splits(cfg: RunConfig, index: cache.CacheIndex) -> tuple[Split, Split]:
    """Train and held-out samples: data.val_records if given, else a hash split by image key."""
    records = load_records(cfg.data.records)
    if cfg.data.val_records:
        train, val = records, load_records(cfg.data.val_records)
    else:
        train = [r for r in records if not (r.image and in_val_split(r.image, cfg.data.val_frac))]
        val = [r for r in records if r.image and in_val_split(r.image, cfg.data.val_frac)]
    return join(train, index), join(val, index)


class CacheBatches(Dataset):
    """dataset[list of indices] -> one padded batch dict (input_ids, labels, images, has_image)."""

    def __init__(self, split: Split, index: cache.CacheIndex, fmt: TextFormat):
        self.split, self.files, self.fmt = split, index.files, fmt
        self.tokens, self.width = index.tokens, index.width
        self._handles: dict[int, h5py.Dataset] = {}
        self._pid = None

    def __len__(self):
        return len(self.split.records)

    def _dataset(self, shard: int) -> h5py.Dataset:
        if self._pid != os.getpid():  # first use in this process: never reuse a handle from another one
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.files[shard], "r")["embeddings"]
        return self._handles[shard]

    def close(self):
        for ds in self._handles.values():
            ds.file.close()
        self._handles = {}

    def shard_order(self, indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: self.split.locations[i] or (-1, i))

    def __getitem__(self, indices: list[int]) -> dict:
        B = len(indices)
        images = torch.zeros(B, self.tokens, self.width, dtype=torch.float16)   # (B, T, D)
        view = images.numpy()
        seqs, has_image = [], torch.zeros(B, dtype=torch.bool)
        for b, i in enumerate(indices):
            loc = self.split.locations[i]
            if loc is not None:
                self._dataset(loc[0]).read_direct(view[b], np.s_[loc[1]])
                has_image[b] = True
            enc = encode_sample(self.fmt, self.split.records[i], loc is not None)
            if enc is None:
                raise ValueError(f"{self.split.records[i].where}: prompt longer than tokenizer.max_len="
                                 f"{self.fmt.max_len}; raise tokenizer.max_len")
            seqs.append(enc)
        L = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((B, L), self.fmt.pad_id, dtype=torch.long)                # (B, L)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)                            # (B, L)
        for b, (ids, lab) in enumerate(seqs):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, :len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "labels": labels, "images": images, "has_image": has_image}


class BatchSampler:
    """Deterministic shuffled batches per (seed, epoch), partitioned across ranks, resumable mid-epoch.

    Every rank gets the same number of batches (the tail that does not divide evenly is dropped), so
    DDP ranks never wait on a collective another rank will not reach.
    """

    def __init__(self, dataset: CacheBatches, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        per_rank = len(self.dataset) // self.world_size
        return per_rank // self.batch_size if self.shuffle else -(-per_rank // self.batch_size)

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        mine = order[self.rank:n - n % self.world_size:self.world_size] if self.world_size > 1 else order
        bs = self.batch_size
        return [self.dataset.shard_order(mine[i:i + bs]) for i in range(0, len(self) * bs, bs)]

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start:]


def make_loader(dataset: CacheBatches, sampler: BatchSampler, num_workers: int, device: str) -> DataLoader:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers tokenize; no nested thread pools
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                      pin_memory=device.startswith("cuda"), persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers else None)
