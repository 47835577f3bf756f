"""A real SFT mix as it stands (LLaVA-OneVision / NeXT-Interleave shaped): records that cannot become samples
are skipped and counted with one warning line per reason, every sample that can train does, data.strict stops at
the first, the wrong cache is refused before any step, and evaluation asks each sample its own question."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import demo_config, demo_overrides, run_stage
from minivlm.demo.pairs import pair_records
from minivlm.dist import Dist
from minivlm.training.trainer import fit

TAG = "<image>"
ROOM = ["tokenizer.max_len=256", "model.max_seq_len=256"]  # three images (48 rows) and two turns fit
TINY = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16",
        "train.batch_size=8", "train.eval_batches=1", "train.max_steps=3", "train.log_interval=1",
        "train.eval_interval=0", "train.save_interval=0", "data.val_records=", "data.val_frac=0.1"]


def onevision_mix(demo: Path, path: Path) -> list[dict]:
    """Several hundred records the way OneVision SFT JSON mixes them: single images as strings, pairs, triples
    with the third image in the second turn, text-only records (with and without `"image": []`), 5 video
    records (3 with their <image> tag, 2 without), 2 mismatches (one `"image": []` with a tag), a missing image
    and an absolute path inside the image root; shuffled."""
    recs = json.loads((demo / "train.json").read_text())
    single, text = [r for r in recs if "image" in r], [r for r in recs if "image" not in r]
    pairs = pair_records(single)[:100]
    triples = [{"id": f"tri-{i}", "image": [a["image"], b["image"], c["image"]], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat are these two?"},
        {"from": "gpt", "value": f"{a['conversations'][-1]['value']} {b['conversations'][-1]['value']}"},
        {"from": "human", "value": f"And this one: {TAG} what is it?"},
        {"from": "gpt", "value": c["conversations"][-1]["value"]}]}
        for i, (a, b, c) in enumerate(zip(single[:40], single[40:80], single[80:120]))]
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    video = [{"id": f"vid-{i}", "video": f"clips/{i}.mp4", "conversations": turns(
        f"{TAG}\nWhat happens in the video?" if i < 3 else "What happens in the video?", "A shape moves.")}
        for i in range(5)]
    broken = [{"id": "mis-0", "image": [single[0]["image"], single[1]["image"]], "conversations": turns(
                  f"{TAG}\nCompare.", "Two shapes.")},
              {"id": "mis-empty", "image": [], "conversations": turns(f"{TAG}\nDescribe.", "Nothing.")},
              {"id": "missing", "image": "nowhere/gone.jpg", "conversations": turns(f"{TAG}\nDescribe.", "Gone.")}]
    extra = [{"id": "abs", "image": str((demo / "images" / single[2]["image"]).resolve()),
              "conversations": turns("Describe.", single[2]["conversations"][-1]["value"])}] + \
            [{"id": f"empty-{i}", "image": [], "conversations": turns("Say hello.", "Hello.")} for i in range(3)]
    mix = single + pairs + triples + text + video + broken + extra
    mix = [mix[i] for i in np.random.default_rng(1).permutation(len(mix))]
    path.write_text(json.dumps(mix))
    return mix


def images_of(r: dict) -> list[str]:
    image = r.get("image", [])
    return [image] if isinstance(image, str) else image


def tags_of(r: dict) -> int:
    return sum(t["value"].count(TAG) for t in r["conversations"])


def trainable(r: dict, root: Path) -> bool:
    """Derived from the record alone: no video, tags matching the images (or none), every image a file."""
    imgs = images_of(r)
    return "video" not in r and tags_of(r) in (0, len(imgs)) and all((root / i).is_file() for i in imgs)


@pytest.fixture(scope="module")
def mix(demo, tmp_path_factory):
    """The mix, embedded and trained a few steps through the stage scripts, as a user runs them."""
    work = tmp_path_factory.mktemp("mix")
    recs = onevision_mix(demo, work / "mix.json")
    records = f"data.records={work}/mix.json"
    cfg = demo_config(demo, work, records, *ROOM, *TINY)
    args = ["--config", "configs/demo.toml", *demo_overrides(demo, work), records, *ROOM, *TINY]  # the last one wins
    embed = run_stage("embed.py", *args)
    train = run_stage("train.py", *args, umask=0o022)
    return cfg, recs, args, embed, train


@pytest.mark.slow
def test_a_onevision_mix_embeds_and_trains_every_sample_that_can(demo, mix):
    cfg, recs, _, embed, train = mix
    assert embed.returncode == 0, embed.stderr[-2000:]
    assert train.returncode == 0, train.stderr[-2000:]
    root = Path(cfg.data.image_root)
    want = sum(trainable(r, root) for r in recs)
    n_train, n_val = map(int, re.search(r"train: (\d+) train / (\d+) val samples", train.stdout).groups())
    assert n_train + n_val == want and "too long" not in train.stdout.split("train:")[1].splitlines()[0]
    first = lambda pred: next(f"record {i} (id {r['id']})" for i, r in enumerate(recs) if pred(r))  # noqa: E731
    video = lambda r: "video" in r  # noqa: E731
    mismatch = lambda r: not video(r) and tags_of(r) not in (0, len(images_of(r)))  # noqa: E731
    for out in (embed.stdout, train.stdout):  # each stage reads the records and names what it leaves out
        lines = [ln for ln in out.splitlines() if ln.startswith("warning: skipped")]
        assert any(f"skipped 5 row(s) of video (video records are not supported) (first: {cfg.data.records} "
                   f"{first(video)})" in ln for ln in lines), lines
        assert any(f"skipped 2 row(s) whose <image> tags and images differ in number (first: {cfg.data.records} "
                   f"{first(mismatch)})" in ln for ln in lines), lines
    assert any(f"skipped 1 row(s) with an image that is not in cache {cfg.cache.dir}" in ln and "(id missing)" in ln
               for ln in train.stdout.splitlines())
    assert len([ln for ln in train.stdout.splitlines() if ln.startswith("warning: skipped")]) == 3  # each once
    skipped = re.search(r"val samples \(skipped: ([^)]*)\)", train.stdout).group(1)  # the start line's counts
    assert sorted(skipped.split(", ")) == ["1 image not in cache", "2 mismatch", "5 video"]
    manifest = json.loads((Path(cfg.cache.dir) / "manifest.json").read_text())
    assert manifest["skipped_rows"] == {"video": 5, "mismatch": 2} and manifest["counts"]["failed"] == 1


@pytest.mark.slow
def test_a_run_whose_stdout_is_not_a_terminal_logs_a_line_a_log_interval_and_its_files_are_0644(mix):
    cfg, *_, train = mix
    steps = [ln for ln in train.stdout.splitlines() if re.match(r"train: step \d+/3 epoch \d+ loss [\d.]+ lr ", ln)]
    assert len(steps) == 3, train.stdout[-1500:]  # train.log_interval=1, 3 steps
    files = [f for f in cfg.train.run_dir.rglob("*") if f.is_file() and f.name != ".lock"]
    assert "model.safetensors" in {f.name for f in files}
    assert {str(f): f.stat().st_mode & 0o777 for f in files} == {str(f): 0o644 for f in files}


@pytest.mark.slow
def test_strict_stops_at_the_first_record_that_cannot_become_a_sample(demo, mix):
    cfg, recs, args, _, _ = mix
    i, r = next((i, r) for i, r in enumerate(recs) if "video" in r or tags_of(r) not in (0, len(images_of(r))))
    where = f"{cfg.data.records} record {i} (id {r['id']})"
    strict = run_stage("embed.py", *args, "data.strict=true")
    if "video" in r:
        line = f"error: {where}: video records are not supported"
    else:  # the line of a stop before skips existed
        line = (f"error: {where}: {tags_of(r)} <image> tag(s) for {len(images_of(r))} image(s); each image needs one "
                f"tag where it goes (or no tags at all: the images then open the first user turn)")
    assert strict.returncode == 2 and strict.stderr.strip().splitlines()[-1].startswith(line), strict.stderr[-500:]


@pytest.mark.slow
def test_records_against_another_datasets_cache_are_refused_before_any_step(demo, mix, tmp_path):
    cfg, *_ = mix
    other = demo_config(demo, tmp_path, f"data.records={demo}/val.json", f"cache.dir={cfg.cache.dir}", *ROOM, *TINY)
    with pytest.raises(ValueError, match=rf"cache {re.escape(cfg.cache.dir)} lacks the images of 32 of the 32 records "
                                         r"with images \(100%.*another dataset.*another embed"):
        fit(other, Dist())
    assert not (other.train.run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_evaluation_asks_each_held_out_sample_its_own_first_turn(demo, mix):
    from minivlm.formats.records import user_text
    from minivlm.use.evaluation import evaluate_run
    cfg, recs, *_ = mix
    by_id = {r["id"]: r for r in recs}
    result = evaluate_run(cfg.train.run_dir, n=64)
    assert result["captions"] and any(len(s["images"]) > 1 for s in result["captions"])
    for s in result["captions"]:
        conv = by_id[s["id"]]["conversations"]
        assert s["prompt"] == user_text(conv[0]["value"]) and s["reference"] == conv[1]["value"].strip()
    from minivlm.use.captioner import caption_features, live_features, load_run
    cap = load_run(cfg.train.run_dir)  # the first row's caption is caption.py's for its own question and images
    pair = next(s for s in result["captions"] if len(s["images"]) > 1)
    feats, layouts, _ = live_features(cap, [Path(cfg.data.image_root) / k for k in pair["images"]])
    ask = by_id[pair["id"]]["conversations"][0]["value"]
    assert pair["generated"] == caption_features(cap, feats, ask, len(pair["images"]), layouts)[0]
    md = (cfg.train.run_dir / "eval" / "captions.md").read_text()
    assert all(f"| {user_text(by_id[s['id']]['conversations'][0]['value'])} |" in md for s in result["captions"])
