"""One cache shard file (format 2): the only code that writes its rows or reads them back.

Layout of `shards/shard-NNNNN.h5` (n rows, m images; n = m unless images are tiled):
- `embeddings` (n, T, D): each row's T tokens of width D as the codec stores them, in one contiguous
  (unchunked, unfiltered) HDF5 dataset. Row i is `T * D * itemsize` bytes at `dset.id.get_offset() + i *
  T * D * itemsize` (h5py's public API); plain h5py reads the same bytes with `f["embeddings"][i]`. A row is
  one image, or one tile of a tiled image (`encoder.tiles`, minivlm.embedding.tiles).
- `scales` (n, T) float32, 8-bit codecs only: one scale per token of each row (value = stored * scale).
- `checksums` (n,): the checksum of row i's stored bytes, its `embeddings` row then its `scales` row, by the
  algorithm the `checksum` attribute names: "xxh3_64" (uint64: XXH3_64bits, seed 0, as the `xxhash`
  package's `xxh3_64_intdigest` gives it), or "crc32" (uint32: zlib's CRC-32) in shards written before
  xxh3_64 (minivlm of 2026-12-03 and earlier).
- `keys` (m,) utf-8: the key of each image, in row order.
- `tiles` (m, 5) int32, only where some image is not one row with grid (1, 1): image j's tile count, grid rows,
  grid cols, and its height and width in pixels (as decoded). Image j's tiles are the consecutive rows from `tiles[:j, 0].sum()` on, in its policy's order
  (split: the grid row by row, then the global image; anyres: the base image, then the grid row by row).
  Without it, image j is row j with grid (1, 1): a shard of untiled images is byte for byte what it was
  before tiles.
- attributes: `format_version` (2), `codec`, `checksum`, `tokens` (T), `width` (D), `n_rows` (n),
  `fingerprint` (the encoder's fingerprint as JSON) and `fingerprint_id`, `shard_index`, `plan` (hash of the
  planned keys), `failures` (JSON: the shard's images that could not be embedded), `complete`.

Codecs (`cache.dtype`, part of the fingerprint):
- `float16` (default): `embeddings` <f2.
- `bfloat16`: `embeddings` <u2 holding the bfloat16 bits (HDF5 has no bfloat16): value = float32 of bits << 16.
  Exact for towers that compute in bf16.
- `int8`: scale = max|x| / 127 over each token, stored = round(x / scale) in [-127, 127].
- `float8_e4m3`: scale = max|x| / 448 over each token, stored = x / scale as OCP FP8 E4M3 (`e4m3fn`) bits, <u1.
  The 8-bit codecs take half the bytes of float16, plus 4 bytes a token.

Design choices:
- A shard is built in memory and published as plain bytes (temp name, fsync, `os.replace`): a published
  shard is complete by construction and never changes, so readers need no HDF5 call per row.
- Contiguous rows: a shuffled read is one read of exactly the row's bytes (and its scales) at an offset
  found by arithmetic. There is no chunk index to walk and no compression: CLIP activations barely
  compress (gzip: ~40x the write time for ~10 %).
- `RowReader` copies stored rows out of a read-only mapping of each shard (read ahead whole on first use:
  an epoch reads every row) when the cache fits in half the available memory, else with one `pread` per
  row; both release the GIL. A mapping's pages are faulted in as rows first touch them (minor faults on
  cached file pages). Populating a whole shard on its first read (madvise MADV_POPULATE_READ) was tried:
  nothing measurable in bench P3, and each shard's full size in the run's RSS (P5). Rows are decoded on the
  training device (`Codec.decode`), so an 8-bit cache moves 8-bit rows to it.
- Every row read is checked against its checksum, so a corrupt row stops a run naming shard, row and key
  before it reaches the model; `--verify` names every such row. The check runs in the loader's reader
  threads, so it must not be their ceiling: xxh3_64 hashes ~45 GB/s on one core (~6 us of CPU a 196x768
  float16 row) where zlib's CRC-32 does ~4 GB/s (~72 us, which held the loader to a third of a bare
  memmap's rows/s); both release the GIL on a row that large (xxhash >= 4.0 above 64 KiB, zlib above
  5 KiB), and on the demo's 2 KB row the check costs ~0.15 us. Each shard names its algorithm, so a cache
  written with CRC-32 still verifies and trains (its shards may even mix with new ones after an embed run
  resumed by this minivlm), and `upgrade_shard` rewrites it with xxh3_64 by copying bytes.
- A reader opens a shard on first use; a shard replaced since its header was read (re-embedded or
  upgraded under a running job) is refused naming it, never read at the old header's offsets.
"""
from __future__ import annotations

import json
import mmap
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
import xxhash

from minivlm.config import CACHE_DTYPES, RunFailed
from minivlm.fileio import atomic_write_bytes, reading

FORMAT_VERSION = 2
REDO = "delete the shard and rerun stages/embed.py to re-embed it"
UPGRADE = "upgrade the cache in place with `python stages/embed.py --config <config> --upgrade` (copies bytes, no encoder)"

_STORED = {"float16": "<f2", "bfloat16": "<u2", "int8": "i1", "float8_e4m3": "u1"}   # `embeddings` dtype
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8, "float8_e4m3": torch.float8_e4m3fn}
_LIMIT = {"int8": 127.0, "float8_e4m3": 448.0}                                       # scaled codecs: |stored| max
assert set(_STORED) == set(CACHE_DTYPES)

# Row checksums a shard's `checksum` attribute may name: (the `checksums` dtype, the digest of one row's bytes).
CHECKSUMS = {"xxh3_64": (np.dtype("<u8"), xxhash.xxh3_64_intdigest), "crc32": (np.dtype("<u4"), zlib.crc32)}
CHECKSUM = "xxh3_64"  # what new shards store


@dataclass(frozen=True)
class Codec:
    """How one image's (T, D) rows are stored: `encode` features into stored bytes, `decode` them back."""
    name: str
    tokens: int
    width: int

    @property
    def stored(self) -> np.dtype:
        return np.dtype(_STORED[self.name])

    @property
    def scaled(self) -> bool:
        return self.name in _LIMIT

    @property
    def values_bytes(self) -> int:
        return self.tokens * self.width * self.stored.itemsize

    @property
    def scales_bytes(self) -> int:
        return 4 * self.tokens if self.scaled else 0

    @property
    def row_bytes(self) -> int:
        return self.values_bytes + self.scales_bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) features -> (B, row_bytes) uint8 stored rows, on x's device."""
        B = len(x)
        if not self.scaled:
            return x.to(_TORCH[self.name]).contiguous().view(torch.uint8).reshape(B, -1)
        x = x.float()
        scale = x.abs().amax(-1, keepdim=True) / _LIMIT[self.name]                # (B, T, 1)
        y = (x / torch.where(scale > 0, scale, 1.0)).clamp(-_LIMIT[self.name], _LIMIT[self.name])
        q = y.round().to(torch.int8) if self.name == "int8" else y.to(torch.float8_e4m3fn)  # (B, T, D)
        return torch.cat([q.view(torch.uint8).reshape(B, -1), scale.reshape(B, -1).view(torch.uint8)], 1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, row_bytes) uint8 stored rows -> (B, T, D) on rows' device: float16 / bfloat16 as stored,
        float32 for the 8-bit codecs."""
        B, T, D = len(rows), self.tokens, self.width
        values = rows[:, :self.values_bytes].contiguous().view(_TORCH[self.name]).view(B, T, D)
        if not self.scaled:
            return values
        scale = rows[:, self.values_bytes:].contiguous().view(torch.float32).view(B, T, 1)
        return values.float() * scale


def checksums(rows, algorithm: str = CHECKSUM) -> np.ndarray:
    """(n,) `algorithm` checksums of n stored rows (a (n, row_bytes) uint8 array, or a list of its rows): what
    the writer stores and every read, `--verify` and the upgrade check."""
    dtype, digest = CHECKSUMS[algorithm]
    return np.fromiter(map(digest, rows), dtype, len(rows))


def write_shard(path: Path, rows: np.ndarray, codec: Codec, keys: list[str], *, fingerprint: str,
                fingerprint_id: str, shard_index: int, plan: str, failures: list[tuple[str, ...]],
                tiles: np.ndarray | None = None) -> None:
    """Publish one shard atomically. `rows`: (n, row_bytes) uint8 stored rows (`Codec.encode`), each image's
    rows consecutive in the order of `keys`; `tiles`: (m, 5) per image its tile count, grid rows, grid cols,
    height and width
    (None: one row and grid (1, 1) each); `fingerprint`: the encoder fingerprint as JSON; `failures`: the
    shard's failed images as (key, reason), or (key, reason, "file row N") for an image inside a file.

    The HDF5 file is built in memory and written as plain bytes: a full disk is then an ordinary write error
    caught before anything is published, never h5py closing a half-written file (which can crash the
    interpreter after ENOSPC)."""
    n, T, D = len(rows), codec.tokens, codec.width
    tiles = None if tiles is None or (tiles[:, :3] == 1).all() else np.asarray(tiles, np.int32)
    assert rows.dtype == np.uint8 and rows.shape == (n, codec.row_bytes)
    assert len(keys) == n if tiles is None else tiles.shape == (len(keys), 5) and tiles[:, 0].sum() == n
    with h5py.File(path.name, "w", driver="core", backing_store=False) as f:
        f.create_dataset("embeddings", data=rows[:, :codec.values_bytes].view(codec.stored).reshape(n, T, D))
        if codec.scaled:
            f.create_dataset("scales", data=np.ascontiguousarray(rows[:, codec.values_bytes:]).view("<f4"))
        f.create_dataset("checksums", data=checksums(rows))
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        if tiles is not None:
            f.create_dataset("tiles", data=tiles)
        f.attrs.update(format_version=FORMAT_VERSION, codec=codec.name, checksum=CHECKSUM, tokens=T, width=D,
                       n_rows=n, fingerprint=fingerprint, fingerprint_id=fingerprint_id, shard_index=shard_index,
                       plan=plan, failures=json.dumps([dict(zip(("key", "reason", "source"), x)) for x in failures]),
                       complete=True)
        f.flush()
        image = f.id.get_file_image()
    atomic_write_bytes(path, image)


class FormatOne(ValueError):
    """A shard written before format 2 (one fletcher32 chunk per float16 row): `upgrade_shard` converts it."""


@dataclass(frozen=True)
class ShardInfo:
    """A published shard's header: where its rows are, their checksums, and the facts the cache checks."""
    path: Path
    codec: Codec
    n_rows: int
    values_at: int              # file offset of row 0's stored values
    scales_at: int              # file offset of row 0's scales (0 without scales)
    checksum: str               # the algorithm of `checksums` (a key of CHECKSUMS)
    checksums: np.ndarray       # (n,) its dtype
    file_id: tuple[int, int]    # (st_dev, st_ino) of the file this header was read from
    attrs: dict                 # fingerprint, fingerprint_id, shard_index, plan, failures (decoded)
    keys: list[str] | None      # (m,) read when asked for
    tiles: np.ndarray | None    # (m, 5) int64: tile count, grid rows, grid cols, height, width per image; None:
                                # one row, grid (1, 1) each

    @property
    def n_images(self) -> int:
        return self.n_rows if self.tiles is None else len(self.tiles)

    @property
    def first_rows(self) -> np.ndarray:
        """(m,) int64: each image's first row."""
        if self.tiles is None:
            return np.arange(self.n_rows, dtype=np.int64)
        return np.concatenate([[0], np.cumsum(self.tiles[:-1, 0])]).astype(np.int64)

    def key_at(self, row: int) -> str:
        """The key of the image that row `row` belongs to (keys read)."""
        return self.keys[row if self.tiles is None else int(np.searchsorted(self.first_rows, row, "right")) - 1]

    @property
    def end(self) -> int:
        """Bytes the file must hold for every row to be readable."""
        c = self.codec
        return max(self.values_at + self.n_rows * c.values_bytes, self.scales_at + self.n_rows * c.scales_bytes)


def _contiguous_at(path: Path, ds: h5py.Dataset, dtype: str, shape: tuple) -> int:
    """File offset of a dataset stored as raw contiguous bytes of `dtype` and `shape`, or a one-line error."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    at = ds.id.get_offset()
    if ds.chunks is not None or ds.dtype != np.dtype(dtype) or ds.shape != shape or \
            (nbytes and (at is None or ds.id.get_storage_size() != nbytes)):
        raise ValueError(f"{path}: {ds.name[1:]} is not stored as contiguous {np.dtype(dtype)} {shape} (chunks "
                         f"{ds.chunks}, dtype {ds.dtype}, shape {ds.shape}); {REDO}")
    return int(at or 0)


def read_info(path: str | Path, keys: bool = False) -> ShardInfo:
    """Open a published shard's header (and its keys if asked), checking that it is complete and that its
    rows are where format 2 puts them; any other file is a one-line error naming it."""
    path = Path(path)
    with reading(path, REDO):
        st = os.stat(path)
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format_version") == 1:
                raise FormatOne(f"{path}: a format-1 shard; {UPGRADE}")
            if a.get("format_version") != FORMAT_VERSION or a.get("codec") not in _STORED:
                raise ValueError(f"{path}: not a format-{FORMAT_VERSION} shard (format_version "
                                 f"{a.get('format_version')}, codec {a.get('codec')}); {REDO}")
            n = int(a["n_rows"])
            if not a.get("complete", False) or len(f["embeddings"]) != n:
                raise ValueError(f"{path}: incomplete shard; {REDO}")
            codec = Codec(str(a["codec"]), int(a["tokens"]), int(a["width"]))
            values_at = _contiguous_at(path, f["embeddings"], codec.stored, (n, codec.tokens, codec.width))
            scales_at = _contiguous_at(path, f["scales"], "<f4", (n, codec.tokens)) if codec.scaled else 0
            algorithm = a.get("checksum")
            if algorithm not in CHECKSUMS:
                raise ValueError(f"{path}: row checksum {algorithm!r} is not one this minivlm knows "
                                 f"({', '.join(CHECKSUMS)}); update minivlm, or {REDO}")
            checksums = f["checksums"][...]
            if checksums.shape != (n,) or checksums.dtype != CHECKSUMS[algorithm][0]:
                raise ValueError(f"{path}: checksums are not (n_rows,) {CHECKSUMS[algorithm][0]} as {algorithm} "
                                 f"needs (shape {checksums.shape}, dtype {checksums.dtype}); {REDO}")
            m, tiles = len(f["keys"]), f["tiles"][...].astype(np.int64) if "tiles" in f else None
            if (m != n) if tiles is None else (tiles.shape != (m, 5) or (tiles < 1).any() or tiles[:, 0].sum() != n):
                raise ValueError(f"{path}: its {m} keys and their tiles do not make its {n} rows; {REDO}")
            attrs = {k: a[k] if isinstance(a[k], str) else a[k].item() for k in
                     ("fingerprint", "fingerprint_id", "shard_index", "plan")}
            attrs["failures"] = json.loads(a["failures"])
            names = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][...]] if keys else None
    return ShardInfo(path, codec, n, values_at, scales_at, algorithm, checksums, (st.st_dev, st.st_ino), attrs, names,
                     tiles)


def corrupt_row(path: Path, row: int, key: str, algorithm: str) -> str:
    """The one line for a row whose bytes fail their checksum (training and --verify say the same)."""
    return f"{path}: row {row} (image {key}) fails its {algorithm} checksum: the shard is corrupt; {REDO}"


def key_of(path: Path, row: int) -> str:
    """The key of the image that row `row` of a shard belongs to (for the message about that row)."""
    return read_info(path, keys=True).key_at(row)


def fits_in_memory(paths) -> bool:
    """Whether the shards take under half the memory available now (Linux; elsewhere: no)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return hasattr(os, "posix_fadvise") and sum(os.path.getsize(p) for p in paths) < avail / 2
    except (OSError, StopIteration):
        return False


class RowReader:
    """Stored rows of a cache's shards by (shard, row), each checked against its shard's checksum.

    `mapped`: copy rows out of read-only mappings of the shards (None: when they fit in half the available
    memory), else one `pread` per row. Thread-safe: the loader's reader threads share one."""

    def __init__(self, shards: Sequence[ShardInfo], mapped: bool | None = None, check: bool = True):
        assert shards and len({s.codec for s in shards}) == 1, "one codec and shape per cache"
        self.shards, self.codec, self.check = tuple(shards), shards[0].codec, check
        self.mapped = fits_in_memory([s.path for s in shards]) if mapped is None else mapped
        self._values_at = np.array([s.values_at for s in shards], np.int64)
        self._scales_at = np.array([s.scales_at for s in shards], np.int64)
        # Every shard's checksums in one array (row r of shard s at _first[s] + r), and each shard's algorithm:
        # one per cache, unless an embed run was resumed by a newer minivlm.
        self._first = np.cumsum([0] + [s.n_rows for s in shards[:-1]])
        self._want = np.concatenate([s.checksums.astype(np.uint64) for s in shards])
        self._algorithms = sorted({s.checksum for s in shards})
        self._algorithm = np.array([self._algorithms.index(s.checksum) for s in shards])
        self._source: list = [None] * len(shards)   # shard -> its mapped bytes or its fd, once opened
        self._files: list = []                      # what close() closes
        self._opening = threading.Lock()

    def _sources(self, shard: np.ndarray) -> list:
        """Per row: its shard's bytes (mapped) or file descriptor, None for -1 (text-only); opens on first use."""
        with self._opening:
            for s in set(shard.tolist()) - {-1}:
                if self._source[s] is None:
                    self._source[s] = self._open(s)
        return [self._source[s] if s >= 0 else None for s in shard.tolist()]

    def _open(self, s: int):
        info = self.shards[s]
        f = open(info.path, "rb", buffering=0)
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != info.file_id:
            f.close()
            raise ValueError(f"{info.path} was replaced after this run read its header (re-embedded or upgraded "
                             f"while the cache was being read?); restart the run")
        size = st.st_size
        if size < info.end:
            f.close()
            raise ValueError(f"{info.path}: {size} bytes, but its rows reach byte {info.end} (truncated shard?); "
                             f"run stages/embed.py --verify")
        if not self.mapped:
            self._files.append(f)
            return f.fileno()
        with f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # published shards never change
        self._files.append(m)
        return np.frombuffer(m, np.uint8)

    def _copy(self, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the stored bytes of row[i] of shard[i] (values, then scales); zeros where shard[i] is -1."""
        c, text_only = self.codec, shard < 0
        out[text_only] = 0
        sources = self._sources(shard)
        s = np.where(text_only, 0, shard)
        parts = [(0, c.values_bytes, self._values_at[s] + row * c.values_bytes)]
        if c.scaled:
            parts.append((c.values_bytes, c.scales_bytes, self._scales_at[s] + row * c.scales_bytes))
        for lo, n, at in parts:
            if self.mapped:  # a NumPy copy of a row releases the GIL, as pread does
                for b, src, o in zip(range(len(out)), sources, at.tolist()):
                    if src is not None:
                        out[b, lo:lo + n] = src[o:o + n]
                continue
            flat = memoryview(out.reshape(-1))  # slicing a memoryview: a third of a NumPy row view
            for a, src, o, r in zip(range(lo, len(out) * c.row_bytes, c.row_bytes), sources, at.tolist(), row.tolist()):
                if src is not None and os.preadv(src, [flat[a:a + n]], o) != n:
                    path = self.shards[self._source.index(src)].path
                    raise ValueError(f"{path}: row {r} (bytes {o}-{o + n}) is cut short (truncated shard?); "
                                     f"run stages/embed.py --verify")

    def read(self, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> None:
        """Fill `out` ((B, row_bytes) uint8, C-contiguous) with the stored rows (shard[i], row[i]); zeros where
        shard[i] is -1 (text-only samples). A row that fails its checksum stops the run naming it."""
        self._copy(shard, row, out)
        if self.check:
            self.check_rows(shard, row, out)

    def check_rows(self, shard: np.ndarray, row: np.ndarray, rows: np.ndarray) -> None:
        """Stop the run naming the first of `rows` ((B, row_bytes) uint8: the stored rows (shard[i], row[i]),
        anything where shard[i] is -1) whose bytes fail their shard's checksum: what `read` runs on every row."""
        image = shard >= 0
        for k, algorithm in enumerate(self._algorithms):
            ix = np.flatnonzero(image & (self._algorithm[shard] == k))
            got = checksums(rows if len(ix) == len(rows) else [rows[b] for b in ix.tolist()], algorithm)
            bad = ix[got != self._want[self._first[shard[ix]] + row[ix]]]
            if len(bad):
                s, r = int(shard[bad[0]]), int(row[bad[0]])
                path = self.shards[s].path
                raise RunFailed(corrupt_row(path, r, key_of(path, r), algorithm))

    def bad_rows(self, s: int, block: int = 64) -> list[int]:
        """Rows of shard s whose stored bytes fail their checksum (every row read: `--verify`)."""
        info, bad = self.shards[s], []
        buf = np.empty((block, self.codec.row_bytes), np.uint8)
        for lo in range(0, info.n_rows, block):
            rows = np.arange(lo, min(lo + block, info.n_rows))
            self._copy(np.full(len(rows), s), rows, buf[:len(rows)])
            bad += rows[checksums(buf[:len(rows)], info.checksum) != info.checksums[rows]].tolist()
        return bad

    def close(self) -> None:
        self._source = [None] * len(self.shards)  # a mapping closes once no array of it is left
        for f in self._files:
            f.close()
        self._files = []


def upgrade_shard(path: Path) -> bool:
    """Rewrite a shard an older minivlm wrote as the shard this one writes for the same images, by copying its
    rows' bytes, published atomically over it; False if it is current already. Each row is checked on the way
    by the checksum it was stored with: fletcher32 (format 1) or the shard's `checksum` (crc32)."""
    with reading(path, REDO), h5py.File(path, "r") as f:
        a = f.attrs
        version, algorithm, complete = a.get("format_version"), a.get("checksum"), a.get("complete", False)
    if version == FORMAT_VERSION and algorithm == CHECKSUM:
        return False
    if version == FORMAT_VERSION:
        rows, codec, keys, meta = _rows_checked(path)
    elif version == 1 and complete:
        rows, codec, keys, meta = _rows_of_format_one(path)
    else:
        raise ValueError(f"{path}: neither a complete format-1 shard nor format {FORMAT_VERSION}; {REDO}")
    write_shard(path, rows, codec, keys, **meta)
    return True


def _rows_checked(path: Path) -> tuple[np.ndarray, Codec, list[str], dict]:
    """A format-2 shard's stored rows (n, row_bytes), each checked against its checksum, its codec, keys and
    the rest of what `write_shard` takes."""
    info = read_info(path, keys=True)
    rows = np.empty((info.n_rows, info.codec.row_bytes), np.uint8)
    reader = RowReader([info], mapped=False)
    try:
        reader.read(np.zeros(info.n_rows, np.int64), np.arange(info.n_rows), rows)
    finally:
        reader.close()
    failures = [tuple(x.values()) for x in info.attrs["failures"]]  # key, reason[, source]
    return rows, info.codec, info.keys, {**info.attrs, "failures": failures, "tiles": info.tiles}


def _rows_of_format_one(path: Path) -> tuple[np.ndarray, Codec, list[str], dict]:
    """A format-1 shard's float16 rows as stored rows (n, row_bytes), read through HDF5 so that fletcher32
    checks each one, its codec, keys and the rest of what `write_shard` takes (renamed attributes)."""
    with reading(path, REDO), h5py.File(path, "r") as f:
        a = f.attrs
        ds = f["embeddings"]
        keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][...]]
        codec = Codec("float16", int(a["tokens"]), int(a["width"]))
        rows = np.empty((len(ds), codec.tokens, codec.width), np.float16)      # (n, T, D)
        for i in range(len(ds)):
            try:
                ds.read_direct(rows[i], np.s_[i])
            except OSError:
                raise ValueError(f"{path}: row {i} (image {keys[i]}) fails its fletcher32 checksum: the shard "
                                 f"is corrupt; {REDO}") from None
        failures = [tuple(x.values()) for x in json.loads(a["failures"])]  # key, reason[, source]
        meta = dict(fingerprint=str(a["encoder"]), fingerprint_id=str(a["fingerprint"]),
                    shard_index=int(a["shard_index"]), plan=str(a["plan"]), failures=failures)
    return rows.view(np.uint8).reshape(len(rows), -1), codec, keys, meta
