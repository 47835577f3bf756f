"""The measured loops. Each returns rates per timed window (items/s); figures are their medians.

Design choices:
- Every train loop is the library's own: `data.load_data` + `trainer.build_model` + `train_step`. The cached
  loop reads through `Loader(Samples, BatchSampler)`; the baselines swap only the batch source
  (RAM tensor; JPEG decode in workers + live encoder) and see the same batches in the same order, with
  the same pre-tokenized text (`text.collate`): only the images' path differs.
- Fixed step counts: each timed window opens its batch source, runs `warmup` untimed steps (workers
  starting, pipeline filling), then `steps` timed ones; each window is one rate. The caller interleaves
  the variants round by round, so a burst of load from another user hits numerator and baseline alike.
- The raw read baseline copies the same rows, in the same order, from a NumPy memmap of the same stored
  bytes into a fresh (B, row_bytes) array per batch, in one process. Rows are read through the library
  only (`Samples.rows`, `shard.RowReader`): no row size or offset is computed here.
- "Cold" reads evict the files from the page cache with posix_fadvise(DONTNEED) (no root, no effect on
  other users' files) and re-open them; `resident_fraction` (mincore) checks the eviction worked.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import mmap
import os
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.encoder import decode_image, features, load_image, preprocess, tile_pixels
from minivlm.embedding.shard import Codec, RowReader
from minivlm.formats import sources, tars
from minivlm.formats.records import resolve_image
from minivlm.training.data import BatchSampler, Loader, Samples, _groups, load_data, load_splits, to_device
from minivlm.training.trainer import amp_dtype, batch_layout, build_model, train_step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def windows(step, warmup: int, steps: int, repeats: int, device: str) -> list[float]:
    """Run `step()` (returns items done) warmup times untimed, then `repeats` timed windows of `steps` calls."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        sync(device)
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            n += step()
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


class Forever:
    """Batches from a loader over a BatchSampler from `epoch` on, epoch after epoch; `close()` stops its
    workers (DataLoader) or reader threads (Loader)."""

    def __init__(self, loader, sampler: BatchSampler, epoch: int = 0):
        self.loader, self.sampler, self.epoch, self.it = loader, sampler, epoch, None

    def __next__(self):
        while True:
            if self.it is None:
                self.sampler.set_position(self.epoch, 0)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def close(self):
        if hasattr(self.it, "close"):  # the Loader's generator: its reader threads stop
            self.it.close()
        self.it = self.loader = None
        gc.collect()  # a DataLoader's workers stop when its iterator is collected


class CpuMeter:
    """CPU time other processes used since start, as a share of all cores (steal included): the noise
    a shared machine adds. Own time counts this process and its waited-for children (the live loops'
    decode workers, the P5 children)."""

    def __init__(self):
        self.wall, self.busy, self.own = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return float("nan")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def foreign_pct(self) -> float:
        wall = time.monotonic() - self.wall
        foreign = (self._busy() - self.busy) - (self._own() - self.own)
        return max(0.0, 100.0 * foreign / (wall * (os.cpu_count() or 1))) if wall > 0 and foreign == foreign else 0.0


# ---- the train loops (P1, P2) -------------------------------------------------------------------------
# A source yields device batches from the batches of epoch `epoch` on, and is closed after its window.
# Every window opens its source afresh, so sources can be interleaved round by round without one's
# workers decoding ahead while another is timed.

class Setup:
    """load_data + one model/optimizer shared by every loop of a workload (they only differ in the batch source)."""

    def __init__(self, cfg, device: str):
        self.cfg, self.device = cfg, device
        self.data = load_data(cfg, Dist(device=device), packing=batch_layout(cfg, device)[0])
        self.dtype = amp_dtype(cfg.train, device)
        self._model = None

    def model(self):
        if self._model is None:
            torch.manual_seed(self.cfg.train.seed)
            model, opt, scaler = build_model(self.cfg, self.data, self.device, init=False)
            model.train()
            self._model = (model, opt, scaler)
        return self._model

    def train_images(self) -> list[tuple[str, ...]]:
        """Each training sample's image keys (the live loops decode them): the records, as load_data joined them."""
        return [r.images for r in load_splits(self.cfg, self.data.index)[0].records]

    def sampler(self) -> BatchSampler:
        """A sampler with the training sampler's order (same seed, same batches)."""
        return BatchSampler(self.data.train, self.cfg.train.batch_size, self.cfg.train.seed)

    def close(self):
        self._model = None
        gc.collect()


def train_window(setup: Setup, source, warmup: int, steps: int) -> float:
    """samples/s of train_step over `steps` batches of `source`, after `warmup` untimed ones."""
    model, opt, scaler = setup.model()
    tc, device = setup.cfg.train, setup.device

    def step():
        return train_step(model, opt, [next(source)], tc, scaler, setup.dtype, device).samples

    try:
        return windows(step, warmup, steps, 1, device)[0]
    finally:
        source.close()


class CachedSource:
    """The stage-2 path: Loader(Samples, BatchSampler) -> to_device (rows decoded on the device)."""

    def __init__(self, setup: Setup, epoch: int):
        sampler = setup.sampler()
        self.device, self.codec = setup.device, setup.data.codec
        self.it = Forever(Loader(setup.data.train, sampler, setup.cfg.train.num_workers), sampler, epoch)

    def __next__(self):
        return to_device(next(self.it), self.device, self.codec)

    def close(self):
        self.it.close()


class RamBatches:
    """Every image's stored rows (its tiles) in one RAM tensor (rows, row_bytes), gathered per batch: the in-memory
    bound (decoded on the device like the cached path's)."""

    def __init__(self, ds: Samples):
        self.ds = ds
        self.rows = torch.cat([ds.rows(range(a, min(a + 256, len(ds)))) for a in range(0, len(ds), 256)])

    def batch(self, indices: list[int]) -> dict:
        text = self.ds.text_batches([indices])[0]  # the library's own text path
        sp = self.ds.split
        count = sp.layout[:, 0]                                      # (M,) each image's rows (tiles)
        slots = sp.slots(text["index"])                              # the batch's images, as laid out
        c = count[slots]
        at = np.arange(c.sum()) + np.repeat((np.cumsum(count) - count)[slots] - (np.cumsum(c) - c), c)
        return {**text, "rows": self.rows.index_select(0, torch.from_numpy(at)), **self.ds.placed(text["index"])}


class RamSource:
    """The same batches gathered from RamBatches in this process (no workers, no reads, no tokenizing)."""

    def __init__(self, setup: Setup, ram: RamBatches, epoch: int):
        self.setup, self.ram, self.sampler, self.epoch = setup, ram, setup.sampler(), epoch
        self.batches = iter(self.sampler.batches(epoch))

    def __next__(self):
        ix = next(self.batches, None)
        if ix is None:
            self.epoch += 1
            self.batches = iter(self.sampler.batches(self.epoch))
            ix = next(self.batches)
        return to_device(self.ram.batch(ix), self.setup.device, self.setup.data.codec)

    def close(self):
        pass


class LiveBatches(Dataset):
    """The seed-style source: dataset[list of indices] decodes + preprocesses the JPEGs (in a worker)."""

    def __init__(self, ds: Samples, images: list[tuple[str, ...]], processor, image_root: str, max_pixels: int):
        self.ds, self.images, self.processor, self.root = ds, images, processor, image_root
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict:
        text = self.ds.text_batches([indices])[0]
        pixels = [preprocess(self.processor, load_image(resolve_image(self.root, k), self.max_pixels))
                  for i in text["index"] for k in self.images[i]]  # the batch's images, as laid out
        return {**text, "pixels": torch.stack(pixels) if pixels else None}


class LiveSource:
    """Decode in workers, run the encoder every step: batched, or one image at a time as the seed does."""

    def __init__(self, setup: Setup, enc, epoch: int, per_image: bool):
        cfg, self.device, self.enc, self.per_image = setup.cfg, setup.device, enc, per_image
        ds = LiveBatches(setup.data.train, setup.train_images(), enc.processor, cfg.data.image_root,
                         cfg.encoder.max_image_pixels)
        sampler = setup.sampler()
        w = cfg.encoder.num_workers  # decode workers, as stage 1 uses
        loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=w, pin_memory=self.device.startswith("cuda"),
                            persistent_workers=w > 0, prefetch_factor=4 if w else None)
        self.it = Forever(loader, sampler, epoch)

    def __next__(self):
        enc, device = self.enc, self.device
        b = next(self.it)
        pixels, images = b.pop("pixels"), None
        if pixels is not None:  # (K, T, D)
            feats = torch.cat([features(enc, p[None]) for p in pixels]) if self.per_image else features(enc, pixels)
            images = feats.to(device, torch.float16)
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        b["images"] = images
        return b

    def close(self):
        self.it.close()


def layout_shares(ds: Samples, batches) -> tuple[float, float]:
    """As `Samples` lays these micro-batches out: the share of the positions they compute that are padding, and
    the share of them packed (with positions; the others go as padded batches, the same work as packing off)."""
    positions = padding = packed = 0
    laid = [b for group in _groups(batches, len, Loader.TEXT_SAMPLES) for b in ds.text_batches(group)]
    for b in laid:
        R, L = b["input_ids"].shape
        positions += R * L
        padding += R * L - ds.positions(b["index"])
        packed += "positions" in b
    return padding / positions, packed / len(laid)


# ---- P3: the read path against raw bytes --------------------------------------------------------------

def raw_copy(ds: Samples, manifest: dict, out: Path) -> tuple[Path, np.ndarray]:
    """Every cached row's stored bytes, shard after shard, as one flat (n, row_bytes) uint8 .npy file read
    through the library's reader; returns it and each shard's first row in it."""
    reader = ds.reader
    first = np.cumsum([0] + [s.n_rows for s in reader.shards])
    marker = out.with_suffix(".json")
    key = {"fingerprint_id": manifest["fingerprint_id"], "written_at": manifest["written_at"], "rows": int(first[-1])}
    if out.is_file() and marker.is_file() and marker.read_text() == repr(key):
        return out, first
    out.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # the marker is written last: a half-written copy is never trusted
    mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(int(first[-1]), ds.row_bytes))
    for s, info in enumerate(reader.shards):
        for a in range(0, info.n_rows, 256):
            rows = np.arange(a, min(a + 256, info.n_rows))
            reader.read(np.full(len(rows), s), rows, mm[first[s] + a:first[s] + a + len(rows)])
    mm.flush()
    del mm
    marker.write_text(repr(key))
    return out, first


def row_batches(ds: Samples, batch_size: int, seed: int, n_rows: int, skip_rows: int = 0) -> list[list[int]]:
    """The training sampler's batches (epoch after epoch) holding n_rows image rows, after skip_rows."""
    sampler = BatchSampler(ds, batch_size, seed)
    out, seen, epoch = [], 0, 0
    while seen < skip_rows + n_rows:
        for ix in sampler.batches(epoch):
            rows = ds.image_rows(np.asarray(ix))
            if seen >= skip_rows:
                out.append(ix)
            seen += rows
            if seen >= skip_rows + n_rows:
                break
        epoch += 1
    return out


def count_rows(ds: Samples, batches) -> int:
    return sum(ds.image_rows(np.asarray(ix)) for ix in batches)


def locations(ds: Samples, ix) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of every image of samples `ix`, in order: what `Samples.rows` reads."""
    slots = ds.split.slots(np.asarray(ix, np.int64))
    return ds.split.shard[slots], ds.split.row[slots]


def _rows_per_s(ds: Samples, batches, read_row) -> float:
    """rows/s of read_row(dst, shard, row) over the batches' image rows, into a fresh (K, row_bytes) array per
    batch."""
    t0 = time.perf_counter()
    for ix in batches:
        shard, row = locations(ds, ix)
        out = np.empty((len(shard), ds.row_bytes), np.uint8)
        for k, (s, r) in enumerate(zip(shard.tolist(), row.tolist())):
            read_row(out[k], s, r)
    return count_rows(ds, batches) / (time.perf_counter() - t0)


def read_raw(raw: Path, first: np.ndarray, ds: Samples, batches) -> float:
    """rows/s copying the batches' rows from a memmap of the raw copy (opened here)."""
    mm = np.load(raw, mmap_mode="r")

    def copy(dst, s, r):
        dst[:] = mm[first[s] + r]

    return _rows_per_s(ds, batches, copy)  # the mapping closes with this frame


def read_pread(raw: Path, first: np.ndarray, ds: Samples, batches) -> float:
    """rows/s reading the same rows of the raw copy with one pread per row: the raw limit for a reader
    that does not map the file."""
    header = np.load(raw, mmap_mode="r").offset
    fd = os.open(raw, os.O_RDONLY)
    try:
        return _rows_per_s(ds, batches, lambda dst, s, r: os.preadv(
            fd, [memoryview(dst)], header + (first[s] + r) * ds.row_bytes))
    finally:
        os.close(fd)


def read_h5(ds: Samples, batches) -> float:
    """rows/s of h5py's own read of a row's stored values (read_direct), one process: what a reader
    through HDF5 gets."""
    files = [h5py.File(s.path, "r") for s in ds.reader.shards]
    codec = ds.reader.codec
    try:
        values = np.empty((codec.tokens, codec.width), codec.stored)
        return _rows_per_s(ds, batches, lambda dst, s, r: files[s]["embeddings"].read_direct(values, np.s_[r]))
    finally:
        for f in files:
            f.close()


def read_rows(ds: Samples, batches) -> float:
    """rows/s of the library's row reads alone (`Samples.rows`, one batch per call), one thread."""
    t0 = time.perf_counter()
    for ix in batches:
        ds.rows(ix)
    return count_rows(ds, batches) / (time.perf_counter() - t0)


def check_rows(ds: Samples, batches) -> float:
    """rows/s of the per-row checksum check alone (`RowReader.check_rows`, what every checked read runs, by
    each shard's algorithm), over rows already read: measured directly, not as the small difference of two
    read rates."""
    reads = [(*locations(ds, ix), ds.rows(ix).numpy()) for ix in map(np.asarray, batches)]
    t0 = time.perf_counter()
    for shard, row, rows in reads:
        ds.reader.check_rows(shard, row, rows)
    return count_rows(ds, batches) / (time.perf_counter() - t0)


@contextmanager
def reading_as(ds: Samples, mapped: bool, check: bool = True):
    """The same samples read another way: `mapped=False` as a cache bigger than half the free memory is
    (one pread per row, no read-ahead); `check=False` without the per-row checksum."""
    other = Samples(ds.split, RowReader(ds.reader.shards, mapped=mapped, check=check), ds.fmt, text=ds.text)
    try:
        yield other
    finally:
        other.close()


def read_text(ds: Samples, batches) -> float:
    """samples/s of the library's text collation alone, grouped as the Loader groups it."""
    t0 = time.perf_counter()
    for group in _groups(batches, len, Loader.TEXT_SAMPLES):
        ds.text_batches(group)
    return sum(map(len, batches)) / (time.perf_counter() - t0)


def read_loader(ds: Samples, batches, threads: int) -> tuple[float, float]:
    """The library's Loader over these batches: (rows/s over all of them, the first batch included: no
    worker processes to start; seconds to the first batch)."""
    t0 = time.perf_counter()
    it = iter(Loader(ds, batches, threads))
    next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    return count_rows(ds, batches) / (time.perf_counter() - t0), t1 - t0


def read_processes(ds: Dataset, batches, num_workers: int, device: str) -> float:
    """rows/s of a torch DataLoader with worker processes over these batches (first batch excluded)."""
    loader = DataLoader(ds, sampler=batches, batch_size=None, num_workers=num_workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=4 if num_workers else None)
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = sum(len(b["rows"]) for b in it)
    dt = time.perf_counter() - t1
    del it, loader  # an exhausted iterator's workers stop when it is collected
    gc.collect()
    return n / dt


class BatchShapes(Dataset):
    """What the read path returns, without reading or tokenizing: the cost of a process boundary alone
    (why stage 2 reads in threads, not DataLoader worker processes)."""

    def __init__(self, ds: Samples):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict:
        rows = torch.zeros(self.ds.image_rows(np.asarray(indices)), self.ds.row_bytes, dtype=torch.uint8)  # as Samples.rows
        return {"input_ids": torch.zeros(len(indices), 1, dtype=torch.long), "rows": rows}


def evict(paths) -> None:
    """Drop these files' pages from the page cache (clean pages of unmapped files; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths) -> float:
    """Share of the files' pages in the page cache (mincore); -1 where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page, resident, pages = mmap.PAGESIZE, 0, 0
        for p in paths:
            size = os.path.getsize(p)
            if not size:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return -1.0
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
                libc.munmap(ctypes.c_void_p(addr), size)
                if not ok:
                    return -1.0
                resident += sum(v & 1 for v in vec)
                pages += n
            finally:
                os.close(fd)
        return resident / max(pages, 1)
    except (OSError, AttributeError):
        return -1.0


# ---- P4: stage 1 against the encoder alone ------------------------------------------------------------

def decoded_pixels(cfg, processor, n: int) -> torch.Tensor:
    """The first n images of cfg.data.records, decoded and preprocessed once: (n, 3, H, W)."""
    from minivlm.formats.records import image_keys, load_records
    keys = image_keys(load_records(cfg.data.records))[:n]
    return torch.stack([preprocess(processor, load_image(resolve_image(cfg.data.image_root, k),
                                                         cfg.encoder.max_image_pixels)) for k in keys])


def decoded_tiles(cfg, enc, n: int) -> torch.Tensor:
    """The tiles of the first n images of cfg.data.records (enc's policy), decoded, cut and preprocessed once:
    (tiles, 3, S, S)."""
    from minivlm.formats.records import image_keys, load_records
    keys = image_keys(load_records(cfg.data.records))[:n]
    return torch.cat([tile_pixels(enc.processor, enc.tiling, load_image(resolve_image(cfg.data.image_root, k),
                                                                          cfg.encoder.max_image_pixels))[0]
                      for k in keys])


def read_decode_folder(cfg, n: int) -> float:
    """images/s reading and decoding the first n images of cfg's records from the image folder."""
    from minivlm.formats.records import image_keys, load_records
    paths = [resolve_image(cfg.data.image_root, k) for k in image_keys(load_records(cfg.data.records))[:n]]
    t0 = time.perf_counter()
    for p in paths:
        load_image(p, cfg.encoder.max_image_pixels)
    return len(paths) / (time.perf_counter() - t0)


def read_decode_tars(cfg) -> float:
    """images/s reading and decoding every image of cfg's tars: the index pass, then each image by offset."""
    t0, n = time.perf_counter(), 0
    for path in sources.expand(cfg.data.records):
        idx = tars.scan(path)  # the index pass, timed even where this process indexed the tar before
        reader = tars.ImageRows(path, tars.layout(path), idx)
        for row in range(len(idx.keys)):
            for data in reader.images(row):
                decode_image(data, cfg.encoder.max_image_pixels)
                n += 1
    return n / (time.perf_counter() - t0)


def encoder_rate(enc, pixels: torch.Tensor, batch_size: int, device: str) -> float:
    """images/s of the encoder forward alone (`features`) over pre-decoded pixels (already on the device),
    in batches of batch_size."""
    sync(device)
    t0 = time.perf_counter()
    for a in range(0, len(pixels), batch_size):
        features(enc, pixels[a:a + batch_size])
    sync(device)
    return len(pixels) / (time.perf_counter() - t0)


def codec_errors(enc, pixels: torch.Tensor, batch_size: int) -> dict:
    """Each codec's rows against the float16 rows stage 1 stores by default, on the encoder's real output for
    these images: `cache.row_errors` summarised, as `stages/embed.py --compare` reports two caches."""
    feats = torch.cat([features(enc, pixels[a:a + batch_size]).float().cpu() for a in range(0, len(pixels), batch_size)])
    T, D = feats.shape[1:]
    ref = Codec("float16", T, D)
    base = ref.decode(ref.encode(feats))
    out = {}
    for name in ("bfloat16", "int8", "float8_e4m3"):
        codec = Codec(name, T, D)
        out[name] = {"bytes_per_row": codec.row_bytes, "float16_bytes_per_row": ref.row_bytes,
                     **cache.summarize([cache.row_errors(base, codec.decode(codec.encode(feats)))])}
    return out


# ---- model FLOPs (MFU on CUDA; the train step's count is minivlm.training.metrics.flops_per_token) --------------

def encoder_flops_per_image(enc) -> float:
    P = sum(p.numel() for p in enc.model.parameters())
    tokens = (enc.model.config.image_size // enc.model.config.patch_size) ** 2 + 1
    return 2 * P * tokens


# ---- P4-remote: stage 1 from an object store ------------------------------------------------------------

S3_BUCKET = "bench"


@contextmanager
def s3_copy(files: list[Path], latency_s: float, keys: list[str] | None = None):
    """`files` in moto's S3 server (keys: `keys`, else parent folder/name) behind tests/store.py's proxy, which adds
    `latency_s` to every request and counts them. Yields (the proxy, cfg -> the same cfg reading its
    data.records, a file or a brace pattern of those files, from there)."""
    import s3fs
    from store import StoreProxy, moto_s3

    with moto_s3() as port:
        fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", skip_instance_cache=True)
        fs.mkdir(S3_BUCKET)
        for p, key in zip(files, keys or [f"{p.parent.name}/{p.name}" for p in files]):
            fs.put_file(str(p), f"{S3_BUCKET}/{key}")
        proxy = StoreProxy(port, delay_s=latency_s)
        options = {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}

        def in_s3(cfg):
            spec = Path(cfg.data.records)
            return dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, records=f"s3://{S3_BUCKET}/{spec.parent.name}/{spec.name}", storage_options=options))
        try:
            yield proxy, in_s3
        finally:
            proxy.close()
