"""Where records and their images come from: the files behind data.records, the stored join of rows to
image keys, the plan of stage 1 and the reads of its workers.

Design choices:
- `data.records` / `data.val_records` are a file, a directory (its *.tar files, else its *.parquet files), a
  glob or a brace pattern (`shards/{00000..00099}.tar`, as webdataset expands it), files in sorted order; any
  of them may be a URL that fsspec opens (`minivlm.formats.remote`). A `.parquet` file (or one of another suffix that
  starts with Parquet's magic bytes) holds its images inside (`minivlm.formats.parquet`), so does a `.tar`
  (`minivlm.formats.tars`, WebDataset); `.json`, `.jsonl` and others are LLaVA records with their images under
  `data.image_root` (`minivlm.formats.records`).
- Keys: the normalised path of a folder image; the hex SHA-256 of the bytes of an image inside a file, so
  the same image in many rows or files is one cache row, and `sha256sum` recomputes a key.
- The stored join: `<cache.dir>/sources/<identity>.npz` holds, per row of a Parquet file or tar, how many
  images the row holds (`images`, (n,) int32) and the SHA-256 of each, rows after rows (`sha256`, (m, 32)
  uint8). One pass over the
  image column computes it (stage 1, or stage 2 the first time it meets a file); every later run and rank
  loads it, so training never reads or hashes image bytes. The identity hashes the file's size, mtime, last
  MiB (Parquet's footer) and image column: a rewritten file is hashed again, a moved one is not. Under
  torchrun rank r starts hashing at the r-th file: ranks share a many-file set with no coordination (they
  would write identical bytes, atomically).
- Which rows are samples: a conversation without an <image> tag is text-only and its images are ignored
  (MiniMind-V's sft_i2t.parquet gives such rows an 8x8 black placeholder; upstream's `count_vision_proj`
  puts image features only where the tag is). A conversation with tags takes one image per tag, the k-th
  tag the k-th image of the row (a Parquet list column: MiniMind-V's `image_bytes`, Hugging Face's
  `images`); a caption takes the row's images at the start of its prompt. A row with no image
  (img2dataset's failed downloads), more than `data.max_images`, or several in a tar sample (webdataset has
  one image a sample) is skipped and counted, never guessed; so is one whose tags and images differ in number
  (records.Skip, as in LLaVA JSON). `data.strict` makes any skip a stop naming the row.
- Plan: folder keys sorted, as always; keys of images inside files in first-occurrence order (files, row
  groups, rows), so a shard's images come from one stretch of the source and its reader touches only the row
  groups they sit in. Sorted by SHA-256 they would scatter every shard over every row group of every file.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import re
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minivlm.config import DataConfig
from minivlm.fileio import TMP_SUFFIX, atomic_write, sha256_file
from minivlm.formats import parquet, remote, tars
from minivlm.formats.records import (
    Record,
    Skip,
    caption_turns,
    count_tags,
    load_records,
    parse_turns,
    resolve_image,
    with_tags,
)

STORE = "sources"          # <cache.dir>/sources/<identity>.npz: the stored join
TAIL_BYTES = 1 << 20       # the end of a file that its identity hashes (Parquet's footer lives there)
STALE_TEMP_S = 3600        # a temp file of the store older than this was left by a killed writer
SKIP_REASONS = {"several": "hold several images in a tar sample (one a sample)", "no_image": "hold no image",
                "no_text": "hold no text", "too_many": "hold more images than data.max_images",
                "mismatch": "whose <image> tags and images differ in number",
                "video": "of video (video records are not supported)"}
JOIN_FORMAT = 2            # the stored join's layout (1: one SHA-256 a row, zeros for none or several)


FORMATS = {"parquet": parquet, "tar": tars}  # images inside: layout, rows, texts, digests, where, ImageRows
SEVERAL = {"parquet": True, "tar": False}    # whether a row may hold several images
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Source:
    """One file of records: LLaVA JSON/JSONL (layout None: images under data.image_root) or one of FORMATS."""
    path: Path
    layout: object | None      # the format's Layout (which columns or members hold what)
    format: str = "json"

    @property
    def reader(self):
        return FORMATS[self.format]


def braces(spec: str) -> list[str]:
    """A brace pattern's names, as webdataset expands them: `{00000..00099}` (zero-padded to the first bound's
    width), `{a,b}`; several groups multiply. Without braces, the spec itself."""
    m = _BRACE.search(spec)
    if not m:
        return [spec]
    lo, dots, hi = m.group(1).partition("..")
    if dots and lo.isdigit() and hi.isdigit():
        items = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        items = m.group(1).split(",")
    return [name for item in items for name in braces(spec[:m.start()] + item + spec[m.end():])]


def expand(spec: str, options: dict | None = None) -> list:
    """The files a data.records value names: a file, a directory's *.tar or else *.parquet, a glob or a brace
    pattern; local `Path`s, or `remote.Url`s (with the filesystem `options`) for URLs; sorted."""
    names = braces(spec)
    if names != [spec]:
        return [f for name in names for f in expand(name, options)]
    if remote.is_url(spec):
        return remote.expand(spec, options, tars.SUFFIXES + (".parquet",))
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"records glob {spec!r} matches no file; check data.records / data.val_records")
        return files
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.tar")) or sorted(path.glob("*.parquet"))  # img2dataset's tar dir has both
        if not files:
            raise FileNotFoundError(f"records directory {path} has no *.tar or *.parquet file; point data.records "
                                    f"at a file, or a directory, glob or brace pattern of tars or Parquet files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} not found; set data.records (make demo-data writes the demo's)")
    return [path]


def open_sources(spec: str, data: DataConfig) -> list[Source]:
    """Every file of `spec` with its layout, checked before any work starts (one line per bad file)."""
    out = []
    for path in expand(spec, data.storage_options):
        if tars.is_tar(path):
            out.append(Source(path, tars.layout(path), "tar"))
        elif path.suffix.lower() in (".parquet", ".pq") or path.suffix.lower() not in (".json", ".jsonl") \
                and parquet.is_parquet(path):
            out.append(Source(path, parquet.layout(path, data.image_column, data.text_column), "parquet"))
        else:
            out.append(Source(path, None))
    return out


def identity(src: Source) -> str:
    if isinstance(src.path, remote.Url):  # ETag, size, mtime: nothing downloaded
        return remote.identity(src.path, src.layout.image if src.layout else "")
    st = src.path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{src.layout.image if src.layout else ''}:".encode())
    with open(src.path, "rb") as f:
        f.seek(max(0, st.st_size - TAIL_BYTES))
        h.update(f.read())
    return h.hexdigest()[:20]


def sources_hash(sources: list[Source]) -> str:
    """What the manifest remembers of the inputs: JSON files by content (as before Parquet), Parquet by identity."""
    h = hashlib.sha256()
    for s in sources:
        remote_json = not s.layout and isinstance(s.path, remote.Url)  # by ETag/size/mtime: nothing downloaded
        h.update(identity(s).encode() if s.layout or remote_json else bytes.fromhex(sha256_file(s.path)))
    return h.hexdigest()[:16]


# --- the stored join: per row, the SHA-256 of its image ---------------------------------------------

@dataclass(frozen=True)
class RowImages:
    images: np.ndarray    # (n,) int32: images in each row
    sha256: np.ndarray    # (m,) x 32 uint8: the SHA-256 of each image, rows after rows

    @property
    def start(self) -> np.ndarray:
        """(n + 1,) int64: row r's images are sha256[start[r]:start[r + 1]]."""
        return np.concatenate([[0], np.cumsum(self.images, dtype=np.int64)])

    def keys(self, row: int, start: np.ndarray) -> list[str]:
        return [d.tobytes().hex() for d in self.sha256[start[row]:start[row + 1]]]


def _hash_rows(src: Source, progress: bool) -> RowImages:
    n = src.reader.rows(src.path)
    digests, counts = [], np.zeros(n, np.int32)
    with tqdm(total=n, desc=f"hash {src.path.name}", unit="row", disable=not progress or None, mininterval=1.0) as bar:
        for row, images in src.reader.digests(src.path, src.layout):
            counts[row] = len(images)
            digests += images
            bar.update()
    sha = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32) if digests else np.zeros((0, 32), np.uint8)
    return RowImages(counts, sha)


def row_images(src: Source, cache_dir: str | Path, progress: bool = False) -> RowImages:
    """The stored join of a Parquet file, computed (one pass over its image column) and kept when missing."""
    path = Path(cache_dir) / STORE / f"{identity(src)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = int(z["format"]) if "format" in z else 1
            rows = RowImages(z["images"], z["sha256"])
        if stored == JOIN_FORMAT and len(rows.images) == src.reader.rows(src.path) and \
                rows.images.sum() == len(rows.sha256):
            return rows
        print(f"sources: {path} does not match {src.path}'s rows or is from an older minivlm; hashing it again",
              flush=True)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"sources: {path} is unreadable ({e}); hashing {src.path} again", flush=True)
    print(f"sources: hashing the images of {src.path} once (kept in {path})", flush=True)
    for tmp in path.parent.glob(f"*.npz.*{TMP_SUFFIX}"):  # a writer killed mid-write; a live one takes seconds
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
    rows = _hash_rows(src, progress)
    atomic_write(path, lambda tmp: _save(tmp, src, rows))
    return rows


def _save(tmp: Path, src: Source, rows: RowImages) -> None:
    with open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez(f, format=np.int64(JOIN_FORMAT), images=rows.images, sha256=rows.sha256,
                 source=np.array(str(src.path)), column=np.array(src.layout.image))


# --- records ------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """Records of some specs in order (sources, then rows), where each image inside a file sits, and skips."""
    records: list[Record] = field(default_factory=list)
    origin: list = field(default_factory=list)       # per record: (source index, row) for Parquet / tars, else None
    sources: list[Source] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_skip: dict = field(default_factory=dict)   # reason -> where of its first row
    strict: bool = False                             # data.strict: a skip is a stop

    def skip(self, reason: str, where: str, line: str = "") -> None:
        if self.strict:
            raise ValueError(line or f"{where}: cannot become a sample (one of the rows that {SKIP_REASONS[reason]}); "
                                     f"fix it, or set data.strict=false to skip and count such rows")
        self.skipped[reason] += 1
        self.first_skip.setdefault(reason, where)

    def describe_skips(self) -> str:
        return "; ".join(f"{n} row(s) {SKIP_REASONS[r]} (first: {self.first_skip[r]})" for r, n in self.skipped.items())

    def warnings(self) -> list[str]:
        """One line per reason: its count and the first record it names."""
        return skip_warnings(self.skipped, self.first_skip)


@dataclass(frozen=True)
class _Row:
    row: int
    id: str
    turns: tuple | None        # None: no text
    caption: bool              # a bare caption (it takes the row's images); else a conversation (one per tag)
    where: str


def _texts(src: Source, progress: bool) -> list[_Row]:
    """Every row's text, parsed and checked (a conversation that does not parse is an error naming the row)."""
    out = []
    for row, rid, value in tqdm(src.reader.texts(src.path, src.layout), total=src.reader.rows(src.path), unit="row",
                                desc=f"read {src.path.name}", disable=not progress or None, mininterval=1.0):
        where = src.reader.where(src.path, src.layout, row)
        caption = value is None or isinstance(value, str)
        turns = (caption_turns(value) if value and value.strip() else None) if caption else parse_turns(value, where)
        out.append(_Row(row, rid if rid is not None else f"{src.path.stem}:{row}", turns, caption, where))
    return out


def _join(loaded: Loaded, index: int, texts: list[_Row], rows: RowImages, max_images: int) -> None:
    """Rows as records: their image keys where the text takes them; text-only, or skipped and counted, otherwise."""
    start, several = rows.start, SEVERAL[loaded.sources[index].format]
    for t in texts:
        n = int(rows.images[t.row])
        tagged = t.caption or count_tags(t.turns) > 0  # an untagged conversation is text-only (MiniMind-V)
        if tagged and not n:
            loaded.skip("no_image", t.where)
        elif t.turns is None:
            loaded.skip("no_text", t.where)
        elif not tagged:
            loaded.records.append(Record(t.id, (), t.turns, t.where))
            loaded.origin.append(None)
        elif n > 1 and not several:
            loaded.skip("several", t.where)
        else:
            try:
                turns = with_tags(t.turns, n, t.where)
            except Skip as e:  # tags and images that do not match
                loaded.skip(e.reason, e.where, str(e))
                continue
            if n > max_images:
                loaded.skip("too_many", t.where)
                continue
            loaded.records.append(Record(t.id, tuple(rows.keys(t.row, start)), turns, t.where))
            loaded.origin.append((index, t.row))


def load(specs: list[str], data: DataConfig, cache_dir: str | Path, rank: int = 0, progress: bool = False,
         warn: bool = True) -> Loaded:
    """Records of every spec, in order; Parquet rows joined with their stored image keys (hashed when missing).
    Every text is read and checked before any image is hashed: a bad row fails in seconds, not after an hour.
    `progress`: progress bars, and (`warn`) a warning line a reason for the rows skipped."""
    loaded = Loaded(sources=[s for spec in specs for s in open_sources(spec, data)], strict=data.strict)
    skip = None if data.strict else loaded.skip
    texts = {i: _texts(s, progress) if s.layout else load_records(s.path, skip) for i, s in enumerate(loaded.sources)}
    files = [i for i, s in enumerate(loaded.sources) if s.layout]
    start = rank % len(files) if files else 0  # ranks start apart
    stored = {i: row_images(loaded.sources[i], cache_dir, progress) for i in files[start:] + files[:start]}
    for i, src in enumerate(loaded.sources):
        if src.layout:
            _join(loaded, i, texts.pop(i), stored.pop(i), data.max_images)
        else:
            for r in texts.pop(i):
                if len(r.images) > data.max_images:
                    loaded.skip("too_many", r.where)
                else:
                    loaded.records.append(r)
                    loaded.origin.append(None)
    if not loaded.records:
        raise ValueError(f"{', '.join(specs)}: no records" + (f" ({loaded.describe_skips()})" if loaded.skipped else ""))
    if progress and warn:
        for line in loaded.warnings():
            print(line, flush=True)
    return loaded


def skip_warnings(counts: dict, first: dict, phrases: dict = SKIP_REASONS) -> list[str]:
    """'warning: skipped 5 row(s) of video (video records are not supported) (first: train.json record 20 (id
    v-0))', a line per reason (its phrase in `phrases`)."""
    return [f"warning: skipped {n} row(s) {phrases[r]} (first: {first[r]})" for r, n in counts.items() if n]


def manifest_info(loaded: Loaded) -> dict:
    """What the manifest keeps of the sources: each Parquet file's identity (its stored join) and the skips."""
    return {"sources": [{"file": str(s.path), "id": identity(s)} for s in loaded.sources if s.layout],
            "skipped_rows": dict(loaded.skipped)}


def read_records(spec: str, data: DataConfig, cache_dir: str | Path, progress: bool = False) -> list[Record]:
    return load([spec], data, cache_dir, progress=progress).records


# --- stage 1: the plan and its reads ------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    keys: list[str]          # unique image keys in plan order
    where: list              # per key: Path | Url | None (folder image; None: outside the root), or (source, row, k):
                             # the k-th image of a row of a file


def plan(loaded: Loaded, image_root: str | Path) -> Plan:
    """Folder keys sorted (as before Parquet), then keys inside files in first-occurrence order."""
    folder = sorted({k for r, o in zip(loaded.records, loaded.origin) if o is None for k in r.images})
    inside: dict[str, tuple[int, int, int]] = {}
    for r, o in zip(loaded.records, loaded.origin):
        if o is not None:
            for k, key in enumerate(r.images):
                inside.setdefault(key, (*o, k))
    if folder and not isinstance(image_root, remote.Url) and not Path(image_root).is_dir():
        raise FileNotFoundError(f"data.image_root {image_root} is not a directory; point it at the folder the "
                                f"records' image paths are relative to")
    seen = set(folder)
    later = [k for k in inside if k not in seen]
    return Plan(folder + later, [resolve_image(image_root, k) for k in folder] + [inside[k] for k in later])


def image_root(data: DataConfig) -> Path | remote.Url:
    """data.image_root: a folder, or a URL with data.storage_options."""
    root = data.image_root
    return remote.Url.of(root.rstrip("/"), data.storage_options) if remote.is_url(root) else Path(root)


def cut(keys: list[str], shard_size: int) -> list[list[str]]:
    return [keys[i:i + shard_size] for i in range(0, len(keys), shard_size)]


def describe(sources: list[Source], where) -> str:
    """'data/x.parquet row 12', 'shards/00000.tar member 000000012.jpg' for a (source, row, k) location; the
    second and later images of a row add ' image k+1'."""
    src = sources[where[0]]
    return src.reader.where(src.path, src.layout, where[1]) + (f" image {where[2] + 1}" if where[2] else "")


class ImageReader:
    """(source, row, k) -> the bytes of that row's k-th image, reading each file forward (its format's
    `ImageRows`); one file open at a time. Built in the worker that uses it: no file handle crosses a fork."""

    def __init__(self, sources: list[Source]):
        self.sources, self.current, self.rows = sources, -1, None

    def read(self, where) -> bytes:
        s, row, k = where
        if s != self.current:
            src = self.sources[s]
            self.current, self.rows = s, src.reader.ImageRows(src.path, src.layout)
        images = self.rows.images(row)
        if len(images) <= k:
            raise ValueError(f"{describe(self.sources, where)} holds {len(images)} images now; the file changed "
                             f"since its keys were stored: rerun embed")
        return images[k]

