"""A cache by URL (`cache.dir = "s3://bucket/cache"`, any fsspec store that lists): read through a machine-local
copy of whole shards, the mirror; written by stage 1 through the same directory, uploaded shard by shard.

Layout of the mirror (`cache.mirror`; default `cache/mirror/<name>-<hash of the URL and endpoint>`): the cache's
own layout (minivlm.embedding.cache), so every reader of a local cache reads it unchanged, plus
- `mirror.json`: the remote manifest's identity (ETag, size, mtime: `remote.identity`) the copy is complete
  for, and the sha256 of every shard published in the mirror;
- `.mirror.lock`: held while one process of the machine brings the copy up to date; the others wait on it.

Design choices:
- Rows are never read at random from a store (a 98 KB row at 1 GB/s is ~10,000 GETs/s, above S3's ~5,500 a
  prefix): whole shards are copied, each in one GET (`fs.get_file` streams it to a temp file), `CONNECTIONS`
  at once (one S3 connection gives ~85-90 MB/s).
- A shard is checked before it is published in the mirror: its sha256 against the manifest, its header and
  every row against its own checksums (`cache.check_shard`, which calls the shard module), then fsync and rename
  (`fileio.atomic_write`). A shard that fails is deleted, never kept, and the error is one line naming the
  shard's URL (and the row where a row is corrupt); a rerun downloads it again and says the same.
- One copy per machine: the first process to take `.mirror.lock` (a blocking POSIX lock, gone when its process
  dies, even by kill -9) copies, the others wait and then find the copy complete: nothing is fetched twice.
- A later run on a complete copy asks the store one thing: the manifest's identity (a HEAD). The same identity
  as in `mirror.json`: the copy is used as it is, no GET. Another one (a new embed): the local manifest is
  removed first (a half-updated mirror never reads as a cache), shards whose sha256 the new manifest still
  lists are kept, the others fetched, and the manifest written last. A store whose manifest changes during the
  copy, or that has none (an embed is writing it), is refused in one line: never a mix of two embeds.
- The bytes to fetch (from one listing of `shards/`) are checked against the mirror's free space before any
  download: one line with the bytes needed and free.
- Stage 1 (`Upload`): shards are written into the mirror as for a local cache, and each is uploaded as it is
  published (one PUT, atomic on S3, GCS and the Hub: an object is whole or absent, and a shard object is only
  ever a published shard), then `failures.jsonl`, then `manifest.json` last: a store without a manifest is an
  incomplete cache. A rerun, on this machine or another, first copies down the shards the store holds and the
  mirror lacks, so it resumes from the store. The stored joins of Parquet and tar records (`sources/`) go up
  before the manifest and come down with a copy, so a run elsewhere does not hash every image again.
- `cache.storage_options` (default: `data.storage_options`) holds the store's fsspec options; reads are
  retried as every remote read is (`remote.retried`): an unreachable store is one line after the retries.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from minivlm.config import RunConfig
from minivlm.embedding import cache
from minivlm.fileio import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    DiskFull,
    free_bytes,
    sha256_file,
)
from minivlm.formats import remote, sources

CONNECTIONS = 8            # shards copied (or uploaded) at once
STATE = "mirror.json"
LOCK = ".mirror.lock"
DEFAULT_ROOT = Path("cache") / "mirror"


def storage_options(cfg: RunConfig) -> dict:
    return cfg.cache.storage_options or cfg.data.storage_options


def root_url(cfg: RunConfig) -> remote.Url:
    return remote.Url.of(cfg.cache.dir.rstrip("/"), storage_options(cfg))


def mirror_dir(cfg: RunConfig) -> Path:
    """The machine-local copy of a URL cache.dir: cache.mirror, or one keyed by the URL and the store's endpoint."""
    if cfg.cache.mirror:
        return Path(cfg.cache.mirror)
    where = json.dumps([cfg.cache.dir.rstrip("/"), storage_options(cfg).get("endpoint_url", "")])
    name = posixpath.basename(cfg.cache.dir.rstrip("/")) or "cache"
    return DEFAULT_ROOT / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


_SYNCED: dict = {}  # (url, mirror) -> the mirror: brought up to date once per process


def local(cfg: RunConfig) -> Path:
    """The local directory of cfg's cache: cache.dir itself, or for a URL its mirror, brought up to date."""
    if not remote.is_url(cfg.cache.dir):
        return Path(cfg.cache.dir)
    key = (root_url(cfg), mirror_dir(cfg))
    if key not in _SYNCED:
        _SYNCED[key] = sync(*key)
    return _SYNCED[key]


@contextlib.contextmanager
def machine_lock(mirror: Path) -> Iterator[None]:
    """The mirror's lock, waited for: one process of the machine copies, the others then find the copy done."""
    mirror.mkdir(parents=True, exist_ok=True)
    fd = os.open(mirror / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def _state(mirror: Path) -> dict:
    try:
        return json.loads((mirror / STATE).read_bytes())
    except (OSError, ValueError):
        return {}


def _identity(manifest: remote.Url, fresh: bool = False) -> str:
    """The remote manifest's identity (one HEAD), or a one-line error when the store has no manifest."""
    if fresh:
        remote.forget(manifest)
    try:
        return remote.identity(manifest, "")
    except FileNotFoundError:
        raise ValueError(f"cache {manifest.url.rsplit('/', 1)[0]} is incomplete (no manifest.json): embedding did "
                         f"not finish or is running; rerun stages/embed.py with this cache.dir to finish it") from None


def _complete(mirror: Path, state: dict, identity: str) -> bool:
    """Whether the mirror holds the whole cache of this manifest identity (files only: no byte is read)."""
    if state.get("manifest") != identity:
        return False
    manifest = cache.read_manifest(mirror) if (mirror / cache.MANIFEST).is_file() else None
    return manifest is not None and all(state.get("shards", {}).get(s["file"]) == s["sha256"] and
                                        (cache.shard_dir(mirror) / s["file"]).is_file() for s in manifest["shards"])


def sync(root: remote.Url, mirror: Path, connections: int = CONNECTIONS) -> Path:
    """Bring `mirror` up to date with the cache at `root` (see the module's notes); returns `mirror`."""
    manifest_url = root.child(cache.MANIFEST)
    with machine_lock(mirror):
        state = _state(mirror)
        if state.get("url", root.url) != root.url:
            raise ValueError(f"mirror {mirror} holds a copy of cache {state['url']}, not of {root}; set cache.mirror "
                             f"to another directory (or leave it empty: one is kept per URL)")
        identity = _identity(manifest_url)
        if _complete(mirror, state, identity):
            return mirror
        data = manifest_url.read_bytes()
        manifest = json.loads(data)
        (mirror / cache.MANIFEST).unlink(missing_ok=True)  # from here the mirror is not a cache until it is whole
        kept = _kept(mirror, manifest)
        sizes = listing(root)
        todo = [s for s in manifest["shards"] if s["file"] not in kept]
        absent = [s["file"] for s in todo if s["file"] not in sizes]
        if absent:
            raise ValueError(f"cache {root}: manifest.json lists {len(absent)} shard(s) the store does not hold "
                             f"(first: {absent[0]}); rerun stages/embed.py with this cache.dir to rewrite them")
        needed = sum(sizes[s["file"]] for s in todo)
        free = free_bytes(mirror)
        if needed > free:
            raise DiskFull(f"mirror {mirror} of cache {root}: {len(todo)} shard(s) need {needed} bytes, {free} bytes "
                           f"free; nothing was downloaded; free some space or set cache.mirror to a larger disk")
        shards = _fetch_all(root, mirror, manifest, todo, sizes, connections, kept)
        if _identity(manifest_url, fresh=True) != identity:
            raise ValueError(f"cache {root} changed while it was being copied (an embed wrote it meanwhile); rerun "
                             f"to copy it as it is now")
        _copy_down(root, mirror, sources.STORE)
        failures = root.child(cache.FAILURES)
        with contextlib.suppress(FileNotFoundError):
            atomic_write_bytes(mirror / cache.FAILURES, failures.read_bytes())
        atomic_write_bytes(mirror / cache.MANIFEST, data)
        atomic_write_json(mirror / STATE, {"url": root.url, "manifest": identity, "shards": shards})
    print(f"mirror: {len(todo)} of {len(manifest['shards'])} shard(s) of {root} copied ({needed / 1e6:.1f} MB) "
          f"-> {mirror}", flush=True)
    return mirror


def listing(root: remote.Url, folder: str = "shards") -> dict[str, int]:
    """name -> size of the store's objects in `folder` (one listing)."""
    where = root.child(folder)
    try:
        entries = remote.retried(where, lambda fs, p: fs.ls(p, detail=True, refresh=True), "list")
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"]): int(e["size"]) for e in entries if e.get("type") == "file"}


def _copy_down(root: remote.Url, mirror: Path, folder: str) -> list[str]:
    """The objects of `folder` the mirror lacks (or holds at another size), copied down as they are: the shards
    stage 1 had published (a rerun's resume), the stored joins of Parquet and tar records (a run's start-up)."""
    sizes = listing(root, folder)
    local = Path(mirror) / folder
    names = [n for n, size in sizes.items() if not (local / n).is_file() or (local / n).stat().st_size != size]
    for name in names:
        url = root.child(f"{folder}/{name}")
        atomic_write(local / name, lambda tmp: remote.retried(url, lambda fs, p: fs.get_file(p, str(tmp)), "download"),
                     needed=sizes[name])
    return names


def _kept(mirror: Path, manifest: dict) -> dict[str, str]:
    """Shards of the mirror the manifest lists with the sha256 they have (each file read: a copy only changes
    when the remote cache did); every other file in shards/ is removed."""
    want = {s["file"]: s["sha256"] for s in manifest["shards"]}
    kept = {}
    directory = cache.shard_dir(mirror)
    for p in sorted(directory.glob("*")) if directory.is_dir() else []:
        if p.name in want and sha256_file(p) == want[p.name]:
            kept[p.name] = want[p.name]
        else:
            p.unlink()
    return kept


def _fetch_all(root: remote.Url, mirror: Path, manifest: dict, todo: list[dict], sizes: dict, connections: int,
               kept: dict[str, str]) -> dict[str, str]:
    """Download, check and publish the `todo` shards, `connections` at once; the first failure stops the rest.
    Returns every shard's sha256, the kept ones' and the fetched ones'."""
    published = dict(kept)
    with ThreadPoolExecutor(max(1, connections)) as pool:
        futures = {pool.submit(fetch_shard, root, mirror, entry, manifest["fingerprint_id"], sizes[entry["file"]]):
                   entry for entry in todo}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            if f.exception() is None:
                published[futures[f]["file"]] = futures[f]["sha256"]
        for f in done:
            if f.exception() is not None:
                raise f.exception()
    return published


def fetch_shard(root: remote.Url, mirror: Path, entry: dict, fingerprint_id: str, size: int) -> None:
    """One shard: one GET into a temp file, checked (sha256, header, every row), then published."""
    url = root.child(f"shards/{entry['file']}")

    def download(tmp: Path) -> None:
        remote.retried(url, lambda fs, p: fs.get_file(p, str(tmp)), "download")
        problems = cache.check_shard(tmp, entry, fingerprint_id)
        if problems:
            first = next((p for p in problems if ": row " in p), problems[0])
            raise ValueError(first.replace(str(tmp), url.url).replace("delete the shard", "delete that object")
                             + f"; the copy was not kept in {mirror}")

    atomic_write(cache.shard_dir(mirror) / entry["file"], download, needed=size)


class Upload:
    """Stage 1 into a URL cache.dir: the mirror is the local cache; its shards go to the store as published."""

    def __init__(self, cfg: RunConfig):
        self.root, self.mirror = root_url(cfg), mirror_dir(cfg)
        self.pool = ThreadPoolExecutor(2)
        self.futures: list = []
        self.manifest_dropped = False

    def pull(self) -> None:
        """Copy down what the store holds and the mirror lacks (a rerun resumes from the store)."""
        for folder in ("shards", sources.STORE):
            _copy_down(self.root, self.mirror, folder)

    def _put(self, path: Path, key: str) -> None:
        url = self.root.child(key)
        remote.retried(url, lambda fs, p: fs.put_file(str(path), p), "upload")

    def _drop_manifest(self) -> None:
        """The store's manifest goes before its first new shard: it never describes a mix."""
        if not self.manifest_dropped:
            url = self.root.child(cache.MANIFEST)
            with contextlib.suppress(FileNotFoundError):
                remote.retried(url, lambda fs, p: fs.rm_file(p) if fs.exists(p) else None, "delete")
            self.manifest_dropped = True

    def shard(self, path: Path) -> None:
        """A shard just published in the mirror: upload it (in the background)."""
        if not self.manifest_dropped:
            (self.mirror / STATE).unlink(missing_ok=True)  # the mirror's shards change: no longer a copy of one
        self._drop_manifest()
        self.futures.append(self.pool.submit(self._put, path, f"shards/{path.name}"))

    def finish(self, manifest: dict | None) -> None:
        """Wait for the uploads; with the cache complete, upload what the store lacks, then the manifest last."""
        for f in self.futures:
            f.result()
        if manifest is None:
            return
        sizes = listing(self.root)
        wanted = {s["file"] for s in manifest["shards"]}
        paths = [cache.shard_dir(self.mirror) / name for name in sorted(wanted)]
        stale = [p for p in paths if sizes.get(p.name) != p.stat().st_size]
        if stale or set(sizes) - wanted:
            self._drop_manifest()
        for p in stale:
            self._put(p, f"shards/{p.name}")
        for name in sorted(set(sizes) - wanted):  # shards of an older, larger plan
            url = self.root.child(f"shards/{name}")
            remote.retried(url, lambda fs, p: fs.rm_file(p), "delete")
        joins = listing(self.root, sources.STORE)
        for p in sorted((self.mirror / sources.STORE).glob("*.npz")):  # the stored joins: a run's start-up
            if joins.get(p.name) != p.stat().st_size:
                self._put(p, f"{sources.STORE}/{p.name}")
        if stale or self.manifest_dropped or cache.MANIFEST not in _top(self.root):
            self._put(self.mirror / cache.FAILURES, cache.FAILURES)
            self._put(self.mirror / cache.MANIFEST, cache.MANIFEST)
        identity = _identity(self.root.child(cache.MANIFEST), fresh=True)
        with machine_lock(self.mirror):  # this machine's trainers read the mirror without downloading it
            atomic_write_json(self.mirror / STATE, {"url": self.root.url, "manifest": identity, "shards": {
                s["file"]: s["sha256"] for s in manifest["shards"]}})

    def close(self) -> None:
        """Let the uploads in flight end (a failed run keeps what reached the store)."""
        self.pool.shutdown(wait=True)


def _top(root: remote.Url) -> set[str]:
    try:
        entries = remote.retried(root, lambda fs, p: fs.ls(p, detail=False, refresh=True), "list")
    except FileNotFoundError:
        return set()
    return {posixpath.basename(e.rstrip("/")) for e in entries}
