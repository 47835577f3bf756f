"""Crash-safe file writes: a reader sees the old complete file or the new complete file, never half of one.

Every file that must be complete (shards, manifests, checkpoints, run summaries) is written under a
temporary name in the same directory, flushed, fsynced, renamed over the target with `os.replace`, and
the directory is fsynced so the rename itself survives a power cut.

Running out of space (ENOSPC, EDQUOT) while writing is a `DiskFull`: one line naming the file, how much
the write needed where known, and that a rerun resumes; the temp file is gone and nothing is published.
Every writer gets this through `atomic_write`, `atomic_dir`, `append_text` or the `writing` context.
Some writers lose the errno (torch's C++ zip writer says "unexpected pos"), so a failed write is also
taken as a full disk when the filesystem has (almost) no space left at that moment.

A published file is readable as the umask allows (0644 under 022), as a plain `open` would leave it: some
writers create their temp file 0600 (mkstemp-style), which would hide a run or an export from a teammate on
a shared machine, so every published file gets `0o666 & ~umask` before it is renamed into place.

A directory has one writer (`WriterLock`): a cache is written by one embed run, a run directory by one
training run, a sweep directory by one sweep.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_SUFFIX = ".tmp"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
NEARLY_FULL = 1 << 20  # bytes: below this, a write that failed is taken as a full disk


class RunFailed(RuntimeError):
    """A run stopped by its input or its surroundings (too many bad images, a cache locked by another run, a
    full disk): one line and exit 1, unlike a bug, which keeps its traceback."""


class DiskFull(RunFailed):
    """Out of space while writing a file: exit 1 with one line; what was published is intact."""


def free_bytes(path: str | Path) -> int:
    """Free bytes for this writer on the filesystem holding `path` (or its nearest existing parent); root
    may also use the blocks reserved for it."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def disk_full(path: str | Path, needed: int | None = None, free: int | None = None) -> DiskFull:
    free = free_bytes(path) if free is None else free
    need = f"the write needed {_mb(needed)}, {_mb(free)} free" if needed else f"{_mb(free)} free"
    return DiskFull(f"{path}: disk full ({need} in {Path(path).parent}); nothing half-written was kept; free "
                    f"some space and rerun the same command: it resumes from what is already written")


def is_disk_full(e: BaseException, path: str | Path) -> bool:
    """An exception from a write that ran out of space, by errno, by message, or by a (nearly) full disk."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if any(w in str(seen).lower() for w in FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return isinstance(e, (OSError, RuntimeError)) and free_bytes(path) < NEARLY_FULL
    except OSError:
        return False


def check_space(path: str | Path, needed: int | None) -> None:
    """Refuse a write of a known size up front when the disk cannot hold it (cheaper than failing midway)."""
    if needed:
        free = free_bytes(path)
        if free < needed:
            raise disk_full(path, needed, free)


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Around any write of `path`: running out of space becomes `DiskFull` naming it (checked before the
    caller removes its temp file, so the probe sees the disk as the write left it)."""
    check_space(path, needed)
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise disk_full(path, needed) from None
        raise


def tmp_path(path: Path) -> Path:
    """A temp name of this process and thread: two writers publishing the same file at once (the last
    two ranks to finish an embed both write the manifest) never write into one temp file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")


def umask() -> int:
    """The process's umask: from /proc where Linux says it, else set and restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path) -> None:
    """The file's mode as a plain open() under this umask gives it (0644 under 022)."""
    os.chmod(path, 0o666 & ~umask())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> Path:
    """Call write(tmp) to produce the file, then publish it at `path` atomically. `needed`: its size, if known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with writing(path, needed):
            write(tmp)
            as_umask_allows(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_dir(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> Path:
    """Build a directory in `<path>.tmp/` with write(tmp), fsync its files, and publish it with one rename
    (replacing an older `path`). A kill leaves the old directory or a `.tmp` the next writer clears."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(path, needed):
            tmp.mkdir(parents=True)
            write(tmp)
            publishable(tmp)
            fsync_dir(tmp)
            if path.exists():  # the same directory written again (the end of a resumed run): replace it
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path


def publishable(tmp: Path) -> None:
    """Every file under `tmp` readable as the umask allows and fsynced, every directory fsynced."""
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            as_umask_allows(f)
            fsync_file(f)
        else:
            fsync_dir(f)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), needed=len(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_text(path: str | Path, text: str) -> None:
    """Append to a log (metrics.jsonl); a write that runs out of space is cut back off, so the file never
    ends in half a line."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            with writing(path):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_utf8(path: str | Path) -> str:
    """A user's text file (records, configs); a UTF-8 BOM is dropped, bytes that are not UTF-8 are a
    one-line error naming the line."""
    data = (path if hasattr(path, "read_bytes") else Path(path)).read_bytes()  # a Path, or a remote.Url
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path} line {line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 "
                         f"({e.reason}); save the file as UTF-8") from None


BUGS = (AssertionError, AttributeError, NameError, ImportError)  # never reported as a bad file


@contextlib.contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """Around parsing a user's file (shard, manifest, tokenizer, checkpoint): whatever the parser raises on
    bad bytes (OSError, KeyError, a library's own Exception) becomes one ValueError naming the file and the fix."""
    try:
        yield
    except (RunFailed, FileNotFoundError, *BUGS):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, ValueError) and first.startswith(str(path)):
            raise  # already one line naming it
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {first}); {fix}") from None


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class WriterLock:
    """One writer per directory: a POSIX record lock on `<dir>/.lock`, which holds the writer's pid (for the
    refusal's message). Exclusive, or `shared` among the ranks of one torchrun embed (ranks that never talk).

    A POSIX lock (`lockf`), not `flock`: it belongs to the process that took it, so workers forked later do
    not hold it, and it is gone the moment that process dies (even by kill -9), whatever its children do.
    Use it as a context manager, or call `release`."""

    NAME = ".lock"
    held: set[Path] = set()  # POSIX locks never exclude their own process: a second lock in it is refused here

    def __init__(self, directory: str | Path, shared: bool = False, other: str = "another directory"):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = (directory / self.NAME).resolve()
        if self.path in WriterLock.held:
            raise _busy(directory, os.getpid(), other)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            pid = _pid(fd)
            os.close(fd)
            raise _busy(directory, pid, other)
        os.pwrite(fd, f"{os.getpid():>10}\n".encode(), 0)  # fixed width: ranks sharing the lock overwrite whole
        self.fd = fd
        WriterLock.held.add(self.path)

    @classmethod
    def holder(cls, directory: str | Path) -> int | None:
        """The pid writing `directory` now (-1 if it is not recorded), None when nobody holds its lock.
        Creates nothing; tests the lock by taking it for an instant."""
        path = (Path(directory) / cls.NAME).resolve()
        if path in cls.held:
            return os.getpid()  # probing would drop our own lock: closing any descriptor of the file does
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            return None if _try_lock(fd, fcntl.LOCK_EX) else _pid(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        WriterLock.held.discard(self.path)
        os.close(self.fd)  # closing drops the process's POSIX lock

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False


def _pid(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else -1


def _busy(directory: Path, pid: int, other: str) -> RunFailed:
    who = f"pid {pid}" if pid > 0 else "its pid not recorded"
    stop = f"stop it with `kill {pid}` (it stops cleanly)" if pid > 0 else "stop it"
    return RunFailed(f"{directory} is being written by another process ({who}); wait for it to end or {stop}, "
                     f"or use {other}")
