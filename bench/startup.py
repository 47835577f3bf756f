"""P6: stage 2's start-up on many records: wall time and peak memory of `trainer.fit` with
`train.max_steps=1` (what `stages/train.py` runs), the first run (records read, joined with the cache and
tokenized) and the rerun (the stored samples), for LLaVA JSONL and MiniMind-V Parquet records.

    python bench/startup.py --records 1000000 [--work bench/work/startup] [--repo DIR] [--out FILE.json]

The records cycle over the demo's images (`images` unique ones, embedded once per layout: a small cache, so the
figures are the records' cost, not the cache's); each JSONL record and each Parquet row (`conversations` +
`image_bytes`, as MiniMind-V ships them) is one sample. Every run is a child process timed from its start, so
the interpreter and imports count as a user sees them; its peak memory is VmHWM (see peak_rss.py). The same
runs on the demo's own `images` records give the fixed cost (imports, tokenizer, model), and `per_million_mb`
is what the records add. `--repo` runs another checkout's minivlm (before/after figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARQUET_GROUP = 100_000   # rows per row group, as a writer batching its rows writes them


def _child(config: str, repo: str, overrides: list[str]) -> None:
    sys.path.insert(0, repo)
    from minivlm.config import load_config
    from minivlm.dist import Dist
    from minivlm.training.trainer import fit

    fit(load_config(config, overrides), Dist())
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mb": hwm / 1024}), flush=True)


def write_jsonl(path: Path, demo: list[dict], n: int) -> Path:
    """n LLaVA records cycling over the demo's (each keeps its image, prompt and caption; ids are new)."""
    if path.is_file() and sum(1 for _ in open(path, "rb")) == n:
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            rec = demo[i % len(demo)]
            f.write(json.dumps({"id": f"{i:09d}", "image": rec["image"], "conversations": rec["conversations"]}) + "\n")
    os.replace(tmp, path)
    return path


def write_parquet(path: Path, demo: list[dict], image_root: Path, n: int) -> Path:
    """n MiniMind-V rows ({"role","content"} JSON + the JPEG bytes) cycling over the demo's records; the image
    column dictionary-encoded, so the file stays small although every row holds its image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == n:
        return path
    roles = {"human": "user", "gpt": "assistant"}
    conv = [json.dumps([{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
                       ensure_ascii=False) for r in demo]
    data = [(image_root / r["image"]).read_bytes() for r in demo]
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", pa.binary())])
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, dictionary_pagesize_limit=1 << 28) as w:
        for lo in range(0, n, PARQUET_GROUP):
            ix = [i % len(demo) for i in range(lo, min(n, lo + PARQUET_GROUP))]
            w.write_table(pa.table({"conversations": [conv[i] for i in ix], "image_bytes": [data[i] for i in ix]},
                                   schema=schema))
    os.replace(tmp, path)
    return path


def _run(config: Path, repo: str, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / "startup.py"), "--child", str(config), "--repo", repo, *overrides],
                       capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"stage-2 start-up child failed ({' '.join(overrides)}):\n{r.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(r.stdout.strip().splitlines()[-1])}


def measure(work: Path, n_records: int, repo: str = str(REPO), images: int = 1000, log=print) -> dict:
    """First run and rerun on n_records and on the demo's own records, JSONL and Parquet."""
    sys.path.insert(0, repo)
    from minivlm.config import load_config
    from minivlm.demo.folder import make_demo
    from minivlm.dist import Dist
    from minivlm.embedding.embed import run_embed

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train.json").is_file():
        make_demo(data, n_train=images, n_val=32, seed=0)
    demo = [r for r in json.loads((data / "train.json").read_text()) if "image" in r]
    config = REPO / "configs" / "demo.toml"
    base = [f"data.image_root={data}/images", f"encoder.name_or_path={data}/encoder", "encoder.local_files_only=true",
            f"tokenizer.name_or_path={data}/tokenizer", "data.val_records=", "encoder.num_workers=0",
            "train.max_steps=1", "train.eval_batches=1", "train.num_workers=0"]
    files = {"jsonl": {"small": write_jsonl(work / "small.jsonl", demo, len(demo)),
                       "large": write_jsonl(work / f"records-{n_records}.jsonl", demo, n_records)},
             "parquet": {"small": write_parquet(work / "small.parquet", demo, data / "images", len(demo)),
                         "large": write_parquet(work / f"records-{n_records}.parquet", demo, data / "images", n_records)}}
    out = {"records": n_records, "unique_images": len(demo), "repo": repo}
    for layout, paths in files.items():
        fig = {"file_mb": paths["large"].stat().st_size / 1e6}
        for size, path in paths.items():
            cache_dir = work / f"cache-{layout}-{size}"
            overrides = base + [f"data.records={path}", f"cache.dir={cache_dir}"]
            log(f"P6 {layout}: stage 1 on {path.name}")  # done: seconds (a check); else the cache, and its join
            run_embed(load_config(config, overrides), Dist())
            for d in ("samples", "text"):  # what an earlier stage-2 run kept
                shutil.rmtree(cache_dir / d, ignore_errors=True)
            for run in ("first", "rerun"):
                shutil.rmtree(work / "runs", ignore_errors=True)
                fig[f"{size}_{run}"] = _run(config, repo, overrides + [f"train.out_dir={work}/runs"])
                log(f"P6 {layout} {size} {run}: {fig[f'{size}_{run}']['wall_s']:.1f} s, "
                    f"{fig[f'{size}_{run}']['peak_mb']:.0f} MB")
        scale = 1e6 / (n_records - len(demo))
        for run in ("first", "rerun"):
            fig[f"{run}_per_million_mb"] = (fig[f"large_{run}"]["peak_mb"] - fig[f"small_{run}"]["peak_mb"]) * scale
            fig[f"{run}_per_million_s"] = (fig[f"large_{run}"]["wall_s"] - fig[f"small_{run}"]["wall_s"]) * scale
        out[layout] = fig
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=1000, help="unique images the records cycle over")
    ap.add_argument("--work", default=str(HERE / "work" / "startup"))
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose minivlm runs (before/after figures)")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        return _child(args.child, args.repo, rest)
    res = measure(Path(args.work), args.records, args.repo, args.images)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
