"""Captioning and evaluation: the live path equals the cache, generation is consistent, runs are checked."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import demo_config, run_stage, train_config
from minivlm.demo.pairs import PROMPT as PAIR_PROMPT
from minivlm.demo.pairs import write_pairs
from minivlm.dist import Dist
from minivlm.embedding.embed import run_embed
from minivlm.training.data import Samples, load_data, load_splits, open_cache, to_device
from minivlm.training.text import IGNORE, prompt_ids
from minivlm.training.trainer import fit
from minivlm.use.captioner import caption_features, caption_files, live_features, load_run
from minivlm.use.evaluation import evaluate_run
from minivlm.use.generate import generate


@pytest.fixture(scope="module")
def tiny_run(demo, demo_cache, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_run")
    cfg = train_config(demo, demo_cache, work, "train.max_steps=2", "train.run_name=tiny")
    fit(cfg, Dist())
    return cfg


def test_live_features_are_bitwise_the_cached_rows(demo, tiny_run):
    cap = load_run(tiny_run.train.run_dir)
    _, index = open_cache(tiny_run)
    train, _ = load_splits(tiny_run, index)
    picked = np.flatnonzero(np.diff(train.first) > 0)[:5].tolist()
    ds = Samples(train, index.reader(), cap.fmt)
    cached = index.codec.decode(ds.rows(picked))
    for batch in ([picked[0]], picked):  # alone and batched
        live, _, errors = live_features(cap, [demo / "images" / train.records[i].images[0] for i in batch])
        assert errors == [None] * len(batch)
        assert torch.equal(live.cpu(), cached[:len(batch)])


def test_unreadable_images_get_their_own_error_and_the_rest_are_captioned(demo, tiny_run, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    good = sorted((demo / "images").rglob("*.jpg"))[:2]
    results = caption_files(load_run(tiny_run.train.run_dir), [good[0], tmp_path / "bad.jpg", good[1]])
    assert [err is None for _, _, err in results] == [True, False, True]
    assert "bad.jpg" in results[1][2] and "not an image" in results[1][2]
    assert results[0][1] is not None and results[2][1] is not None


@pytest.mark.slow
def test_changed_encoder_files_refuse_to_caption_naming_the_fingerprint(demo, tmp_path):
    shutil.copytree(demo / "encoder", tmp_path / "encoder")
    cfg = demo_config(demo, tmp_path, f"encoder.name_or_path={tmp_path}/encoder", "model.dim=32",
                      "model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "train.max_steps=1",
                      "train.eval_batches=1")
    run_embed(cfg, Dist())
    fit(cfg, Dist())
    load_run(cfg.train.run_dir)  # fine as trained
    weights = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(tmp_path / "encoder" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has encoder.weights=.* where the fingerprint run .* was trained with"):
        load_run(cfg.train.run_dir)
    r = run_stage("caption.py", "--run", str(cfg.train.run_dir), "--image", str(sorted((demo / "images").rglob("*.jpg"))[0]))
    assert r.returncode == 2 and "fingerprint" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_greedy_with_kv_cache_equals_full_recompute_on_a_trained_run(trained_demo):
    cfg, _ = trained_demo
    cap = load_run(cfg.train.run_dir)
    imgs = sorted(Path(cfg.data.image_root).rglob("*.jpg"))[:4]
    feats, _, _ = live_features(cap, imgs)
    ids = torch.tensor([prompt_ids(cap.fmt)] * len(imgs))
    fast = generate(cap.model, ids, feats, 30, cap.fmt.eos_id, use_cache=True)
    slow = generate(cap.model, ids, feats, 30, cap.fmt.eos_id, use_cache=False)
    assert fast == slow


@pytest.mark.slow
def test_demo_run_learns_from_the_image(trained_demo):
    """Rows stay aligned with their records end to end: true images beat shuffled ones by >= 0.3 nats."""
    _, final = trained_demo
    assert final["image_gap"] >= 0.3, final


@pytest.mark.slow
def test_demo_captions_differ_and_name_the_main_colour(trained_demo):
    cfg, _ = trained_demo
    cap = load_run(cfg.train.run_dir)
    val = json.loads(open(cfg.data.val_records).read())[:64]
    results = caption_files(cap, [f"{cfg.data.image_root}/{r['image']}" for r in val])
    captions = [c for _, c, _ in results]
    hits = [r["meta"]["color"] in c.split()[:6] for r, c in zip(val, captions)]
    print(f"main colour named in {np.mean(hits):.0%} of {len(val)} held-out captions")
    assert len(set(captions)) > len(captions) // 4
    assert np.mean(hits) >= 0.6


def colour_order(caption: str, first: str, second: str) -> bool:
    """Whether the caption names colour `first` before it names colour `second` (and names both)."""
    words = caption.lower().replace(".", " ").replace(",", " ").split()
    return first in words and second in words and words.index(first) < words.index(second)


@pytest.mark.slow
def test_two_image_records_embed_each_image_once_train_and_caption_in_the_images_order(trained_demo, tmp_path):
    """The demo's images paired into two-image records (the answer describes the first, then the second): each image
    embedded once, no record skipped, an image gap; a held-out pair captioned in one prompt names the first image's
    colour first, and swapping the images swaps them. Chained from the single-image demo run (train.init_from)."""
    cfg, _ = trained_demo
    demo_dir = Path(cfg.data.image_root).parent
    pairs = write_pairs(demo_dir, tmp_path / "pairs")
    pcfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, records=str(pairs["train"]), val_records=str(pairs["val"])),
        cache=dataclasses.replace(cfg.cache, dir=str(tmp_path / "cache")),
        train=dataclasses.replace(cfg.train, run_name="pairs", init_from=str(cfg.train.run_dir), max_steps=300,
                                  warmup_steps=0, lr=1e-3, min_lr=1e-4, eval_interval=0, save_interval=0))
    manifest = run_embed(pcfg, Dist())
    n_images = len(list((demo_dir / "images").rglob("*.*")))
    assert manifest["counts"] == {"images": n_images, "embedded": n_images, "failed": 0}
    assert manifest["skipped_rows"] == {}
    data = load_data(pcfg, Dist())
    n_pairs = len(json.loads(pairs["train"].read_text()))
    assert (len(data.train), data.dropped, data.too_long.count) == (n_pairs, 0, 0)
    final = fit(pcfg, Dist())
    assert final["image_gap"] >= 0.3, final

    cap = load_run(pcfg.train.run_dir)
    val = {r["image"]: r["meta"] for r in json.loads(Path(cfg.data.val_records).read_text())}
    held = [r["image"] for r in json.loads(pairs["val"].read_text())][:40]
    held = [(a, b) for a, b in held if val[a]["color"] != val[b]["color"]]
    right = []
    for a, b in held:
        for x, y in ((a, b), (b, a)):
            (_, caption, err), = caption_files(cap, [demo_dir / "images" / x, demo_dir / "images" / y], PAIR_PROMPT)
            right.append(err is None and colour_order(caption, val[x]["color"], val[y]["color"]))
    print(f"pairs: {final}; colour order right in {np.mean(right):.0%} of {len(right)} held-out captions")
    assert np.mean(right) >= 0.6


@pytest.mark.slow
def test_evaluate_writes_three_files_whose_numbers_match_a_recomputation(trained_demo):
    cfg, _ = trained_demo
    run_dir = cfg.train.run_dir
    result = evaluate_run(run_dir, n=8)
    out = run_dir / "eval"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["eval_loss"] == pytest.approx(result["eval_loss"]) and len(saved["captions"]) == 8
    assert "| generated |" in (out / "captions.md").read_text()
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300

    # recompute: per-token cross-entropy over every held-out sample, true and rolled images
    cap = load_run(run_dir, with_encoder=False)
    _, index = open_cache(cfg)
    _, val = load_splits(cfg, index)
    ds = Samples(val, index.reader(), cap.fmt)
    sums, count = [0.0, 0.0], 0
    with torch.no_grad():
        bs = cfg.train.batch_size  # the same batches evaluate uses; every val row has an image
        for start in range(0, len(ds), bs):
            b = to_device(ds[list(range(start, min(start + bs, len(ds))))], "cpu", index.codec)
            for k, images in enumerate((b["images"], b["images"].roll(1, dims=0))):
                logits = cap.model(b["input_ids"], images).logits
                sums[k] += torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                    reduction="sum").item()
            count += int((b["labels"][:, 1:] != IGNORE).sum())
    assert saved["eval_loss"] == pytest.approx(sums[0] / count, rel=1e-4)
    assert saved["eval_loss_shuffled"] == pytest.approx(sums[1] / count, rel=1e-4)
    assert saved["n_eval_samples"] == len(val.records)
    first, record = saved["captions"][0], val.records[0]
    ask = next(t for r, t in record.turns if r == "user")  # each sample is asked its own question, images at its tags
    assert first["prompt"] == ask.replace("<image>", "").strip() and first["reference"] == record.turns[-1][1]
    assert first["generated"] == caption_features(cap, index.codec.decode(ds.rows([0])), prompt=ask)[0]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v3"])
def test_train_and_caption_with_the_real_minimind_tokenizers(demo, demo_cache, tmp_path, version):
    from conftest import tokenizer_dir
    path = tokenizer_dir(version)
    cfg = train_config(demo, demo_cache, tmp_path, f"tokenizer.name_or_path={path}", "train.max_steps=2",
                       "train.eval_batches=1", "model.max_seq_len=160", "tokenizer.max_len=96")
    final = fit(cfg, Dist())
    assert final["eval_loss"] > 0 and final["loss"] > 0
    cap = load_run(cfg.train.run_dir)
    assert cap.fmt.vocab_size == (6401 if version == "v1" else 6400)  # v1 gets <|image_pad|> added
    assert cap.fmt.image_token_id == (6400 if version == "v1" else 12)
    results = caption_files(cap, sorted((demo / "images").rglob("*.jpg"))[:2], max_new_tokens=8)
    assert all(err is None and isinstance(c, str) for _, c, err in results)


def test_evaluate_computes_in_the_dtype_the_run_trained_in(tiny_run, tmp_path, monkeypatch):
    import dataclasses

    import minivlm.use.evaluation as evaluation
    from minivlm.config import load_config, to_toml, to_tree
    run_dir = tmp_path / "bf16"
    shutil.copytree(tiny_run.train.run_dir, run_dir)
    cfg = load_config(run_dir / "config.toml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="bfloat16"))
    (run_dir / "config.toml").write_text(to_toml(to_tree(cfg)))
    seen, real = [], evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda model, batches, codec, dtype, device: seen.append(dtype) or
                        real(model, batches, codec, dtype, device))
    evaluation.evaluate_run(run_dir, n=1)
    assert seen == [torch.bfloat16]
