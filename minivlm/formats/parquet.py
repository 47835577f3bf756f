"""Parquet files with the images inside: which columns hold what, and reading them by row group.

Design choices:
- The layout is recognised per file from its columns: MiniMind-V (`conversations` JSON string of
  {"role","content"} turns + `image_bytes`, binary or a list of binaries), Hugging Face (`image` struct
  {bytes, path} or `images` list of them + `conversations` / `messages` turns or `caption` / `text`),
  img2dataset (`key`, `jpg`, `caption` or `txt`). `data.image_column` / `data.text_column` name others.
- A text column named `conversations` or `messages` holds turns (a JSON string or a list of structs); any
  other is a bare caption. A column of the wrong type is refused up front, naming it and what was expected.
- Only the columns a pass needs are read, one row group at a time, in batches of `BATCH_ROWS` rows through
  a buffered stream: memory holds a batch and the page being decoded (pages are the writer's choice, ~1024
  values), never a row group's or a file's images. pyarrow's defaults (`pre_buffer=True`, no
  `buffer_size`) read a whole column chunk at once: measured, peak RSS then grew with the file (stage 1
  on a one-row-group file: 270 MB at 64 MB, 500 MB at 292 MB; with these settings it stays flat).
- What `minivlm.formats.sources` asks of a format (`minivlm.formats.tars` gives the same): `layout`, `rows`, `texts`
  (every row's id and text cell), `images` (every row's image bytes, for hashing), `where` (a row, named in
  messages) and `ImageRows` (the images of rows asked in increasing order, for stage 1's workers).
- A URL is read through `remote.open_binary` (retried byte ranges), a local file directly.
- `ImageRows` reads forward only: rows asked in increasing order cost one pass over the row groups that
  hold them; a row group holding none of them is never read.
- A read that fails (a corrupt page, a truncated file) is a ValueError naming the file and row group.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from minivlm.formats import remote

IMAGE_COLUMNS = ("image_bytes", "image", "images", "jpg", "jpeg", "png", "webp")
TEXT_COLUMNS = ("conversations", "messages", "caption", "text", "txt")
TURN_COLUMNS = ("conversations", "messages")
ID_COLUMNS = ("id", "key")
BATCH_ROWS = 64
BUFFER_BYTES = 1 << 20
REWRITE = "the file is corrupt or truncated: download or write it again"
MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    with remote.open_binary(path) as f:
        return f.read(4) == MAGIC


@dataclass(frozen=True)
class Layout:
    """Which columns of a Parquet file hold the image bytes, the text and the id."""
    image: str
    text: str
    turns: bool           # text holds turns (JSON string or list of structs), else a bare caption
    id: str | None


_FOOTERS: dict = {}  # (path, size, mtime or ETag) -> its FileMetaData: a footer read once per process


def open_file(path: Path) -> pq.ParquetFile:
    """The file opened for reading; its footer (metadata and schema) read once per process and version of the
    file: stage 1 opens a file for its layout, its rows, its texts, its digests and each worker's reads, and each
    footer read of a file by URL is one or two more requests to the store."""
    if remote.is_url(path):
        version = (str(path), remote.identity(path, ""))  # asked once per process already
    else:
        st = Path(path).stat()
        version = (str(path), st.st_size, st.st_mtime_ns)
    try:
        pf = pq.ParquetFile(remote.open_binary(path) if remote.is_url(path) else path, buffer_size=BUFFER_BYTES,
                            pre_buffer=False, metadata=_FOOTERS.get(version))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(e)}); {REWRITE}") from None
    _FOOTERS.setdefault(version, pf.metadata)
    return pf


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _image_type_ok(t: pa.DataType) -> bool:
    if pat.is_list(t) or pat.is_large_list(t):
        t = t.value_type
    if pat.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and (pat.is_binary(t.field(i).type) or pat.is_large_binary(t.field(i).type))
    return pat.is_binary(t) or pat.is_large_binary(t)


def _text_type_ok(t: pa.DataType, turns: bool) -> bool:
    if pat.is_string(t) or pat.is_large_string(t):
        return True
    return turns and (pat.is_list(t) or pat.is_large_list(t)) and pat.is_struct(t.value_type)


def _pick(path: Path, names: list[str], override: str, candidates: tuple[str, ...], what: str, key: str) -> str:
    if override:
        if override not in names:
            raise ValueError(f"{path}: no column {override!r} (data.{key}); its columns are {', '.join(names)}")
        return override
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise ValueError(f"{path}: no {what} column (looked for {', '.join(candidates)}; its columns are "
                         f"{', '.join(names)}); set data.{key} to the column that holds it")
    return found


def layout(path: Path, image_column: str = "", text_column: str = "") -> Layout:
    """The file's layout from its schema, or a one-line error naming the missing or mistyped column."""
    schema = open_file(path).schema_arrow
    names = schema.names
    image = _pick(path, names, image_column, IMAGE_COLUMNS, "image", "image_column")
    text = _pick(path, names, text_column, TEXT_COLUMNS, "text", "text_column")
    turns = text in TURN_COLUMNS
    if not _image_type_ok(schema.field(image).type):
        raise ValueError(f"{path}: column {image!r} is {schema.field(image).type}, expected image bytes (binary, a "
                         f"{{bytes, path}} struct, or a list of them); set data.image_column to the column holding them")
    if not _text_type_ok(schema.field(text).type, turns):
        want = "a JSON string or a list of turns" if turns else "a string (the caption)"
        raise ValueError(f"{path}: column {text!r} is {schema.field(text).type}, expected {want}; set "
                         f"data.text_column to the column holding the text")
    return Layout(image, text, turns, next((c for c in ID_COLUMNS if c in names and c not in (image, text)), None))


def row_starts(pf: pq.ParquetFile) -> np.ndarray:
    """(n_row_groups + 1,) first row of each row group, then the number of rows."""
    counts = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _batches(path: Path, pf: pq.ParquetFile, group: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    it = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path} row group {group}: unreadable ({_first_line(e)}); {REWRITE}") from None
        yield batch


def _scan(path: Path, columns: list[str]) -> Iterator[tuple[int, list]]:
    """(first row, [values of each column as Python objects]) per batch, over every row group in order."""
    pf = open_file(path)
    starts = row_starts(pf)
    for g in range(pf.num_row_groups):
        row = int(starts[g])
        for batch in _batches(path, pf, g, columns):
            yield row, [batch.column(c).to_pylist() for c in columns]
            row += batch.num_rows


def texts(path: Path, lay: Layout) -> Iterator[tuple[int, str | None, object]]:
    """(row, id or None, text cell: turns as a list of dicts, or a caption string, or None) for every row."""
    columns = [lay.text] + ([lay.id] if lay.id else [])
    for first, cells in _scan(path, columns):
        ids = cells[1] if lay.id else [None] * len(cells[0])
        for j, (text, rid) in enumerate(zip(cells[0], ids)):
            yield first + j, None if rid is None else str(rid), texts_of(text, lay.turns, f"{path} row {first + j}")


def digests(path: Path, lay: Layout) -> Iterator[tuple[int, list[bytes]]]:
    """(row, the SHA-256 of each of its images: none, one or several) for every row, reading the image column
    alone."""
    for first, (cells,) in _scan(path, [lay.image]):
        for j, cell in enumerate(cells):
            yield first + j, [hashlib.sha256(b).digest() for b in images_of(cell, f"{path} row {first + j}")]


def rows(path: Path) -> int:
    return open_file(path).metadata.num_rows


def where(path: Path, lay: Layout, row: int) -> str:
    return f"{path} row {row}"


def images_of(value, where: str) -> list[bytes]:
    """The image bytes of one row's image cell: binary, {bytes, path} struct, or a list of either; None -> []."""
    if value is None:
        return []
    if isinstance(value, list):
        return [b for v in value for b in images_of(v, where)]
    if isinstance(value, dict):
        if value.get("bytes") is None:
            if value.get("path"):
                raise ValueError(f"{where}: the image is only a path ({value['path']!r}), not bytes inside the file; "
                                 f"write the Parquet with the images embedded (datasets: Image(decode=True) "
                                 f"features are embedded by push_to_hub / embed_table_storage)")
            return []
        return [value["bytes"]]
    return [value]


def texts_of(value, turns: bool, where: str):
    """A row's text cell: a conversation's turns (a list; checked by `records.parse_turns`), a caption string,
    or None (no text)."""
    if value is None or not turns or not isinstance(value, str):
        return value
    try:
        value = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: conversations is not valid JSON ({e.msg} at column {e.colno}); fix the row "
                         f"or drop it from the file") from None
    if value is not None and not isinstance(value, list):
        raise ValueError(f"{where}: conversations must be a JSON list of turns, got a {type(value).__name__}; fix "
                         f"the row or drop it from the file")
    return value


class ImageRows:
    """The images of rows asked in increasing order: each row group holding one is read once, forward, in
    batches of the image column alone. Opened lazily, so an instance may cross a fork before first use."""

    def __init__(self, path: Path, lay: Layout):
        self.path, self.column = path, lay.image
        self.pf = self.starts = self.batches = self.batch = None
        self.group, self.first = -1, 0   # row group and first row of the current batch

    def images(self, row: int) -> list[bytes]:
        if self.pf is None:
            self.pf = open_file(self.path)
            self.starts = row_starts(self.pf)
        g = int(np.searchsorted(self.starts, row, side="right")) - 1
        if g != self.group or row < self.first:
            self.group, self.first, self.batch = g, int(self.starts[g]), None
            self.batches = _batches(self.path, self.pf, g, [self.column])
        try:
            while self.batch is None or row >= self.first + len(self.batch):
                if self.batch is not None:
                    self.first += len(self.batch)
                self.batch = next(self.batches).column(0)
        except ValueError:
            self.group = -1  # the next row starts its row group afresh
            raise
        return images_of(self.batch[row - self.first].as_py(), f"{self.path} row {row}")
