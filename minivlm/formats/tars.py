"""WebDataset tars (img2dataset's `webdataset` output): samples of members that share a key, the images inside.

Design choices:
- Members are grouped as webdataset groups them: the key is the member's path up to the first dot of its
  basename, the rest its extension (lower-cased); consecutive members with one key are one sample; a
  member with no extension, or that is not a regular file, is skipped. img2dataset writes `KEY.jpg`,
  `KEY.json` (url, caption, key, status, width, height, ...) and `KEY.txt` (the caption), KEY being five
  digits of shard and four of position.
- A sample's image is its `jpg`, `jpeg`, `png` or `webp` member; its text a `json` member's `conversations`
  (turns), else its `txt` member (the caption), else the `json` member's `caption`. A sample with no image,
  several, or no text is skipped and counted by `minivlm.formats.sources`, naming the tar and member. One extension
  twice under one key is an error, as in webdataset.
- One pass in stream mode (the stdlib `tarfile`, `r|`: a sequential read, nothing extracted to disk) checks
  the tar and indexes it (`index`): each sample's key, text, and the offset, size and SHA-256 of its image
  members (so the stored join costs no second read of a remote tar),
  kept per process for the tar's size and mtime (or remote identity), so the text pass, the row count and
  stage 1's forked workers never scan it again. The pass runs when rows or texts are first asked for
  (`sources.load`, before any work), not in `layout`, which reads nothing: stage 2 keys its stored samples
  on `sources.open_sources` without scanning a tar. Image bytes are read by offset, forward, in
  `remote.BLOCK`-sized ranges (`ImageRows`): memory holds one block, and a worker reads only the members of
  its own shards, each once.
- Compressed tars (.tar.gz, ...) have no member offsets in the file: refused, with the fix (decompress).
- A tar that is not one, or is truncated (mid-member, or without its end-of-archive blocks), is one line
  naming the tar and the last member read.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from minivlm.formats import remote

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SUFFIXES = (".tar",)
REWRITE = "download or write the tar again"
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
END_BYTES = 1024   # a tar ends with two 512-byte zero blocks
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key = path up to the first dot of the basename


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name as webdataset splits it; (None, None) when the basename has no dot."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def is_tar(path) -> bool:
    return path.suffix.lower() in SUFFIXES


@dataclass(frozen=True)
class Layout:
    """What `minivlm.formats.sources` keeps per tar (members are found by `index`): the image "column" its stored
    join and identity record."""
    image: str = "|".join(IMAGE_EXTS)


@dataclass(frozen=True, eq=False)
class Index:
    """A tar's index: per sample its key and text, and the offset, size and name of each image member."""
    keys: tuple[str, ...]
    texts: tuple                      # per sample: turns (list), a caption (str) or None
    image_start: np.ndarray           # (n + 1,) int64: sample i's images are image_*[start[i]:start[i+1]]
    image_offset: np.ndarray          # (m,) int64: byte offset of each image member's data in the tar
    image_size: np.ndarray            # (m,) int64
    image_name: tuple[str, ...]       # (m,) member names
    image_sha256: np.ndarray          # (m, 32) uint8: each image's SHA-256, taken as the pass streams it by
    members: tuple[str, ...]          # per sample: its first member's name (where a skip is reported)

    def images_of(self, row: int) -> range:
        return range(int(self.image_start[row]), int(self.image_start[row + 1]))


@dataclass
class _Sample:
    key: str
    first: str
    exts: set
    images: list           # (offset, size, name)
    txt: str | None = None
    meta: dict | None = None

    def text(self, where: str):
        conv = (self.meta or {}).get("conversations")
        if conv is not None:
            if isinstance(conv, str):  # a JSON string, as MiniMind-V stores it
                try:
                    conv = json.loads(conv)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: conversations is not valid JSON ({e.msg}); fix the member or drop "
                                     f"the sample from the tar") from None
            return conv
        if self.txt is not None:
            return self.txt
        caption = (self.meta or {}).get("caption")
        return caption if isinstance(caption, str) else None


def _check_magic(path, head: bytes) -> None:
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise ValueError(f"{path}: a {kind}-compressed tar; its members cannot be read by offset: decompress it "
                             f"and point data.records at the .tar files")


def _decode(path, name: str, data: bytes, ext: str):
    try:
        text = data.decode("utf-8")
        return json.loads(text) if ext == "json" else text
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} member {name}: unreadable {ext} ({type(e).__name__}: {e}); fix the member or "
                         f"drop the sample from the tar") from None


def scan(path) -> Index:
    """One sequential pass over the tar: its samples, checked (one line naming the tar and member on bad input)."""
    samples: list[_Sample] = []
    last = "(none: the first header)"
    size = path.size() if isinstance(path, remote.Url) else Path(path).stat().st_size
    with remote.open_binary(path) as raw, tqdm.wrapattr(raw, "read", total=size, desc=f"index {path.name}",
                                                         disable=None, leave=False, mininterval=1.0) as f:
        _check_magic(path, raw.peek(8)[:8])
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for info in tf:
                    last = info.name
                    key, ext = split_name(info.name)
                    if not info.isreg() or key is None:
                        continue
                    ext = ext.lower()
                    if not samples or samples[-1].key != key:
                        samples.append(_Sample(key, info.name, set(), []))
                    s = samples[-1]
                    if ext in s.exts:
                        raise ValueError(f"{path} member {info.name}: a second .{ext} under key {key!r}; a key holds "
                                         f"one member per extension: rename or drop one and write the tar again")
                    s.exts.add(ext)
                    if ext in IMAGE_EXTS:  # hashed on the way: the stored join needs no second read
                        digest = hashlib.sha256(tf.extractfile(info).read()).digest()
                        s.images.append((info.offset_data, info.size, info.name, digest))
                    elif ext in ("txt", "json"):
                        value = _decode(path, info.name, tf.extractfile(info).read(), ext)
                        if ext == "txt":
                            s.txt = value
                        else:
                            s.meta = value if isinstance(value, dict) else {}
                end = tf.offset
        except tarfile.TarError as e:
            what = "not a tar file" if last.startswith("(none") else f"truncated or corrupt after member {last}"
            raise ValueError(f"{path}: {what} ({remote.first_line(e)}); {REWRITE}") from None
    if not samples and size < END_BYTES or samples and size < end + END_BYTES:
        raise ValueError(f"{path}: truncated after member {last} (no end-of-archive blocks); {REWRITE}")
    counts = np.array([len(s.images) for s in samples], np.int64)
    flat = [m for s in samples for m in s.images]
    return Index(keys=tuple(s.key for s in samples),
                 texts=tuple(s.text(f"{path} member {s.first}") for s in samples),
                 image_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                 image_offset=np.array([m[0] for m in flat], np.int64),
                 image_size=np.array([m[1] for m in flat], np.int64),
                 image_name=tuple(m[2] for m in flat), members=tuple(s.first for s in samples),
                 image_sha256=np.frombuffer(b"".join(m[3] for m in flat), np.uint8).reshape(-1, 32))


_INDEXED: dict = {}  # (path, size, mtime or identity) -> Index: the text pass, row counts and workers reuse it


def _signature(path) -> tuple:
    if isinstance(path, remote.Url):
        return path, remote.identity(path, "")
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def index(path) -> Index:
    """The tar's index, scanned once per process and identity."""
    sig = _signature(path)
    if sig not in _INDEXED:
        _INDEXED[sig] = scan(path)
    return _INDEXED[sig]


def layout(path, image_column: str = "", text_column: str = "") -> Layout:
    """Reads nothing (see the module's notes). Column overrides are Parquet's: unused here."""
    if not isinstance(path, remote.Url) and not Path(path).is_file():
        raise FileNotFoundError(f"records file {path} not found; set data.records")
    return Layout()


def rows(path) -> int:
    return len(index(path).keys)


def texts(path, lay: Layout) -> Iterator[tuple[int, str | None, object]]:
    """(row, key, text: turns, a caption or None) for every sample, from the index."""
    idx = index(path)
    yield from ((row, key, text) for row, (key, text) in enumerate(zip(idx.keys, idx.texts)))


def digests(path, lay: Layout) -> Iterator[tuple[int, list[bytes]]]:
    """(row, the SHA-256 of each of its images) for every sample, from the index: no image is read again."""
    idx = index(path)
    for row in range(len(idx.keys)):
        yield row, [idx.image_sha256[i].tobytes() for i in idx.images_of(row)]


def where(path, lay: Layout, row: int) -> str:
    """'shards/00000.tar member 000000012.jpg': a sample's image member, or its first member."""
    idx = index(path)
    images = idx.images_of(row)
    return f"{path} member {idx.image_name[images[0]] if len(images) else idx.members[row]}"


class ImageRows:
    """The image members of samples asked in increasing order, read by offset in forward blocks of
    `remote.BLOCK` bytes (local or ranged, retried reads): memory holds one block."""

    def __init__(self, path, lay: Layout, idx: Index | None = None):
        self.path, self.idx = path, idx  # None: looked up at the first read (a fork inherits it)
        self.start, self.block = 0, b""   # the block held: bytes [start, start + len(block)) of the tar

    def _read(self, i: int) -> bytes:
        offset, size = int(self.idx.image_offset[i]), int(self.idx.image_size[i])
        if not (self.start <= offset and offset + size <= self.start + len(self.block)):
            self.start, self.block = offset, remote.read_range(self.path, offset, offset + max(size, remote.BLOCK))
        data = self.block[offset - self.start:offset - self.start + size]
        if len(data) != size:
            raise ValueError(f"{self.path} member {self.idx.image_name[i]}: shorter than its index; the tar changed "
                             f"since it was read: rerun embed")
        return data

    def images(self, row: int) -> list[bytes]:
        self.idx = self.idx or index(self.path)
        return [self._read(i) for i in self.idx.images_of(row)]
