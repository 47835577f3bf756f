"""The demo's records and images rewritten as the Parquet files other tools produce, written with pyarrow
the way each producer writes them (never through minivlm's reader), for the tests, the bench and the README.

Layouts (`write_layout(demo_dir, layout, out_dir)`):
- `minimind`: MiniMind-V's pretrain/sft files: `conversations` a JSON string of {"role","content"} turns
  (ensure_ascii=False, as upstream writes them) + `image_bytes` binary. Every image is in two rows with
  different prompts; rows are shuffled and cut into two files, so copies sit in other row groups and files;
  text-only records become rows without <image> carrying an 8x8 black JPEG placeholder, as sft_i2t.parquet.
- `hf`: a Hugging Face `datasets` Image feature: `image` struct {bytes, path} + `caption`, with the
  `huggingface` schema metadata and datasets' 100-row row groups for image data. Images only.
- `img2dataset`: img2dataset's `parquet` output: its input columns (`caption`, `url`), then `key`, `status`,
  `error_message`, width/height columns and `jpg`; a failed download is a row with `jpg` and `caption` null.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from minivlm.demo.folder import PROMPTS
from minivlm.fileio import atomic_write

LAYOUTS = ("minimind", "hf", "img2dataset")


def placeholder_jpeg() -> bytes:
    """MiniMind-V's text-only rows carry an 8x8 black image."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    return buf.getvalue()


def write_table(path: Path, table: pa.Table, row_group_size: int | None) -> None:
    """Atomically; row_group_size None: pyarrow's default (one row group up to 1Mi rows, as pandas writes)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size))


def _turns(rec: dict) -> list[tuple[str, str]]:
    roles = {"human": "user", "gpt": "assistant"}
    return [(roles[t["from"]], t["value"]) for t in rec["conversations"]]


def minimind_table(records: list[dict], images: Path, seed: int = 0) -> pa.Table:
    """LLaVA records + their image folder as MiniMind-V rows: each image twice, other prompts, shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for rec in records:
        turns = _turns(rec)
        if "image" not in rec:
            rows.append((turns, placeholder_jpeg()))
            continue
        data = (images / rec["image"]).read_bytes()
        others = [p for p in PROMPTS if p != turns[0][1].replace("<image>", "").strip()]
        other = others[int(rng.integers(len(others)))]
        rows += [(turns, data), ([("user", "<image>\n" + other)] + turns[1:], data)]
    order = rng.permutation(len(rows))
    conv = [json.dumps([{"role": r, "content": c} for r, c in rows[i][0]], ensure_ascii=False) for i in order]
    return pa.table({"conversations": pa.array(conv, pa.string()),
                     "image_bytes": pa.array([rows[i][1] for i in order], pa.binary())})


def _hf(records: list[dict], images: Path) -> pa.Table:
    recs = [r for r in records if "image" in r]
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    image = pa.array([{"bytes": (images / r["image"]).read_bytes(), "path": Path(r["image"]).name} for r in recs],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "caption": [r["conversations"][-1]["value"] for r in recs]})
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def _img2dataset(records: list[dict], images: Path) -> pa.Table:
    recs = [r for r in records if "image" in r]
    rows = [(r["conversations"][-1]["value"], (images / r["image"]).read_bytes()) for r in recs]
    rows.insert(len(rows) // 2, (None, None))  # a failed download: kept as a row without image or caption
    n = len(rows)
    ok = [jpg is not None for _, jpg in rows]
    size = [96 if k else None for k in ok]
    return pa.table({
        "caption": pa.array([c for c, _ in rows], pa.string()),
        "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "key": [f"{i:09d}" for i in range(n)],
        "status": ["success" if k else "failed_to_download" for k in ok],
        "error_message": [None if k else "HTTP Error 404: Not Found" for k in ok],
        "width": pa.array(size, pa.int32()), "height": pa.array(size, pa.int32()),
        "original_width": pa.array(size, pa.int32()), "original_height": pa.array(size, pa.int32()),
        "jpg": pa.array([jpg for _, jpg in rows], pa.binary())})


def write_layout(demo_dir: Path, layout: str, out_dir: Path, files: int = 2, row_group_size: int = 100,
                 seed: int = 0) -> dict[str, list[Path]]:
    """The demo's train and val records in `layout`: train cut into `files` files, val in one. Returns the paths."""
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    images = demo_dir / "images"
    out: dict[str, list[Path]] = {}
    for split, n_files in (("train", files), ("val", 1)):
        records = json.loads((demo_dir / f"{split}.json").read_text(encoding="utf-8"))
        table = (minimind_table(records, images, seed) if layout == "minimind" else
                 _hf(records, images) if layout == "hf" else _img2dataset(records, images))
        bounds = np.linspace(0, len(table), n_files + 1).astype(int)
        names = [f"{split}-{i:05d}-of-{n_files:05d}.parquet" for i in range(n_files)]
        if layout == "img2dataset":  # img2dataset names its shards 00000.parquet, 00001.parquet, ...
            names = [f"{split}/{i:05d}.parquet" for i in range(n_files)]
        out[split] = [out_dir / name for name in names]
        for path, lo, hi in zip(out[split], bounds[:-1], bounds[1:]):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_table(path, table.slice(lo, hi - lo), row_group_size)
    return out
