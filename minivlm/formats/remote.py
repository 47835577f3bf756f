"""Files by URL (object storage: s3://, gs://, hf://, https://) through fsspec, read in retried byte ranges.

Design choices:
- A remote file is a `Url`: the URL and the filesystem options of `data.storage_options` (endpoint_url,
  anon, ...; credentials come from the usual environment), so a DataLoader worker opens it with nothing
  else. It offers the few things `minivlm.formats.sources` asks of a local `Path` (name, stem, suffix, read_bytes).
- Every read is a byte range (`fs.cat_file(path, start, end)`), so a read that fails (a dropped connection,
  a 5xx, a timeout) is retried as is: up to `RETRIES` tries, `BACKOFF_S` doubling between them. Then it
  is a `RemoteError`, one line naming the URL, that stops the run: a rerun resumes, and no image is ever
  recorded as failed because the store was down for a while. A missing file, a refused access or missing
  credentials are not retried: stage 1 records that image as failed (failures.jsonl) and goes on.
- `open_binary` gives a buffered, seekable file over ranged reads (`BLOCK` bytes each): tars stream
  through it, pyarrow reads Parquet footers and pages through it; local paths are plain files.
- A remote file's metadata (size, ETag, mtime: `info`) is asked once per process, however many images and
  records refer to it, or taken from the listing that found it (a glob, a directory): per file, not per image,
  whatever the format (tars, Parquet, JSON records, an image root). The first answer holds for the process (a
  store with a 30 ms answer and a per-request price makes a HEAD per image cost days on 10M images); DataLoader
  workers are forked after the parent asked, so they inherit it and ask nothing. A file rewritten while a run
  reads it is caught by its images' SHA-256 (stage 1's check), and the next process asks again.
- A remote file's identity is its ETag, size and mtime from `info()`: nothing is downloaded to compute it.
- A whole file (`Url.read_bytes`: an image under a URL image root, JSON records) is one GET: a range from byte
  0, since s3fs asks a plain read's size first (a HEAD an image); an empty file has no such range and is read
  plainly.
- fsspec and its backends are an optional extra (`pip install 'minivlm[remote]'`); without them a URL is
  one line naming the extra.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

EXTRA = "pip install 'minivlm[remote]'"
RETRIES = 5                # tries of one read before it is a RemoteError
BACKOFF_S = 0.25           # wait before the second try; doubled before each later one
BLOCK = 4 << 20            # bytes of one ranged read under open_binary
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")  # botocore, google-auth


class RemoteError(ValueError):
    """A remote read that failed every retry: one line naming the URL."""


def is_url(spec: str | Path) -> bool:
    return isinstance(spec, Url) or "://" in str(spec)


def _options_key(options: dict | None) -> str:
    return json.dumps(options or {}, sort_keys=True)


@dataclass(frozen=True, order=True)
class Url:
    """A file in object storage: its URL and the fsspec filesystem options (a JSON string: hashable)."""
    url: str
    options: str = "{}"

    @classmethod
    def of(cls, url: str, options: dict | None = None) -> "Url":
        return cls(url, _options_key(options))

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    @property
    def stem(self) -> str:
        return self.name.split(".")[0] if "." in self.name else self.name

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def child(self, key: str) -> "Url":
        return Url(self.url.rstrip("/") + "/" + key, self.options)

    def read_bytes(self) -> bytes:
        return retried(self, _whole)

    def size(self) -> int:
        return int(info(self)["size"])


def filesystem(url: Url):
    """(fsspec filesystem, path inside it) for `url`, or a one-line error naming the extra to install."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{url}: reading URLs needs fsspec and the backend for its scheme; {EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url.url, **json.loads(url.options))
    except ImportError as e:  # fsspec without this scheme's backend (s3fs, gcsfs, huggingface_hub, aiohttp)
        raise ValueError(f"{url}: no fsspec backend for this URL ({e}); {EXTRA}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{url}: cannot open this URL ({e}); check the scheme and data.storage_options") from None


def retried(url: Url, read, what: str = "read"):
    """read(fs, path) with retries and doubling backoff; a RemoteError naming the URL once every try failed."""
    fs, path = filesystem(url)
    for attempt in range(RETRIES):
        try:
            return read(fs, path)
        except PERMANENT as e:
            error = FileNotFoundError if isinstance(e, FileNotFoundError) else RemoteError
            raise error(f"{url}: {type(e).__name__} ({first_line(e)}); check the URL and data.storage_options "
                        f"(credentials come from the environment)") from None
        except Exception as e:  # connection dropped, timeout, 5xx: the backends raise many kinds
            if type(e).__name__ in NO_CREDENTIALS:
                raise RemoteError(f"{url}: no credentials ({first_line(e)}); set them in the environment "
                                  f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN), "
                                  f"or data.storage_options = {{anon = true}} for a public bucket") from None
            if attempt == RETRIES - 1:
                raise RemoteError(f"{url}: {what} failed {RETRIES} times, the last with {type(e).__name__} "
                                  f"({first_line(e)}); check the network or data.storage_options, then rerun") from None
            time.sleep(BACKOFF_S * 2 ** attempt)
            if hasattr(fs, "invalidate_cache"):
                fs.invalidate_cache(path)


def gave_up(reason: str) -> bool:
    """Whether a failure's reason is a remote read that failed every retry."""
    return f" failed {RETRIES} times, the last with " in reason


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


_INFO: dict = {}  # Url -> its info(): asked once per process; a forked DataLoader worker inherits its parent's


def info(url: Url) -> dict:
    """The file's metadata (size, ETag, mtime, type), asked of the store at its first use in this process."""
    if url not in _INFO:
        _INFO[url] = retried(url, lambda fs, p: fs.info(p), "info")
    return _INFO[url]


def forget(url: Url) -> None:
    """The next `info(url)` asks the store again (a file that may have been rewritten: a remote manifest)."""
    _INFO.pop(url, None)


def _whole(fs, path: str) -> bytes:
    """A whole file in one request (see the module's notes)."""
    try:
        return fs.cat_file(path, start=0, end=None)
    except PERMANENT:
        raise
    except Exception:  # an empty file (416: no byte 0), or a dropped connection: tried once plainly, then retried
        return fs.cat_file(path)


def identity(url: Url, extra: str) -> str:
    """What identifies a remote file's bytes without reading them: ETag (or checksum), size, mtime."""
    meta = info(url)
    tag = next((str(meta[k]) for k in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "blob_id", "sha256")
                if meta.get(k)), "")
    mtime = next((str(meta[k]) for k in ("LastModified", "mtime", "updated", "last_modified") if meta.get(k)), "")
    return hashlib.sha256(f"{meta.get('size')}:{tag}:{mtime}:{extra}".encode()).hexdigest()[:20]


def read_range(path: Path | Url, start: int, end: int) -> bytes:
    """Bytes [start, end) of a local file or a URL (retried)."""
    if isinstance(path, Url):
        return retried(path, lambda fs, p: fs.cat_file(p, start=start, end=end))
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a URL whose every read is one retried byte range."""

    def __init__(self, url: Url):
        self.url, self.pos, self.length = url, 0, url.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR
                       else self.length + offset)
        return self.pos

    def readinto(self, buf) -> int:
        end = min(self.pos + len(buf), self.length)
        if end <= self.pos:
            return 0
        data = read_range(self.url, self.pos, end)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_binary(path: Path | Url):
    """A buffered binary file: local, or ranged reads of a URL."""
    if isinstance(path, Url):
        return io.BufferedReader(RangeFile(path), buffer_size=BLOCK)
    return open(path, "rb")


def _listed(full, entries) -> list[Url]:
    """The Urls of a listing's entries; each file's entry is its info() for this process (no HEAD per file)."""
    out = []
    for meta in entries:
        out.append(full(meta["name"]))
        if meta.get("type") == "file":
            _INFO.setdefault(out[-1], meta)
    return out


def expand(spec: str, options: dict | None, suffixes: tuple[str, ...]) -> list[Url]:
    """The files a URL names: itself, its matches if it holds a wildcard, or a "directory"'s files with the
    first of `suffixes` that any has; sorted."""
    url = Url.of(spec, options)
    protocol = spec.split("://", 1)[0]
    full = lambda p: Url.of(p if "://" in p else f"{protocol}://{p}", options)  # noqa: E731
    if any(c in spec for c in "*?["):
        found = _listed(full, retried(url, lambda fs, p: fs.glob(p, detail=True), "list").values())
        if not found:
            raise FileNotFoundError(f"records glob {spec!r} matches no file; check data.records / data.val_records")
        return sorted(found)
    if info(url).get("type") != "directory":
        return [url]
    names = _listed(full, retried(url, lambda fs, p: fs.ls(p, detail=True), "list"))
    for suffix in suffixes:
        files = sorted(u for u in names if fnmatch.fnmatch(u.url, f"*{suffix}"))
        if files:
            return files
    raise FileNotFoundError(f"records directory {spec} has no {' or '.join(suffixes)} file; point data.records at a "
                            f"file, a glob or a brace pattern")
