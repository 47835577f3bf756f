"""The demo's records and images rewritten as img2dataset's `webdataset` output, with the stdlib `tarfile` the
way img2dataset writes it (through webdataset's TarWriter), never through minivlm's reader: for the tests,
the bench and the README.

- Shards `{out}/{split}/00000.tar, 00001.tar, ...`; a sample's members `KEY.jpg`, `KEY.json`, `KEY.txt` in
  that (sorted) order, KEY five digits of shard and four of position (`000010023`), mode 0o444, owner
  `bigdata`, one mtime, the stream format TarWriter uses (`w|`, PAX).
- `KEY.json` is img2dataset's metadata (indent 4): url, caption, key, status, error_message, width, height,
  original_width, original_height. A failed download is in no tar (img2dataset keeps it only in the
  shard's Parquet of statuses); its position is still used, so keys have gaps as img2dataset's have.
- `repeat` images of each split appear a second time at the end (the same image under another URL): a tar
  set holds duplicates, which stage 1 embeds once.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from minivlm.fileio import atomic_write

MTIME = 1_700_000_000  # one fixed time: the same inputs give the same tar bytes


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), MTIME, 0o444, "bigdata", "bigdata"
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[str, bytes | None, str]]) -> None:
    """(key, jpg bytes or None for a failed download, caption) -> one img2dataset shard, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for i, (key, jpg, caption) in enumerate(samples):
                if jpg is None:
                    continue
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": 96, "height": 96, "original_width": 96, "original_height": 96}
                for ext, data in (("jpg", jpg), ("json", json.dumps(meta, indent=4).encode()),
                                  ("txt", caption.encode())):
                    _member(tf, f"{key}.{ext}", data)
    atomic_write(path, write)


def records_as_tars(records: list[dict], images: Path, out_dir: Path, per_tar: int, repeat: int = 0,
                    failed: bool = True) -> list[Path]:
    """LLaVA records with images (the last turn is the caption) as img2dataset shards `out_dir/NNNNN.tar`."""
    items = [((images / r["image"]).read_bytes(), r["conversations"][-1]["value"]) for r in records if "image" in r]
    items += items[:repeat]
    if failed:
        items.insert(len(items) // 2, (None, ""))  # a failed download: a gap in the keys
    out = []
    for shard, lo in enumerate(range(0, len(items), per_tar)):
        out.append(Path(out_dir) / f"{shard:05d}.tar")
        write_tar(out[-1], [(f"{shard:05d}{pos:04d}", jpg, caption)
                            for pos, (jpg, caption) in enumerate(items[lo:lo + per_tar])])
    return out


def write_tars(demo_dir: Path, out_dir: Path, per_tar: int = 64, repeat: int = 8) -> dict[str, list[Path]]:
    """The demo's train and val images with their captions as img2dataset tars. Returns the paths per split."""
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    return {split: records_as_tars(json.loads((demo_dir / f"{split}.json").read_text(encoding="utf-8")),
                                   demo_dir / "images", out_dir / split, per_tar, repeat)
            for split in ("train", "val")}
