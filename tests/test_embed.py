"""Stage 1: the cache equals the encoder, survives kills, splits across ranks, and reports bad input."""
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, demo_config, demo_overrides, run_stage
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.embed import run_embed
from minivlm.embedding.encoder import load_encoder, load_image, preprocess
from minivlm.fileio import WriterLock, atomic_write_text


def cache_rows(cache_dir) -> dict[str, np.ndarray]:
    """key -> the image's rows: (T, D) for an untiled image, (tiles, T, D) for a tiled one."""
    rows = {}
    for p in sorted(cache.shard_dir(cache_dir).glob("shard-*.h5")):
        with h5py.File(p, "r") as f:  # plain h5py: the float16 layout, each image's tiles consecutive
            emb = f["embeddings"][...]
            if "tiles" not in f:
                rows.update((key.decode(), row) for key, row in zip(f["keys"][...], emb))
                continue
            ends = np.cumsum(f["tiles"][:, 0])
            rows.update((key.decode(), emb[end - n:end]) for key, n, end in zip(f["keys"][...], f["tiles"][:, 0], ends))
    return rows


def direct_features(model_dir, image_path, select_layer, keep_cls, pool):
    """The Hugging Face model called directly on the same preprocessed pixels (no minivlm code path)."""
    from transformers import AutoImageProcessor
    pixels = preprocess(AutoImageProcessor.from_pretrained(model_dir), load_image(image_path, 10 ** 9))[None]
    return tower_by_hand(model_dir, pixels, select_layer, keep_cls, pool)[0]


def tower_by_hand(model_dir, pixels, select_layer, keep_cls, pool):
    """(n, 3, H, W) pixels -> (n, T, D): CLIPVisionModel's hidden state, CLS and pooling done here."""
    from transformers import CLIPVisionModel
    model = CLIPVisionModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        h = model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    patches = h[:, 1:]
    if pool > 1:
        B, N, D = patches.shape
        g = int(N ** 0.5)
        patches = torch.nn.functional.avg_pool2d(patches.transpose(1, 2).reshape(B, D, g, g), pool)
        patches = patches.flatten(2).transpose(1, 2)
    return torch.cat([h[:, :1], patches], 1) if keep_cls else patches


@pytest.mark.parametrize("select_layer", [-1, -2])
@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("pool", [1, 2])
def test_cached_rows_equal_the_hf_model_on_the_same_pixels(demo, tmp_path, select_layer, keep_cls, pool):
    cfg = demo_config(demo, tmp_path, f"encoder.select_layer={select_layer}", f"encoder.keep_cls={keep_cls}",
                      f"encoder.pool={pool}", "cache.shard_size=64")
    manifest = run_embed(cfg, Dist())
    rows = cache_rows(cfg.cache.dir)
    keys = sorted(rows)[::37][:4]
    for key in keys:
        ref = direct_features(f"{demo}/encoder", demo / "images" / key, select_layer, keep_cls, pool)
        assert rows[key].shape == tuple(ref.shape) == (manifest["tokens"], manifest["width"])
        torch.testing.assert_close(torch.from_numpy(rows[key]).float(), ref.half().float(), atol=2e-3, rtol=2e-3)
    assert manifest["counts"]["embedded"] == len(rows) == manifest["counts"]["images"] - manifest["counts"]["failed"]


def shaped_images(root) -> list[str]:
    """PNG images of several sizes and aspect ratios (wide, tall, tiny, square, larger than any grid) in root,
    with records for them and for a missing image in root/../r.json; returns the names of the images."""
    root.mkdir()
    names = []
    for h, w in ((90, 300), (300, 90), (10, 14), (100, 100), (450, 600)):
        names.append(f"{h}x{w}.png")
        Image.fromarray(np.random.default_rng([h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / names[-1])
    recs = [{"id": n, "image": n, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
            for n in names + ["missing.png"]]
    (root.parent / "r.json").write_text(json.dumps(recs))
    return names


def reference_tiles(policy: str, processor, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tiles (n, 3, S, S) and grid from transformers' own processor of that convention, set to the tower's side
    (64), filter and normalisation: LLaVA-NeXT's for anyres (its 336-px pinpoints scaled), Idefics3's for split
    at 2 tiles a side."""
    import transformers
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    like = dict(resample=processor.resample, image_mean=processor.image_mean, image_std=processor.image_std)
    if policy == "anyres":
        cls = getattr(transformers, "LlavaNextImageProcessorPil", transformers.LlavaNextImageProcessor)
        pins = [[h * 64 // 336, w * 64 // 336] for h, w in cls.image_grid_pinpoints]
        out = cls(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_grid_pinpoints=pins, **like)
        return out(images=image, return_tensors="pt")["pixel_values"][0], \
            tuple(get_anyres_image_grid_shape(image.size[::-1], pins, 64))
    cls = getattr(transformers, "Idefics3ImageProcessorPil", transformers.Idefics3ImageProcessor)
    out = cls(size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, return_row_col_info=True,
              **like)(images=image, return_tensors="pt")
    return out["pixel_values"][0], (out["rows"][0][0] or 1, out["cols"][0][0] or 1)


@pytest.mark.parametrize("policy", ["split", "anyres"])
def test_each_tiles_row_is_the_tower_on_that_tile_by_hand_and_captioning_computes_the_same(demo, tmp_path, policy):
    from transformers import AutoImageProcessor

    from minivlm.use.captioner import Captioner, live_features
    names = shaped_images(tmp_path / "imgs")
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/r.json", "data.val_records=",
                      f"data.image_root={tmp_path}/imgs", f"encoder.tiles={policy}", "encoder.max_tiles=2",
                      "cache.shard_size=2", "encoder.batch_size=3", "cache.max_failure_frac=0.5")
    manifest = run_embed(cfg, Dist())
    rows, processor = cache_rows(cfg.cache.dir), AutoImageProcessor.from_pretrained(f"{demo}/encoder")
    index = cache.build_index(cfg.cache.dir, manifest)
    for name in names:
        decoded = load_image(tmp_path / "imgs" / name, 10 ** 9)
        pixels, grid = reference_tiles(policy, processor, decoded)
        by_hand = tower_by_hand(f"{demo}/encoder", pixels, cfg.encoder.select_layer, False, cfg.encoder.pool)
        assert torch.equal(torch.from_numpy(rows[name]), by_hand.half()), name  # every tile, in order
        assert index.image_tiles(*np.array([index.locations[name]]).T).tolist() == \
            [[len(pixels), *grid, decoded.height, decoded.width]]
    assert manifest["counts"]["tiles"] == sum(len(r) for r in rows.values()) > manifest["counts"]["embedded"] == 5
    assert manifest["counts"]["failed"] == 1
    enc = load_encoder(cfg.encoder)
    live, _, errors = live_features(Captioner(None, None, "cpu", enc), [tmp_path / "imgs" / n for n in names])
    assert errors == [None] * 5 and torch.equal(live, torch.from_numpy(np.concatenate([rows[n] for n in names])))
    from minivlm.training.data import Samples, load_splits, open_cache  # stage 2 reads an image as its tiles
    from minivlm.training.text import load_tokenizer, text_format
    roomy = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, max_len=400))
    _, index = open_cache(roomy)
    fmt = text_format(load_tokenizer(roomy.tokenizer), roomy.tokenizer, index.tokens, policy)
    ds = Samples(load_splits(roomy, index)[0], index.reader(), fmt)
    assert len(ds) == 5 and ds.image_rows(np.arange(5)) == manifest["counts"]["tiles"]
    for i, rec in enumerate(ds.split.records):
        assert np.array_equal(ds.reader.codec.decode(ds.rows([i])).numpy(), rows[rec.images[0]])


def test_identical_keys_are_embedded_once_and_rerun_skips_published_shards(demo, tmp_path):
    recs = json.loads((demo / "train.json").read_text())[:20]
    dup = dict(recs[0], id="dup", image="./" + recs[0]["image"])
    (tmp_path / "r.json").write_text(json.dumps(recs + [dup]))
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/r.json", "data.val_records=", "cache.shard_size=8")
    m = run_embed(cfg, Dist())
    n_images = len({r["image"] for r in recs if "image" in r})
    assert m["counts"]["images"] == n_images and len(m["shards"]) == -(-n_images // 8)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.shard_dir(cfg.cache.dir).iterdir()}
    run_embed(cfg, Dist())
    assert mtimes == {p: p.stat().st_mtime_ns for p in cache.shard_dir(cfg.cache.dir).iterdir()}


@pytest.mark.slow
def test_sigkill_of_a_tiled_embed_after_first_shard_then_rerun_is_bitwise_equal(demo, tmp_path):
    args = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path / "a"),
            "cache.shard_size=2", "encoder.batch_size=1", "encoder.tiles=anyres"]
    first = cache.shard_path(tmp_path / "a" / "cache", 0)
    proc = subprocess.Popen([sys.executable, str(REPO / "stages/embed.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first shard was never published"
    assert not (tmp_path / "a" / "cache" / cache.MANIFEST).exists(), "the run finished before it was killed"
    published = len(list(cache.shard_dir(tmp_path / "a" / "cache").glob("*.h5")))
    r = run_stage("embed.py", *args)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "a" / "cache").rglob("*.tmp"))
    straight = demo_config(demo, tmp_path / "b", "cache.shard_size=2", "encoder.tiles=anyres")
    run_embed(straight, Dist())
    a, b = cache_rows(tmp_path / "a" / "cache"), cache_rows(tmp_path / "b" / "cache")
    assert a.keys() == b.keys() and published < len(cache.plan_shards(list(a), 2))
    assert all(np.array_equal(a[k], b[k]) for k in a) and a[next(iter(a))].shape[0] == 5  # 2 x 2 tiles + base
    assert cache.load_manifest(tmp_path / "a" / "cache")["shards"] == cache.load_manifest(straight.cache.dir)["shards"]


def test_stale_temp_file_is_deleted_by_the_next_run(demo, tmp_path):
    cfg = demo_config(demo, tmp_path, "cache.shard_size=64")
    tmp = cache.shard_path(cfg.cache.dir, 1).with_name("shard-00001.h5.tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half a shard")
    run_embed(cfg, Dist())
    assert not tmp.exists() and cache.shard_path(cfg.cache.dir, 1).exists()


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process_tiles_and_all(demo, tmp_path):
    tiles = ["encoder.tiles=split", "encoder.max_tiles=2"]
    args = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path / "two"), "cache.shard_size=16",
            *tiles]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "stages/embed.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_embed(demo_config(demo, tmp_path / "one", "cache.shard_size=16", *tiles), Dist())
    two, one = cache_rows(tmp_path / "two" / "cache"), cache_rows(tmp_path / "one" / "cache")
    assert two.keys() == one.keys() and all(np.array_equal(two[k], one[k]) for k in one)
    assert all(len(rows) == 5 for rows in one.values())  # 2 x 2 tiles + the global image
    assert json.loads((tmp_path / "two/cache/manifest.json").read_text())["counts"] == \
        json.loads((tmp_path / "one/cache/manifest.json").read_text())["counts"]


def _bad_image_set(demo, root):
    """A folder with one image of each bad kind and odd-but-valid ones, plus records for them."""
    root.mkdir()
    good = sorted((demo / "images").rglob("*.jpg"))[:6]
    names = []
    for i, p in enumerate(good):
        (root / f"good{i}.jpg").write_bytes(p.read_bytes())
        names.append(f"good{i}.jpg")
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(root / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (40, 30), (0, 0, 255)).save(root / "rotated.jpg", exif=exif)
    names += ["rgba.png", "cmyk.jpg", "grey16.png", "rotated.jpg"]
    (root / "empty.jpg").write_bytes(b"")
    (root / "notimage.jpg").write_text("hello, I am text")
    (root / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    Image.new("RGB", (300, 300), (0, 0, 0)).save(root / "bomb.png")
    bad = {"missing.jpg": "missing", "empty.jpg": "empty", "notimage.jpg": "not an image",
           "truncated.jpg": "unreadable", "bomb.png": "too large", "../outside.jpg": "outside"}
    (root.parent / "outside.jpg").write_bytes(good[0].read_bytes())
    recs = [{"id": n, "image": n, "conversations": [{"from": "human", "value": "<image>"},
                                                      {"from": "gpt", "value": "x"}]} for n in names + list(bad)]
    (root.parent / "r.json").write_text(json.dumps(recs))
    return names, bad


def test_ranks_publishing_the_same_file_together_both_succeed(tmp_path):
    """The last two ranks to finish can both see every shard and both write the manifest."""
    target, go, errors = tmp_path / "manifest.json", threading.Barrier(2), []

    def rank(r):
        for i in range(100):
            go.wait()
            try:
                atomic_write_text(target, f"rank {r} round {i}")
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and target.read_text() in ("rank 0 round 99", "rank 1 round 99")
    assert not list(tmp_path.glob("*.tmp"))


def test_each_bad_image_kind_is_a_failure_with_its_reason(demo, tmp_path):
    names, bad = _bad_image_set(demo, tmp_path / "imgs")
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/r.json", "data.val_records=", f"data.image_root={tmp_path}/imgs",
                      "encoder.max_image_pixels=50000", "cache.max_failure_frac=0.9")
    m = run_embed(cfg, Dist())
    failures = {f["key"]: f["reason"] for f in map(json.loads, (tmp_path / "cache/failures.jsonl").read_text().splitlines())}
    assert set(failures) == set(bad)
    for key, word in bad.items():
        assert word in failures[key], (key, failures[key])
    assert set(cache_rows(cfg.cache.dir)) == set(names) and m["counts"]["failed"] == len(bad)


@pytest.mark.slow
def test_too_many_failures_end_the_run_nonzero_with_a_clear_message(demo, tmp_path):
    _bad_image_set(demo, tmp_path / "imgs")
    r = run_stage("embed.py", "--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path),
                  f"data.records={tmp_path}/r.json", "data.val_records=", f"data.image_root={tmp_path}/imgs", "cache.max_failure_frac=0.1")
    assert r.returncode == 1
    assert "max_failure_frac" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_malformed_records_and_outside_paths_give_one_line_naming_the_record(demo, tmp_path):
    recs = json.loads((demo / "train.json").read_text())[:5]
    del recs[3]["conversations"]
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    r = run_stage("embed.py", *demo_overrides(demo, tmp_path), f"data.records={tmp_path}/bad.json")
    assert r.returncode == 2 and not (tmp_path / "cache").exists()
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1 and "record 3" in r.stderr

    recs = json.loads((demo / "train.json").read_text())[:5]
    recs[2]["image"] = "../../etc/passwd"
    (tmp_path / "out.json").write_text(json.dumps(recs))
    r = run_stage("embed.py", *demo_overrides(demo, tmp_path), f"data.records={tmp_path}/out.json",
                  "cache.max_failure_frac=0.5")
    lines = [ln for ln in r.stdout.splitlines() if "outside" in ln]
    assert r.returncode == 0 and len(lines) == 1 and "record 2" in lines[0]


@pytest.mark.slow
def test_verify_passes_then_names_the_shard_with_a_flipped_byte(demo, tmp_path):
    cfg = demo_config(demo, tmp_path, "cache.shard_size=32")
    run_embed(cfg, Dist())
    assert cache.verify(cfg.cache.dir) == []
    target = cache.shard_path(cfg.cache.dir, 1)
    with h5py.File(target, "r") as f:  # row 3 by the public contract: contiguous rows from get_offset()
        emb, key = f["embeddings"], f["keys"][3].decode()
        offset = emb.id.get_offset() + 3 * emb[0].nbytes + 10
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    problems = cache.verify(cfg.cache.dir)
    assert problems and all("shard-00001.h5" in p for p in problems)
    r = run_stage("embed.py", *demo_overrides(demo, tmp_path), "cache.shard_size=32", "--verify")
    assert r.returncode == 1 and f"shard-00001.h5: row 3 (image {key}) fails its xxh3_64 checksum" in r.stdout


def test_changed_select_layer_refuses_and_names_it(demo, tmp_path):
    run_embed(demo_config(demo, tmp_path), Dist())
    with pytest.raises(ValueError, match="select_layer.*--overwrite"):
        run_embed(demo_config(demo, tmp_path, "encoder.select_layer=-1"), Dist())
    m = run_embed(demo_config(demo, tmp_path, "encoder.select_layer=-1"), Dist(), overwrite=True)
    assert m["encoder"]["fingerprint"]["select_layer"] == -1


def test_a_second_writer_is_locked_out(demo, tmp_path):
    cfg = demo_config(demo, tmp_path)
    lock = WriterLock(tmp_path / "cache", shared=False)
    try:
        with pytest.raises(RuntimeError, match=f"{tmp_path / 'cache'} is being written by another process .*cache.dir"):
            run_embed(cfg, Dist())
    finally:
        lock.release()


def test_other_compute_dtype_or_processor_class_refuses_and_names_it(demo, tmp_path, monkeypatch):
    import transformers
    run_embed(demo_config(demo, tmp_path), Dist())  # CPU: float32
    with pytest.raises(ValueError, match="encoder.compute_dtype='bfloat16' where cache .* has "
                                         "encoder.compute_dtype='float32'.*--overwrite"):
        run_embed(demo_config(demo, tmp_path, "encoder.dtype=bfloat16"), Dist())
    real = transformers.AutoImageProcessor.from_pretrained

    def other_processor(*a, **kw):  # as transformers' choice differs with torchvision installed or not
        p = real(*a, **kw)
        p.__class__ = type("OtherImageProcessor", (type(p),), {})
        return p

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", other_processor)
    with pytest.raises(ValueError, match="encoder.processor_class='OtherImageProcessor' where cache .* has "
                                         "encoder.processor_class='\\w+'.*--overwrite"):
        run_embed(demo_config(demo, tmp_path), Dist())
