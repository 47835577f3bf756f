"""The embedding cache on disk: HDF5 shards, the manifest, validation and verification.

Layout of `cache/<name>/` (DESIGN.md "Cache"):
- `shards/shard-NNNNN.h5`: `embeddings` float16 (n, T, D), one row per chunk, uncompressed, fletcher32
  per chunk; `keys` utf-8 (n,); attributes: format version, fingerprint, shard index, plan hash,
  n_rows, complete, and the shard's failed images (so failures survive a resume).
- `manifest.json`: written once every planned shard is published; stage 2 trusts nothing without it.
- `failures.jsonl`: one line per image that could not be embedded, gathered from the shards.

Design choices:
- One row per chunk: a shuffled read touches exactly one row of I/O (DESIGN.md measurements).
- A shard is built in memory, written under a temp name, fsynced, then published with `os.replace`;
  a published shard is complete by construction and never changes.
- h5py reads rows one at a time (`ds[i]` / `read_direct`), never with a list index (150x slower).
- Training bypasses HDF5 for rows: `row_offsets` finds where each row's chunk sits in the file once, and
  stage 2 copies the raw bytes out of a mapped shard, or with `pread` for caches too big for memory (4x
  h5py's per-row speed or more, bench P3). Our chunks are stored unfiltered but for the 4-byte fletcher32
  trailer, so the bytes are the fp16 row; the checksum is checked by `verify` (`stages/embed.py
  --verify`), not per read.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from minivlm.config import RunFailed
from minivlm.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, reading, sha256_file, TMP_SUFFIX

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
REDO_SHARD = "run stages/embed.py --verify, delete the shard and rerun embed"


def shard_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "shards"


def shard_path(cache_dir: str | Path, index: int) -> Path:
    return shard_dir(cache_dir) / f"shard-{index:05d}.h5"


def plan_shards(keys: list[str], shard_size: int) -> list[list[str]]:
    """Sorted unique keys cut into fixed-size shards: the same records always give the same plan."""
    keys = sorted(set(keys))
    return [keys[i:i + shard_size] for i in range(0, len(keys), shard_size)]


def plan_hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def write_shard(path: Path, index: int, keys: list[str], embeddings: np.ndarray,
                failures: list[tuple[str, ...]], fingerprint: str, encoder_json: str, planned: str) -> None:
    """Publish one shard atomically. `embeddings` is float16 (n, T, D) aligned with `keys`; `failures` are
    (key, reason) or, for an image inside a file, (key, reason, "file row N").

    The HDF5 file is built in memory and written as plain bytes: a full disk is then an ordinary write error
    caught before anything is published, never h5py closing a half-written file (which can crash the
    interpreter after ENOSPC)."""
    assert embeddings.dtype == np.float16 and len(keys) == len(embeddings)
    n, T, D = embeddings.shape
    with h5py.File(path.name, "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("embeddings", shape=(n, T, D), dtype="float16",
                              chunks=(1, T, D) if n else None, fletcher32=bool(n))
        if n:
            ds[...] = embeddings
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(format_version=FORMAT_VERSION, fingerprint=fingerprint, encoder=encoder_json, shard_index=index,
                       plan=planned, n_rows=n, tokens=T, width=D,
                       failures=json.dumps([dict(zip(("key", "reason", "source"), f)) for f in failures]), complete=True)
        f.flush()
        image = f.id.get_file_image()
    atomic_write_bytes(path, image)


def open_shard(path: Path) -> h5py.File:
    """Open a published shard read-only, refusing one that is not complete."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: unreadable HDF5 shard ({e}); {REDO_SHARD}") from None
    if not f.attrs.get("complete", False) or f.attrs.get("n_rows", -1) != len(f["embeddings"]):
        f.close()
        raise ValueError(f"{path}: incomplete shard; delete it and rerun stages/embed.py to rewrite it")
    return f


def shard_keys(f: h5py.File) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k for k in f["keys"][...]]


def shard_failures(f: h5py.File) -> list[dict]:
    return json.loads(f.attrs["failures"])


def remove_stale_temps(cache_dir: Path, indices) -> None:
    for i in indices:
        for tmp in shard_dir(cache_dir).glob(shard_path(cache_dir, i).name + "*" + TMP_SUFFIX):
            tmp.unlink(missing_ok=True)


class CacheLock:
    """A POSIX record lock on cache/<name>/.lock: exclusive for a single run, shared among the ranks of one torchrun.

    A POSIX lock (`lockf`), not `flock`: it belongs to the process that took it, so DataLoader workers forked
    later do not hold it, and it is gone the moment that process dies (even by kill -9), whatever its children do.
    """

    held: set[Path] = set()  # POSIX locks never exclude their own process: a second lock in it is refused here

    def __init__(self, cache_dir: Path, shared: bool):
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = (cache_dir / ".lock").resolve()
        if self.path in CacheLock.held:
            raise self._busy(cache_dir)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise self._busy(cache_dir) from None
        CacheLock.held.add(self.path)

    def _busy(self, cache_dir: Path) -> RunFailed:
        return RunFailed(f"{cache_dir} is being written by another embed run (lock {self.path}); "
                         f"wait for it or use another cache.dir")

    def release(self):
        CacheLock.held.discard(self.path)
        os.close(self.fd)  # closing drops the process's POSIX lock


# --- manifest ---------------------------------------------------------------------------------------

def read_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    with reading(path, "rerun stages/embed.py to rewrite it"):
        return json.loads(path.read_bytes())


def finalize(cache_dir: Path, plan: list[list[str]], info: dict) -> dict | None:
    """Write failures.jsonl and manifest.json if every planned shard is published; else return None.

    Called by every rank after its own shards: the last one to finish sees them all.
    """
    paths = [shard_path(cache_dir, i) for i in range(len(plan))]
    if not all(p.is_file() for p in paths):
        return None
    shards, failures = [], []
    T = D = None
    for i, p in enumerate(paths):
        with open_shard(p) as f:
            n = int(f.attrs["n_rows"])
            T, D = (int(f.attrs["tokens"]), int(f.attrs["width"])) if n else (T, D)
            failures += shard_failures(f)
        shards.append({"file": p.name, "rows": n, "planned": len(plan[i]), "sha256": sha256_file(p)})
    atomic_write_text(cache_dir / FAILURES, "".join(json.dumps(x) + "\n" for x in failures))
    n_images = sum(len(k) for k in plan)
    manifest = {
        "format_version": FORMAT_VERSION, **info, "tokens": T, "width": D, "dtype": "float16",
        "counts": {"images": n_images, "embedded": sum(s["rows"] for s in shards), "failed": len(failures)},
        "shards": shards, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(cache_dir / MANIFEST, manifest)
    return manifest


# --- checks used by stage 2, captioning and --verify ------------------------------------------------

def load_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a complete cache, or a one-line error saying what to run."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir() or not (shard_dir(cache_dir).is_dir() and any(shard_dir(cache_dir).iterdir())):
        raise FileNotFoundError(f"cache {cache_dir} has no shards; run stages/embed.py (make embed) first")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise ValueError(f"cache {cache_dir} is incomplete (no manifest.json): embedding did not finish; "
                         f"rerun stages/embed.py with the same config to complete it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cache {cache_dir} has format_version {manifest.get('format_version')}, this minivlm "
                         f"reads {FORMAT_VERSION}; re-embed with stages/embed.py --overwrite")
    missing = [s["file"] for s in manifest["shards"] if not (shard_dir(cache_dir) / s["file"]).is_file()]
    if missing:
        raise ValueError(f"cache {cache_dir} is incomplete: {len(missing)} shard(s) missing (first: {missing[0]}); "
                         f"rerun stages/embed.py to rewrite them")
    return manifest


def verify(cache_dir: str | Path) -> list[str]:
    """Re-read every shard: row counts, key uniqueness, per-chunk checksums, file checksums, fingerprint."""
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    problems, seen = [], set()
    for s in manifest["shards"]:
        p = shard_dir(cache_dir) / s["file"]
        if sha256_file(p) != s["sha256"]:
            problems.append(f"{p}: file checksum differs from manifest.json (corrupted or replaced)")
        try:
            with reading(p, REDO_SHARD), open_shard(p) as f:
                ds = f["embeddings"]
                if f.attrs["fingerprint"] != manifest["fingerprint"]:
                    problems.append(f"{p}: fingerprint {f.attrs['fingerprint']} != manifest {manifest['fingerprint']}")
                if len(ds) != s["rows"]:
                    problems.append(f"{p}: {len(ds)} rows, manifest says {s['rows']}")
                keys = shard_keys(f)
                if len(keys) != len(ds) or len(set(keys)) != len(keys) or seen & set(keys):
                    problems.append(f"{p}: keys are not unique or do not match the rows")
                seen |= set(keys)
                row = np.empty(ds.shape[1:], np.float16)
                for i in range(len(ds)):
                    ds.read_direct(row, np.s_[i])  # fletcher32 raises OSError on a corrupt chunk
        except ValueError as e:
            problems.append(str(e).splitlines()[0])
    return problems


@dataclass(frozen=True)
class CacheIndex:
    """Where each image key lives: shard file and row. Built from the shards' `keys` datasets."""
    files: tuple[str, ...]
    locations: dict            # key -> (shard number, row)
    tokens: int
    width: int
    offsets: tuple[np.ndarray, ...]   # per shard: byte offset of each row's raw fp16 bytes in the file


def row_offsets(path: str | Path, ds: h5py.Dataset) -> np.ndarray:
    """Byte offset of every row in the shard file, after checking the layout makes the raw bytes the row."""
    n, T, D = ds.shape
    row_bytes = T * D * 2
    filters = set(ds._filters) - {"fletcher32"}
    if n and (ds.chunks != (1, T, D) or ds.dtype != np.dtype("<f2") or filters):
        raise ValueError(f"{path}: embeddings are not stored as one raw float16 row per chunk (chunks "
                         f"{ds.chunks}, dtype {ds.dtype}, filters {sorted(filters)}); re-embed with stages/embed.py")
    offsets = np.full(n, -1, np.int64)

    def visit(chunk):
        if chunk.filter_mask == 0 and chunk.size == row_bytes + 4 * ds.fletcher32:
            offsets[chunk.chunk_offset[0]] = chunk.byte_offset

    if n:
        ds.id.chunk_iter(visit)
    if (offsets < 0).any():
        raise ValueError(f"{path}: row {int(np.argmax(offsets < 0))} has no stored chunk of {row_bytes} bytes; "
                         f"run stages/embed.py --verify, delete the shard and rerun embed")
    return offsets


def build_index(cache_dir: str | Path, manifest: dict) -> CacheIndex:
    cache_dir = Path(cache_dir)
    files, locations, offsets = [], {}, []
    for s, entry in enumerate(manifest["shards"]):
        p = shard_dir(cache_dir) / entry["file"]
        files.append(str(p))
        with reading(p, REDO_SHARD), open_shard(p) as f:
            for row, key in enumerate(shard_keys(f)):
                locations[key] = (s, row)
            offsets.append(row_offsets(p, f["embeddings"]))
    return CacheIndex(tuple(files), locations, manifest["tokens"], manifest["width"], tuple(offsets))
