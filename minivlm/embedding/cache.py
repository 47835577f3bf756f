"""The embedding cache on disk: the shard plan, the manifest, verification, the index stage 2 reads
through, and the upgrade of caches older minivlm versions wrote.

Layout of `cache/<name>/` (DESIGN.md "Cache"):
- `shards/shard-NNNNN.h5`: one shard file each, format 2 (minivlm.embedding.shard, the only code that writes or
  reads rows: contiguous `embeddings`, `scales` for 8-bit codecs, a checksum per row (xxh3_64; crc32 in
  caches written before it), `keys`, each image's `tiles` where images are tiled, attributes).
- `manifest.json`: written once every planned shard is published; stage 2 trusts nothing without it.
  Format 2: `format_version`, `encoder` (spec with its `fingerprint` fields, the tiling policy among them),
  `fingerprint_id`, `tokens`, `width`, `dtype` (the codec), records and their hash, counts (images, embedded,
  failed; and tiles, the rows, where images are tiled), every shard's rows and sha256, versions, time.
- `failures.jsonl`: one line per image that could not be embedded, gathered from the shards.
- `.lock`: held by the embed run writing the cache.

Design choices:
- The plan is a pure function of the records: sorted unique keys cut into fixed-size shards, so a rerun,
  another rank or another node computes it alone, and a rerun skips every published shard. A shard holds
  whole images, whatever their number of tiles.
- `CacheIndex` gives each image its first row (`locations`, as before tiles) and, from arrays of first rows,
  each image's tile count and grid (`image_tiles`); an untiled cache stores and reads nothing for that.
- Format 1 (before 2026-12: one fletcher32 chunk per float16 row, found through HDF5 internals) is not
  read for training; a format-2 cache with CRC-32 row checksums is (each shard names its algorithm), at
  zlib's ~4 GB/s. `upgrade` rewrites either shard by shard as a fresh embed would write it (each published
  atomically, so a kill loses nothing and a rerun goes on), copying the rows' bytes after checking them
  against their old checksums: no encoder needed, the same numbers, bitwise the cache embedding writes.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minivlm import __version__
from minivlm.embedding import shard
from minivlm.fileio import TMP_SUFFIX, WriterLock, atomic_write_json, atomic_write_text, reading, sha256_file

FORMAT_VERSION = shard.FORMAT_VERSION
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"


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


def remove_stale_temps(cache_dir: Path, indices) -> None:
    for i in indices:
        for tmp in shard_dir(cache_dir).glob(shard_path(cache_dir, i).name + "*" + TMP_SUFFIX):
            tmp.unlink(missing_ok=True)


# --- manifest ---------------------------------------------------------------------------------------

def read_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    with reading(path, "rerun stages/embed.py to rewrite it"):
        return json.loads(path.read_bytes())


def finalize(cache_dir: Path, planned: list[int], info: dict) -> dict | None:
    """Write failures.jsonl and manifest.json if every planned shard is published; else return None.
    `planned`: the number of images planned for each shard; `info`: the encoder spec, records, versions.

    Called by every rank after its own shards: the last one to finish sees them all."""
    paths = [shard_path(cache_dir, i) for i in range(len(planned))]
    if not all(p.is_file() for p in paths):
        return None
    shards, failures, codec, images = [], [], None, 0
    for p, n_planned in zip(paths, planned):
        s = shard.read_info(p)
        codec = s.codec if s.n_rows or codec is None else codec
        failures += s.attrs["failures"]
        images += s.n_images
        shards.append({"file": p.name, "rows": s.n_rows, "planned": n_planned, "sha256": sha256_file(p)})
    tiles = sum(s["rows"] for s in shards)
    atomic_write_text(cache_dir / FAILURES, "".join(json.dumps(x) + "\n" for x in failures))
    manifest = {
        "format_version": FORMAT_VERSION, **info, "tokens": codec.tokens, "width": codec.width, "dtype": codec.name,
        "counts": {"images": sum(planned), "embedded": images, "failed": len(failures),
                   **({"tiles": tiles} if tiles != images else {})},
        "shards": shards, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(cache_dir / MANIFEST, manifest)
    return manifest


def load_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a complete format-2 cache, or a one-line error saying what to run."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir() or not (shard_dir(cache_dir).is_dir() and any(shard_dir(cache_dir).iterdir())):
        raise FileNotFoundError(f"cache {cache_dir} has no shards; run stages/embed.py (make embed) first")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise ValueError(f"cache {cache_dir} is incomplete (no manifest.json): embedding did not finish; "
                         f"rerun stages/embed.py with the same config to complete it")
    if manifest.get("format_version") == 1:
        raise ValueError(f"cache {cache_dir} is in format 1 (minivlm before 2026-12); {shard.UPGRADE}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cache {cache_dir} has format_version {manifest.get('format_version')}, this minivlm "
                         f"reads {FORMAT_VERSION}; re-embed with stages/embed.py --overwrite")
    missing = [s["file"] for s in manifest["shards"] if not (shard_dir(cache_dir) / s["file"]).is_file()]
    if missing:
        raise ValueError(f"cache {cache_dir} is incomplete: {len(missing)} shard(s) missing (first: {missing[0]}); "
                         f"rerun stages/embed.py to rewrite them")
    return manifest


# --- checks used by --verify, stage 2 and captioning -------------------------------------------------

def verify(cache_dir: str | Path) -> list[str]:
    """Re-read every shard: file checksums, fingerprint, row counts, key uniqueness and every row's checksum
    (by the algorithm its shard names). One line per problem, naming the shard (and the row and image key of
    a corrupt row)."""
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    problems, seen = [], set()
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", disable=None, mininterval=1.0):
        problems += check_shard(shard_dir(cache_dir) / entry["file"], entry, manifest["fingerprint_id"], seen)
    return problems


def check_shard(p: Path, entry: dict, fingerprint_id: str, seen: set | None = None) -> list[str]:
    """One shard file against its manifest entry (`verify`, and the mirror before it keeps a copy): file checksum,
    fingerprint, row count, unique keys (also against `seen`, which gains them) and every row's checksum."""
    problems, seen = [], set() if seen is None else seen
    if sha256_file(p) != entry["sha256"]:
        problems.append(f"{p}: file checksum differs from manifest.json (corrupted or replaced)")
    try:
        info = shard.read_info(p, keys=True)
        if info.attrs["fingerprint_id"] != fingerprint_id:
            problems.append(f"{p}: fingerprint {info.attrs['fingerprint_id']} != manifest {fingerprint_id}")
        if info.n_rows != entry["rows"]:
            problems.append(f"{p}: {info.n_rows} rows, manifest says {entry['rows']}")
        if len(set(info.keys)) != len(info.keys) or seen & set(info.keys):
            problems.append(f"{p}: keys are not unique")
        seen |= set(info.keys)
        reader = shard.RowReader([info], mapped=False, check=False)
        try:
            problems += [shard.corrupt_row(p, r, info.key_at(r), info.checksum) for r in reader.bad_rows(0)]
        finally:
            reader.close()
    except ValueError as e:
        problems.append(str(e).splitlines()[0])
    return problems


@dataclass(frozen=True)
class CacheIndex:
    """Every shard's header for the row reader, where each image key lives, and each image's tiles."""
    shards: tuple[shard.ShardInfo, ...]
    codec: shard.Codec         # T, D and how rows are stored (one row: one tile of an image)

    @cached_property
    def locations(self) -> dict:
        """key -> (shard number, the image's first row), read from the shards on first use: a run on stored
        samples never asks. An image's tiles are its `image_tiles` count of rows from there on."""
        out = {}
        for s, info in enumerate(self.shards):
            keys = shard.read_info(info.path, keys=True).keys
            out.update(zip(keys, zip([s] * len(keys), info.first_rows.tolist())) if info.tiles is not None else
                       ((key, (s, row)) for row, key in enumerate(keys)))
        return out

    @property
    def tiled(self) -> bool:
        """Whether some image has more than one row or a grid other than (1, 1)."""
        return any(info.tiles is not None for info in self.shards)

    def image_tiles(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        """(n, 5) int64 per image: tile count, grid rows, grid cols, height, width of the image whose first row
        is (shard[i], row[i]) (`locations`); (1, 1, 1, 0, 0) in an untiled shard (its sizes are not kept), zeros
        where shard[i] is -1 (text-only). The image's rows are row[i] .. row[i] + count - 1, in its policy's
        order (minivlm.embedding.tiles)."""
        shard, row = np.asarray(shard, np.int64), np.asarray(row, np.int64)
        out = np.where(shard[:, None] >= 0, np.array([1, 1, 1, 0, 0]), 0).astype(np.int64)
        for s in np.unique(shard[shard >= 0]).tolist():
            info = self.shards[s]
            if info.tiles is not None:
                at = shard == s
                j = np.searchsorted(info.first_rows, row[at])
                if (j >= info.n_images).any() or (info.first_rows[np.minimum(j, info.n_images - 1)] != row[at]).any():
                    raise ValueError(f"{info.path}: a row asked for is not the first row of an image")
                out[at] = info.tiles[j]
        return out

    def rows(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every row of these images, each image's tiles in order: (shard, row) arrays of sum(tile counts)."""
        loc = np.array([self.locations[k] for k in keys], np.int64).reshape(-1, 2)
        count = self.image_tiles(loc[:, 0], loc[:, 1])[:, 0]
        start = np.repeat(loc[:, 1] - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
        return np.repeat(loc[:, 0], count), start + np.arange(count.sum())

    @property
    def tokens(self) -> int:
        return self.codec.tokens

    @property
    def width(self) -> int:
        return self.codec.width

    def reader(self, mapped: bool | None = None) -> shard.RowReader:
        return shard.RowReader(self.shards, mapped)


def build_index(cache_dir: str | Path, manifest: dict) -> CacheIndex:
    """Every shard's header, checked against the manifest's row shape and codec."""
    cache_dir = Path(cache_dir)
    want = shard.Codec(manifest["dtype"], manifest["tokens"], manifest["width"])
    infos = []
    for entry in manifest["shards"]:
        info = shard.read_info(shard_dir(cache_dir) / entry["file"])
        if info.codec != want and info.n_rows:
            raise ValueError(f"{info.path}: rows are {info.codec}, manifest.json says {want}; "
                             f"run stages/embed.py --verify")
        infos.append(info)
    return CacheIndex(tuple(infos), want)


# --- the upgrade and the comparison of two caches -----------------------------------------------------

def upgrade(cache_dir: str | Path) -> int:
    """Rewrite a cache an older minivlm wrote (format 1, or format 2 with CRC-32 row checksums) in place as
    embedding writes it now, copying bytes (no encoder). Shards one at a time, each published atomically,
    then the manifest last: a kill anywhere loses nothing, and a rerun goes on. Returns the number of
    shards rewritten."""
    cache_dir = Path(cache_dir)
    paths = sorted(shard_dir(cache_dir).glob("shard-*.h5"))
    if not paths:
        raise FileNotFoundError(f"cache {cache_dir} has no shards; nothing to upgrade")
    lock = WriterLock(cache_dir, other="another cache.dir")
    try:
        remove_stale_temps(cache_dir, [int(p.stem.split("-")[1]) for p in paths])
        done = sum(shard.upgrade_shard(p) for p in tqdm(paths, desc="upgrade", unit="shard", disable=None))
        old = read_manifest(cache_dir)
        written = ("format_version", "tokens", "width", "dtype", "counts", "shards", "written_at")  # finalize's
        if old is not None and old.get("format_version") == 1:
            info = {k: v for k, v in old.items() if k not in (*written, "fingerprint", "fingerprint_fields")}
            info.update(encoder={**old["encoder"], "fingerprint": old["fingerprint_fields"]},
                        fingerprint_id=old["fingerprint"], sources=old.get("sources", []),
                        skipped_rows=old.get("skipped_rows", {}), tool_version=__version__)
            finalize(cache_dir, [s["planned"] for s in old["shards"]], info)
        elif old is not None and (done or _rewritten_since(cache_dir, paths)):  # rewritten shards' sha256, also a killed run's
            info = {k: v for k, v in old.items() if k not in written}
            finalize(cache_dir, [s["planned"] for s in old["shards"]], {**info, "tool_version": __version__})
    finally:
        lock.release()
    return done


def _rewritten_since(cache_dir: Path, paths: list[Path]) -> bool:
    """Whether a shard was published after the manifest was written (its sha256 there is then stale)."""
    written = (Path(cache_dir) / MANIFEST).stat().st_mtime_ns
    return any(p.stat().st_mtime_ns > written for p in paths)


def row_errors(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Per row of (n, T, D) rows `b` against `a`: relative RMS error ||b - a|| / ||a||, the mean cosine of
    its tokens (tokens zero in both agree), and the largest absolute difference."""
    a, b = a.float(), b.float()
    d = b - a
    cos = torch.nn.functional.cosine_similarity(a, b, dim=2, eps=1e-30)  # (n, T)
    cos = torch.where((a == 0).all(2) & (b == 0).all(2), 1.0, cos)
    return {"relative_rms": (d.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)).numpy(),
            "cosine": cos.mean(1).numpy(), "max_abs": d.abs().flatten(1).amax(1).numpy()}


def summarize(errors: list[dict[str, np.ndarray]]) -> dict:
    """`row_errors` of several batches as mean, median, p99 and max over rows."""
    out = {}
    for k in errors[0]:
        x = np.concatenate([e[k] for e in errors])
        out[k] = {"mean": float(x.mean()), "median": float(np.median(x)), "p99": float(np.percentile(x, 99)),
                  "max": float(x.max())}
    return out


def compare(a_dir: str | Path, b_dir: str | Path, batch: int = 256) -> dict:
    """How far cache B's rows are from cache A's over the images both hold (`row_errors`, summarised over
    rows: every tile's of a tiled image), with the bytes per row of each and the fingerprint fields in which
    the two caches differ."""
    ma, mb = load_manifest(a_dir), load_manifest(b_dir)
    ia, ib = build_index(a_dir, ma), build_index(b_dir, mb)
    if (ia.tokens, ia.width) != (ib.tokens, ib.width):
        raise ValueError(f"cache {b_dir} has rows of {ib.tokens} x {ib.width}, cache {a_dir} of {ia.tokens} x "
                         f"{ia.width}; only caches of the same encoder and selection compare")
    keys = sorted(ia.locations.keys() & ib.locations.keys())
    if not keys:
        raise ValueError(f"caches {a_dir} and {b_dir} hold no image in common")
    ta, tb = (index.image_tiles(*np.array([index.locations[k] for k in keys], np.int64).T) for index in (ia, ib))
    if not np.array_equal(ta, tb):
        raise ValueError(f"caches {a_dir} and {b_dir} cut images into other tiles (encoder.tiles, max_tiles, "
                         f"grid_pinpoints); only caches of the same tiles compare")
    fa, fb = ma["encoder"]["fingerprint"], mb["encoder"]["fingerprint"]
    readers, errors = [(ia, ia.reader(mapped=False)), (ib, ib.reader(mapped=False))], []
    try:
        for lo in range(0, len(keys), batch):
            errors.append(row_errors(*(_decoded(index, reader, keys[lo:lo + batch]) for index, reader in readers)))
    finally:
        for _, reader in readers:
            reader.close()
    return {"a": str(a_dir), "b": str(b_dir), "dtype": [ma["dtype"], mb["dtype"]], "images": len(keys),
            "rows": int(ta[:, 0].sum()),
            "only_in_a": len(ia.locations) - len(keys), "only_in_b": len(ib.locations) - len(keys),
            "bytes_per_row": [ia.codec.row_bytes, ib.codec.row_bytes],
            "fingerprint_differs": sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)),
            **summarize(errors)}


def _decoded(index: CacheIndex, reader: shard.RowReader, keys: list[str]) -> torch.Tensor:
    """(n, T, D) float32 rows of these keys (every tile of each), checked and decoded."""
    shards, rows = index.rows(keys)
    out = np.empty((len(rows), index.codec.row_bytes), np.uint8)
    reader.read(shards, rows, out)
    return index.codec.decode(torch.from_numpy(out)).float()
