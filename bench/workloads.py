"""The two bench workloads and their artefacts under the bench work dir (built once, reused by later runs).

- `demo`: the embedded demo (make_demo: 96 px synthetic shapes, tiny CLIP 64 px / patch 8, pool 2 ->
  T=16, D=64) with the model of configs/demo.toml. Its caches are real stage-1 output (run_embed).
- `b16`: the MiniMind 512x8 LM (configs/llava_pretrain.toml) on 196x768 rows. The encoder is a
  ViT-B/16-shaped CLIPVisionModel with the openai/clip-vit-base-patch16 config values and random
  weights (real compute, nothing downloaded), saved with save_pretrained + a 224 px CLIP processor.
  Images are synthetic 500x375 JPEGs (~35 KB, photo-like: smooth colour field, shapes, grain).
  Embedding thousands of images takes ~10 min on 2 CPU cores, so the b16 caches hold synthetic N(0, 1)
  rows written directly with shard.write_shard through the codec (same format, same keys as the JPEGs);
  the encoder is timed on a few hundred images for P4 and runs live in the P1 baselines.

Each cache exists twice: N and 4N images (P5 compares their peak RSS); the 4N one feeds P1-P3. The 4N
one exists a third time stored with the 8-bit codec CODEC8 (the codec figures: its P2, P3 and bytes).
P4 also embeds the same images from a MiniMind-V Parquet file (every image in two rows, pyarrow's default
single row group) and from img2dataset tars (`demo_tars`: TAR_SAMPLES samples a tar, a brace pattern), and a
fifth of them cut into tiles (`encoder.tiles` = TILES: about as many tiles as P4 has images).
b16 adds stage 1's peak memory on Parquet files of N and 4N photos (one row group each: the worst case for a
reader that loads a row group whole), embedded by a tiny 224 px tower in one process, so the source's share of
the memory is not hidden under ViT-B/16's.
A marker with the build parameters is written last, so an interrupted or differently sized build is redone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from minivlm import __version__
from minivlm.config import RunConfig, load_config
from minivlm.demo.parquet import minimind_table, write_table
from minivlm.demo.tars import records_as_tars
from minivlm.dist import Dist
from minivlm.embedding import cache, shard
from minivlm.embedding.encoder import fingerprint_id, spec_of
from minivlm.fileio import atomic_write_json, atomic_write_text, sha256_file
from minivlm.formats.records import load_records
from minivlm.formats.sources import open_sources, sources_hash

REPO = Path(__file__).resolve().parents[1]
V3_TOKENIZER = REPO.parent / "shared" / "ref" / "minimind-tokenizer-v3"
CODEC8 = "int8"  # the 8-bit codec the codec figures measure (the better of int8 / float8_e4m3 on error)
TAR_SAMPLES = 32  # samples a tar in P4's tar set (img2dataset writes 10,000; a few tars even at smoke size)
TILES = "anyres"  # P4's tiled run: LLaVA-NeXT's grids; the demo's squares and b16's 4:3 photos: 2 x 2 + the base image
B16_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
               "Render a clear and concise summary of the photo.", "Share a concise interpretation of the image provided.")


@dataclass(frozen=True)
class Sizes:
    """What a bench mode builds and runs. `n` and `4n` are the two cache sizes."""
    n: int                      # images in the small cache (P5); the training cache has 4n
    batch: int                  # train.batch_size (both loops)
    workers: int                # decode workers: encoder.num_workers (stage 1, the live loops' DataLoader)
    readers: int                # train.num_workers: reader threads of the cached loop
    enc_batch: int              # encoder.batch_size (stage 1, encoder-only, live loop encodes per train batch)
    embed_images: int           # images run_embed embeds for P4
    warmup: int                 # untimed steps before each loop's timed windows
    steps: int                  # timed train steps per window (cached / RAM)
    live_steps: int             # timed train steps per window (live loops: slower)
    repeats: int                # windows per figure; figures are medians
    read_rows: int              # rows per P3 window (warm)
    cold_rows: int              # rows per P3 window after eviction
    rss_steps: int              # train steps in each P5 child
    remote_rounds: int = 0      # P4-remote rounds (0: not measured)


@dataclass(frozen=True)
class Workload:
    name: str
    cfg: RunConfig              # the training config on the 4n cache
    small_cfg: RunConfig        # the same on the n cache (P5)
    codec_cfg: RunConfig        # the same on the 4n cache stored with CODEC8
    embed_cfg: RunConfig        # stage 1 for P4 (records of `embed_images` images, cache.dir to be replaced)
    parquet_embed_cfg: RunConfig  # the same images from a MiniMind-V Parquet file
    tar_embed_cfg: RunConfig    # the same images from img2dataset tars (a brace pattern)
    tiles_embed_cfg: RunConfig  # stage 1 with encoder.tiles = TILES over `tiles_images(sizes)` of those images
    parquet_rss_cfgs: dict | None  # {"n", "4n"}: stage 1 on Parquet files of n and 4n images (P5, b16 only)
    sft_cfg: RunConfig | None   # SFT-like samples on the training cache (P7, demo only): see sft_records
    tiled_cfg: RunConfig | None  # the training records on a cache tiled with TILES (P2 tiled, demo only)
    sizes: Sizes
    info: dict                  # printable description for the JSON


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _marker_ok(path: Path, params: dict) -> bool:
    try:
        return json.loads(path.read_text()) == params
    except (OSError, ValueError):
        return False


def _write_records(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def _subset(src: Path, dst: Path, n: int) -> Path:
    records = json.loads(src.read_text())
    _write_records(dst, [r for r in records if "image" in r][:n])
    return dst


def parquet_of(records: Path, image_root: Path, out: Path, row_group_size: int | None = None) -> Path:
    """The records as MiniMind-V Parquet (`demo_parquet.minimind_table`: every image in two rows), built once."""
    params = {"records_hash": sha256_file(records), "row_group_size": row_group_size}
    marker = out.with_name(out.name + ".json")
    if not (out.is_file() and _marker_ok(marker, params)):
        write_table(out, minimind_table(json.loads(records.read_text()), image_root), row_group_size)
        atomic_write_json(marker, params)
    return out


def tars_of(records: Path, image_root: Path, out: Path, per_tar: int = TAR_SAMPLES) -> str:
    """The records as img2dataset tars of `per_tar` samples under `out/`, built once; their brace pattern."""
    params = {"records_hash": sha256_file(records), "per_tar": per_tar}
    marker = out / "bench_marker.json"
    if not _marker_ok(marker, params):
        shutil.rmtree(out, ignore_errors=True)
        records_as_tars(json.loads(records.read_text()), image_root, out, per_tar, failed=False)
        atomic_write_json(marker, params)
    n = len(list(out.glob("*.tar")))
    return f"{out}/{{00000..{n - 1:05d}}}.tar"


def tiles_images(sizes: Sizes) -> int:
    """Images of P4's tiled run: a fifth of P4's, so their tiles (5 an image) hold about as many pixels."""
    return max(1, sizes.embed_images // 5)


def with_tiles(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, tiles=TILES))


def with_records(cfg: RunConfig, records: Path, **encoder) -> RunConfig:
    """cfg reading `records` (Parquet: no image root), with `encoder` fields replaced."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, records=str(records), image_root=""),
                               encoder=dataclasses.replace(cfg.encoder, **encoder))


def sft_records(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """SFT-like samples on these records' images: 1-3 user/assistant turns, 1-3 images at tags in the user turns
    (the first always opens the first turn), 70-500 words of text (~100-700 tokens of the demo tokenizer), the
    answers the images' own captions and more. Multi-turn lengths spread this widely, so a padded batch is mostly
    padding: what packing is for (issue "Samples of any shape")."""
    from minivlm.demo.folder import PROMPTS

    single = [r for r in records if "image" in r]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        picked = [single[j] for j in rng.choice(len(single), int(rng.integers(1, 4)), replace=False)]
        turns, words = int(rng.integers(1, 4)), int(rng.integers(70, 501))
        captions = [r["conversations"][-1]["value"] for r in picked]
        text = " ".join(captions[k % len(captions)] for k in range(200)).split()[:words]
        cut = np.linspace(0, len(text), 2 * turns + 1).astype(int)
        tags = [0] + sorted(rng.integers(0, turns, len(picked) - 1).tolist())  # the user turn each image opens
        conv = []
        for t in range(turns):
            question = " ".join([PROMPTS[int(rng.integers(len(PROMPTS)))]] + text[cut[2 * t]:cut[2 * t + 1]])
            conv += [{"from": "human", "value": "<image>\n" * tags.count(t) + question},
                     {"from": "gpt", "value": " ".join(text[cut[2 * t + 1]:cut[2 * t + 2]]) or "A shape."}]
        out.append({"id": f"sft-{i:05d}", "image": [r["image"] for r in picked], "conversations": conv})
    return out


# ---- demo -------------------------------------------------------------------------------------------

def build_demo(work: Path, sizes: Sizes, device: str, smoke: bool) -> Workload:
    from minivlm.demo.folder import make_demo
    from minivlm.embedding.embed import run_embed

    root = work / "demo"
    n_train = 4 * sizes.n
    with _quiet():
        make_demo(root / "data", n_train=n_train, n_val=32, seed=0)
    recs = {k: _subset(root / "data" / "train.json", root / f"records-{k}.json", k)
            for k in (sizes.n, 4 * sizes.n, sizes.embed_images, tiles_images(sizes))}
    base = [f"data.image_root={root}/data/images", f"encoder.name_or_path={root}/data/encoder",
            "encoder.local_files_only=true", f"tokenizer.name_or_path={root}/data/tokenizer", "data.val_records=",
            f"train.batch_size={sizes.batch}", f"train.num_workers={sizes.readers}", "train.eval_batches=1",
            f"encoder.batch_size={sizes.enc_batch}", f"encoder.num_workers={sizes.workers}",
            f"train.out_dir={work}/runs"] + (["encoder.dtype=bfloat16"] if device.startswith("cuda") else [])

    def cfg_for(k: int, dtype: str = "float16") -> RunConfig:
        return load_config(REPO / "configs" / "demo.toml", base + [
            f"data.records={recs[k]}", f"cache.dir={root}/cache-{k}" + ("" if dtype == "float16" else f"-{dtype}"),
            f"cache.dtype={dtype}"])

    cfg, small, codec = cfg_for(4 * sizes.n), cfg_for(sizes.n), cfg_for(4 * sizes.n, CODEC8)
    for c in (cfg, small, codec):
        with _quiet():
            run_embed(c, Dist(device=device))  # skips when the cache is already complete
            cache.upgrade(c.cache.dir)  # one an older minivlm wrote (CRC-32 rows): as run_embed writes it now
    embed = cfg_for(sizes.embed_images)
    parquet = parquet_of(recs[sizes.embed_images], root / "data" / "images", root / f"records-{sizes.embed_images}.parquet")
    tar_set = tars_of(recs[sizes.embed_images], root / "data" / "images", root / f"tars-{sizes.embed_images}")
    sft = root / f"records-sft-{4 * sizes.n}.json"
    if not sft.is_file():
        _write_records(sft, sft_records(json.loads(recs[4 * sizes.n].read_text()), 2 * sizes.n))
    sft_cfg = load_config(REPO / "configs" / "demo.toml", base + [
        f"data.records={sft}", f"cache.dir={root}/cache-{4 * sizes.n}", "tokenizer.max_len=1024",
        "model.max_seq_len=1024"])
    tiled = load_config(REPO / "configs" / "demo.toml", base + [  # an image: 5 tiles, 16 + 8 x 9 = 88 positions
        f"data.records={recs[4 * sizes.n]}", f"cache.dir={root}/cache-{4 * sizes.n}-{TILES}", f"encoder.tiles={TILES}",
        "tokenizer.max_len=160", "model.max_seq_len=192"])
    with _quiet():
        run_embed(tiled, Dist(device=device))
    return Workload("demo", cfg, small, codec, embed, with_records(embed, parquet), with_records(embed, tar_set),
                    with_tiles(cfg_for(tiles_images(sizes))), None, sft_cfg, tiled, sizes,
                    {"images": f"{n_train} synthetic 96x96 JPEG/PNG (make_demo)",
                     "encoder": "tiny CLIP 64px/patch 8, 2 layers, D=64, pool 2",
                     "T": 16, "D": 64, "model": "configs/demo.toml (dim 128 x 4 layers)", "cache": "run_embed output",
                     "tokenizer": "demo BPE"})


# ---- b16 --------------------------------------------------------------------------------------------

def photo(i: int, w: int = 500, h: int = 375, seed: int = 7) -> Image.Image:
    """A photo-sized synthetic image: smooth random colour field, a few shapes, sensor-like grain."""
    from minivlm.demo.folder import SHAPES, draw_shape

    rng = np.random.default_rng([seed, i])
    im = Image.fromarray(rng.integers(40, 220, (4, 5, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(0, w), rng.uniform(0, h),
                   rng.uniform(20, 120), tuple(int(c) for c in rng.integers(0, 256, 3)), rng.uniform(-30, 30))
    grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + grain, 0, 255).astype(np.uint8))


def _b16_records(n: int) -> list[dict]:
    from minivlm.demo.folder import caption, sample_scene

    out = []
    for i in range(n):
        rng = np.random.default_rng([11, i])
        out.append({"id": f"{i:06d}", "image": f"{i:06d}.jpg", "conversations": [
            {"from": "human", "value": B16_PROMPTS[i % len(B16_PROMPTS)] + "\n<image>"},
            {"from": "gpt", "value": caption(sample_scene(rng), rng)}]})
    return out


def _b16_encoder(path: Path, shape: dict) -> None:
    from minivlm.demo.folder import build_tiny_clip

    if _marker_ok(path / "bench_marker.json", shape):
        return
    shutil.rmtree(path, ignore_errors=True)
    build_tiny_clip(path, image_size=shape["image_size"], patch_size=shape["patch_size"],
                    hidden_size=shape["hidden_size"], layers=shape["layers"], heads=shape["heads"], seed=0)
    atomic_write_json(path / "bench_marker.json", shape)


def _b16_images(images: Path, n: int) -> None:
    marker = images / "bench_marker.json"
    have = json.loads(marker.read_text())["n"] if marker.is_file() else 0
    if have >= n:
        return
    images.mkdir(parents=True, exist_ok=True)
    for i in range(have, n):  # image i never depends on n, so a larger build extends a smaller one
        photo(i).save(images / f"{i:06d}.jpg", "JPEG", quality=85)
    atomic_write_json(marker, {"n": n})


def synthetic_cache(cfg: RunConfig, tokens: int, width: int, seed: int = 0) -> None:
    """A complete cache for cfg.data.records whose rows are N(0, 1) noise stored with cfg.cache.dtype's codec,
    written with the library's own write_shard/finalize: the format, keys and manifest are what stage 1
    writes, the numbers are not. The same seed gives the same noise whatever the codec."""
    cache_dir = Path(cfg.cache.dir)
    records = load_records(cfg.data.records)
    params = {"records_hash": sources_hash(open_sources(cfg.data.records, cfg.data)), "tokens": tokens, "width": width, "seed": seed,
              "shard_size": cfg.cache.shard_size, "dtype": cfg.cache.dtype, "format": cache.FORMAT_VERSION}
    if _marker_ok(cache_dir / "bench_marker.json", params) and cache.read_manifest(cache_dir):
        cache.upgrade(cache_dir)  # one an older minivlm wrote (CRC-32 rows): as write_shard writes it now
        return
    shutil.rmtree(cache_dir, ignore_errors=True)
    plan = cache.plan_shards([k for r in records for k in r.images], cfg.cache.shard_size)
    fields = {"arch": "CLIPVisionModel", "weights": "synthetic-rows", "processor": "synthetic-rows",
              **spec_of(cfg.encoder, cfg.cache.dtype)}
    fid, fp_json = fingerprint_id(fields), json.dumps(fields, sort_keys=True)
    codec = shard.Codec(cfg.cache.dtype, tokens, width)
    for s, keys in enumerate(plan):
        rng = np.random.default_rng([seed, s])
        rows = np.empty((len(keys), codec.row_bytes), np.uint8)
        for a in range(0, len(keys), 64):
            x = rng.standard_normal((len(rows[a:a + 64]), tokens, width), dtype=np.float32)  # (n, T, D)
            rows[a:a + 64] = codec.encode(torch.from_numpy(x)).numpy()
        shard.write_shard(cache.shard_path(cache_dir, s), rows, codec, keys, fingerprint=fp_json, fingerprint_id=fid,
                          shard_index=s, plan=cache.plan_hash(keys), failures=[])
    info = {"encoder": {"name_or_path": cfg.encoder.name_or_path, "select_layer": cfg.encoder.select_layer,
                        "keep_cls": cfg.encoder.keep_cls, "pool": cfg.encoder.pool, "compute_dtype": "synthetic",
                        "fingerprint": fields},
            "fingerprint_id": fid, "records": [cfg.data.records], "records_hash": params["records_hash"],
            "shard_size": cfg.cache.shard_size, "tool_version": __version__}
    cache.finalize(cache_dir, [len(keys) for keys in plan], info)
    atomic_write_json(cache_dir / "bench_marker.json", params)


B16_SHAPE = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "layers": 12, "heads": 12}  # openai/clip-vit-base-patch16
B16_SMOKE_SHAPE = {"image_size": 224, "patch_size": 16, "hidden_size": 32, "layers": 2, "heads": 2}
SMOKE_MODEL = ["model.dim=64", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16"]


def build_b16(work: Path, sizes: Sizes, device: str, smoke: bool) -> Workload:
    root = work / ("b16-smoke" if smoke else "b16")
    shape = B16_SMOKE_SHAPE if smoke else B16_SHAPE
    _b16_encoder(root / "encoder", shape)
    n_images = 4 * sizes.n
    _b16_images(root / "images", max(n_images, sizes.embed_images))
    all_records = _b16_records(max(n_images, sizes.embed_images))
    recs = {}
    for k in (sizes.n, n_images, sizes.embed_images, tiles_images(sizes)):
        p = root / f"records-{k}.json"
        if not p.is_file():
            _write_records(p, all_records[:k])
        recs[k] = p
    tok_path, tok_name = (V3_TOKENIZER, "MiniMind v3 (6400)") if V3_TOKENIZER.is_dir() else (None, "demo BPE")
    if tok_path is None:  # ../shared/ref absent: a BPE trained on the captions, as the demo does
        from minivlm.demo.folder import build_tokenizer, record_texts
        tok_path = root / "tokenizer"
        if not (tok_path / "tokenizer.json").is_file():
            build_tokenizer(tok_path, record_texts(all_records), vocab_size=6400)
    cuda = device.startswith("cuda")
    base = [f"data.image_root={root}/images", f"encoder.name_or_path={root}/encoder", "encoder.local_files_only=true",
            f"tokenizer.name_or_path={tok_path}", "data.val_records=", "cache.shard_size=1024",
            f"train.batch_size={sizes.batch}", f"train.num_workers={sizes.readers}", "train.eval_batches=1",
            f"encoder.batch_size={sizes.enc_batch}", f"encoder.num_workers={sizes.workers}",
            f"train.out_dir={work}/runs"] + (["encoder.dtype=bfloat16"] if cuda else []) + (SMOKE_MODEL if smoke else [])

    def cfg_for(k: int, dtype: str = "float16") -> RunConfig:
        return load_config(REPO / "configs" / "llava_pretrain.toml", base + [
            f"data.records={recs[k]}", f"cache.dir={root}/cache-{k}" + ("" if dtype == "float16" else f"-{dtype}"),
            f"cache.dtype={dtype}"])

    tokens = (shape["image_size"] // shape["patch_size"]) ** 2
    cfg, small, codec = cfg_for(n_images), cfg_for(sizes.n), cfg_for(n_images, CODEC8)
    for c in (cfg, small, codec):
        synthetic_cache(c, tokens, shape["hidden_size"])
    embed = cfg_for(sizes.embed_images)
    parquet = parquet_of(recs[sizes.embed_images], root / "images", root / f"records-{sizes.embed_images}.parquet")
    _b16_encoder(root / "encoder-tiny", B16_SMOKE_SHAPE)
    rss = {label: with_records(small, parquet_of(recs[k], root / "images", root / f"records-{k}.parquet"),
                               name_or_path=str(root / "encoder-tiny"), num_workers=0)
           for label, k in (("n", sizes.n), ("4n", n_images))}
    tar_set = tars_of(recs[sizes.embed_images], root / "images", root / f"tars-{sizes.embed_images}")
    return Workload("b16", cfg, small, codec, embed, with_records(embed, parquet), with_records(embed, tar_set),
                    with_tiles(cfg_for(tiles_images(sizes))), rss, None, None, sizes,
                    {"images": f"{max(n_images, sizes.embed_images)} synthetic 500x375 JPEG (~35 KB)",
                     "encoder": "CLIPVisionModel " + ", ".join(f"{k}={v}" for k, v in shape.items())
                                + ", random weights, select_layer -2",
                     "T": tokens, "D": shape["hidden_size"],
                     "model": "configs/llava_pretrain.toml (MiniMind 512x8, mlp projector, freeze_llm=2)"
                              + (" shrunk for --smoke" if smoke else ""),
                     "cache": "synthetic N(0, 1) rows via shard.write_shard", "tokenizer": tok_name})


BUILDERS = {"demo": build_demo, "b16": build_b16}


def with_cache_dir(cfg: RunConfig, cache_dir: Path) -> RunConfig:
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, dir=str(cache_dir)))
