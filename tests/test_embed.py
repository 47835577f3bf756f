"""Stage 1: the cache equals the encoder, survives kills, splits across ranks, and reports bad input."""
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
from minivlm.embedding.encoder import load_image, preprocess
from minivlm.fileio import WriterLock, atomic_write_text


def cache_rows(cache_dir) -> dict[str, np.ndarray]:
    rows = {}
    for p in sorted(cache.shard_dir(cache_dir).glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for key, row in zip(f["keys"][...], f["embeddings"][...]):  # plain h5py: the float16 layout
                rows[key.decode()] = row
    return rows


def direct_features(model_dir, image_path, select_layer, keep_cls, pool):
    """The Hugging Face model called directly on the same preprocessed pixels (no minivlm code path)."""
    from transformers import AutoImageProcessor, CLIPVisionModel
    model = CLIPVisionModel.from_pretrained(model_dir).eval()
    pixels = preprocess(AutoImageProcessor.from_pretrained(model_dir), load_image(image_path, 10 ** 9))[None]
    with torch.no_grad():
        h = model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    patches = h[:, 1:]
    if pool > 1:
        B, N, D = patches.shape
        g = int(N ** 0.5)
        patches = torch.nn.functional.avg_pool2d(patches.transpose(1, 2).reshape(B, D, g, g), pool)
        patches = patches.flatten(2).transpose(1, 2)
    return (torch.cat([h[:, :1], patches], 1) if keep_cls else patches)[0]


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
def test_sigkill_after_first_shard_then_rerun_is_bitwise_equal(demo, tmp_path):
    args = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path / "a"),
            "cache.shard_size=2", "encoder.batch_size=1"]
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
    straight = demo_config(demo, tmp_path / "b", "cache.shard_size=2")
    run_embed(straight, Dist())
    a, b = cache_rows(tmp_path / "a" / "cache"), cache_rows(tmp_path / "b" / "cache")
    assert a.keys() == b.keys() and published < len(cache.plan_shards(list(a), 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_stale_temp_file_is_deleted_by_the_next_run(demo, tmp_path):
    cfg = demo_config(demo, tmp_path, "cache.shard_size=64")
    tmp = cache.shard_path(cfg.cache.dir, 1).with_name("shard-00001.h5.tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half a shard")
    run_embed(cfg, Dist())
    assert not tmp.exists() and cache.shard_path(cfg.cache.dir, 1).exists()


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(demo, tmp_path):
    args = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path / "two"), "cache.shard_size=16"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "stages/embed.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_embed(demo_config(demo, tmp_path / "one", "cache.shard_size=16"), Dist())
    two, one = cache_rows(tmp_path / "two" / "cache"), cache_rows(tmp_path / "one" / "cache")
    assert two.keys() == one.keys() and all(np.array_equal(two[k], one[k]) for k in one)
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
