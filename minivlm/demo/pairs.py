"""The demo's images paired into two-image records: the answer describes the first image, then the second.

Design choices:
- Every image opens one pair and closes another (image i with image i + 1 of a fixed shuffle, cyclic), so each
  is embedded once, seen in both places, and the model can only get the order right by reading the images in
  the order of their tags.
- The answer is the two images' own demo captions, in order: what each image shows is exactly what the
  single-image demo teaches, so a trained run's gap between true and swapped images is the order it learnt.
- Written as LLaVA JSON (`image` a list, one `<image>` tag per image) over the demo's image folder, and by
  pyarrow as the Parquet files MiniMind-V (`conversations` JSON string + `image_bytes` list of binaries) and
  Hugging Face datasets (`messages` turns with image parts + `images` list of {bytes, path}) write.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from minivlm.demo.parquet import write_table
from minivlm.fileio import atomic_write_text

PROMPT = "<image>\n<image>\nDescribe the two images in order."
PARQUET_LAYOUTS = ("minimind", "hf")


def pair_records(records: list[dict], seed: int = 0) -> list[dict]:
    """Two-image LLaVA records from single-image ones (text-only ones are left out)."""
    single = [r for r in records if "image" in r]
    order = np.random.default_rng(seed).permutation(len(single)).tolist()
    out = []
    for i, j in zip(order, order[1:] + order[:1]):
        a, b = single[i], single[j]
        out.append({"id": f"{a['id']}+{b['id']}", "image": [a["image"], b["image"]], "conversations": [
            {"from": "human", "value": PROMPT},
            {"from": "gpt", "value": f"{a['conversations'][-1]['value']} {b['conversations'][-1]['value']}"}]})
    return out


def minimind_table(pairs: list[dict], images: Path) -> pa.Table:
    conv = [json.dumps([{"role": "user", "content": r["conversations"][0]["value"]},
                        {"role": "assistant", "content": r["conversations"][1]["value"]}], ensure_ascii=False)
            for r in pairs]
    data = [[(images / k).read_bytes() for k in r["image"]] for r in pairs]
    return pa.table({"conversations": pa.array(conv, pa.string()),
                     "image_bytes": pa.array(data, pa.list_(pa.binary()))})


def hf_table(pairs: list[dict], images: Path) -> pa.Table:
    """datasets' chat layout: image parts where the tags are, the images in order beside them."""
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    question = [{"type": "image", "text": None}] * 2 + [{"type": "text", "text": PROMPT.split("\n")[-1]}]
    messages = [[{"role": "user", "content": question},
                 {"role": "assistant", "content": [{"type": "text", "text": r["conversations"][1]["value"]}]}]
                for r in pairs]
    data = [[{"bytes": (images / k).read_bytes(), "path": Path(k).name} for k in r["image"]] for r in pairs]
    return pa.table({"messages": pa.array(messages, pa.list_(turn)), "images": pa.array(data, pa.list_(image))})


def write_pairs(demo_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """out_dir/{train,val}.json (images under demo_dir/images) and out_dir/parquet/<layout>/{train,val}.parquet."""
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    out = {}
    for split in ("train", "val"):
        pairs = pair_records(json.loads((demo_dir / f"{split}.json").read_text(encoding="utf-8")), seed)
        out[split] = out_dir / f"{split}.json"
        atomic_write_text(out[split], "[\n" + ",\n".join(json.dumps(r) for r in pairs) + "\n]\n")
        for layout, table in (("minimind", minimind_table), ("hf", hf_table)):
            path = out_dir / "parquet" / layout / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_table(path, table(pairs, demo_dir / "images"), 100)
            out[f"{layout}/{split}"] = path
    return out
