"""Sources: Parquet with the images inside (MiniMind-V, Hugging Face, img2dataset) written with pyarrow as
their producers write them, one cache row per unique image keyed by SHA-256, the stored join, bad input."""
import hashlib
import io
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_embed import cache_rows
from test_faults import assert_same_cache

from conftest import REPO, demo_config, demo_overrides, run_stage, train_config
from faults import kill_at_random
from minivlm.config import load_config
from minivlm.demo.pairs import PARQUET_LAYOUTS as PAIR_LAYOUTS
from minivlm.demo.pairs import write_pairs
from minivlm.demo.parquet import LAYOUTS, placeholder_jpeg, write_layout
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.embed import run_embed
from minivlm.formats import parquet, sources
from minivlm.formats.records import Record, load_records
from minivlm.training.data import load_data
from minivlm.training.text import encode_sample, load_tokenizer, text_format
from minivlm.training.trainer import fit


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layouts(demo, tmp_path_factory):
    """The session demo in every layout: train in two files of several 50-row row groups, val in one."""
    out = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(demo, name, out / name, files=2, row_group_size=50) for name in LAYOUTS}


def layout_overrides(paths) -> list[str]:
    """A glob of the train files (MiniMind-V, Hugging Face), or their directory (img2dataset's train/)."""
    first = paths["train"][0]
    records = first.parent if first.parent.name == "train" else first.parent / "train-*.parquet"
    return [f"data.records={records}", f"data.val_records={paths['val'][0]}", "data.image_root="]


@pytest.fixture(scope="module")
def embedded(demo, layouts, tmp_path_factory):
    """Each layout embedded once (shards of 16, as the session's folder cache `demo_cache`)."""
    work = tmp_path_factory.mktemp("embedded")
    out = {}
    for name, paths in layouts.items():
        cfg = demo_config(demo, work / name, *layout_overrides(paths))
        out[name] = (cfg, run_embed(cfg, Dist()))
    return out


def folder_rows_by_sha(demo, demo_cache) -> dict:
    return {sha((demo / "images" / k).read_bytes()): row for k, row in cache_rows(demo_cache).items()}


# --- acceptance 1: exactly the unique images, keyed by SHA-256, bitwise the folder rows -----------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_embeds_exactly_its_unique_images_keyed_by_sha256_bitwise_the_folder_rows(
        demo, demo_cache, embedded, layout):
    cfg, manifest = embedded[layout]
    folder = folder_rows_by_sha(demo, demo_cache)
    rows = cache_rows(cfg.cache.dir)
    assert rows.keys() == folder.keys()  # every image once, however many rows hold it; no placeholder
    assert all(np.array_equal(rows[k], folder[k]) for k in rows)
    assert manifest["counts"] == {"images": len(folder), "embedded": len(folder), "failed": 0}
    assert sha(placeholder_jpeg()) not in rows


def test_minimind_rows_give_every_image_two_records_and_text_only_rows(demo, layouts, embedded):
    cfg, _ = embedded["minimind"]
    recs = sources.read_records(cfg.data.records, cfg.data, cfg.cache.dir)
    folder = load_records(demo / "train.json")
    n_images = sum(bool(r.images) for r in folder)
    assert len(recs) == sum(pq.ParquetFile(p).metadata.num_rows for p in layouts["minimind"]["train"])
    per_key = {}
    for r in recs:
        per_key.setdefault(r.images[0] if r.images else None, set()).add(r.turns[0][1])
    assert len(per_key.pop(None)) == sum(not r.images for r in folder)  # the placeholder rows: text-only
    assert len(per_key) == n_images and all(len(prompts) == 2 for prompts in per_key.values())


def test_img2dataset_failed_downloads_are_skipped_and_counted(embedded):
    _, manifest = embedded["img2dataset"]
    assert manifest["skipped_rows"] == {"no_image": 2}  # one failed download in train, one in val


def test_plan_keeps_folder_keys_sorted_and_images_inside_files_in_first_occurrence_order(demo, embedded):
    cfg, _ = embedded["minimind"]
    loaded = sources.load([cfg.data.records], cfg.data, cfg.cache.dir)
    planned = sources.plan(loaded, "")
    first = list(dict.fromkeys(k for r in loaded.records for k in r.images))
    assert planned.keys == first
    assert [w for w in planned.where] == sorted(planned.where)  # (file, row, k): one forward stretch
    folder = sources.load([str(demo / "train.json")], cfg.data, cfg.cache.dir)
    assert sources.plan(folder, demo / "images").keys == sorted({k for r in folder.records for k in r.images})


# --- two-image records (issue "Samples of any shape", acceptance 2) -------------------------------------------

@pytest.fixture(scope="module")
def pairs(demo, tmp_path_factory) -> dict:
    return write_pairs(demo, tmp_path_factory.mktemp("pairs"))


@pytest.mark.parametrize("layout", PAIR_LAYOUTS)
def test_pairs_in_minimind_and_hf_parquet_give_the_folder_rows_keyed_by_sha256_in_tag_order(
        demo, demo_cache, pairs, layout, tmp_path):
    """The demo's pairs written by pyarrow as MiniMind-V (image_bytes lists) and Hugging Face (images lists of
    structs, image parts in the turns) Parquet: each image embedded once, bitwise the folder's row, and every
    record the LLaVA JSON record's turns with its images' SHA-256 in order."""
    cfg = demo_config(demo, tmp_path, f"data.records={pairs[layout + '/train']}",
                      f"data.val_records={pairs[layout + '/val']}", "data.image_root=")
    manifest = run_embed(cfg, Dist())
    folder, rows = folder_rows_by_sha(demo, demo_cache), cache_rows(cfg.cache.dir)
    assert rows.keys() == folder.keys() and all(np.array_equal(rows[k], folder[k]) for k in rows)
    assert manifest["counts"]["images"] == len(folder) and manifest["skipped_rows"] == {}
    for split in ("train", "val"):
        want = load_records(pairs[split])
        got = sources.read_records(str(pairs[f"{layout}/{split}"]), cfg.data, cfg.cache.dir)
        assert [r.turns for r in got] == [r.turns for r in want]
        assert [r.images for r in got] == [tuple(sha((demo / "images" / k).read_bytes()) for k in r.images)
                                           for r in want]


# --- turns and captions ---------------------------------------------------------------------------------

def _image(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def test_every_turn_style_in_json_jsonl_and_parquet_gives_the_same_records(tmp_path):
    q, a = "What is it?", "A red square."
    llava = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
    openai = [{"role": "user", "content": "<image>\n" + q}, {"role": "assistant", "content": a}]
    parts = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    (tmp_path / "a.json").write_text(json.dumps([{"id": "0", "image": "x.png", "conversations": llava}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "0", "image": "x.png", "conversations": openai}) + "\n")
    img = _image()
    pq.write_table(pa.table({"conversations": [json.dumps(openai)], "image_bytes": pa.array([img], pa.binary())}),
                   tmp_path / "c.parquet")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature
    pq.write_table(pa.table({"conversations": [llava], "image": pa.array([{"bytes": img, "path": "x.png"}], image)}),
                   tmp_path / "d.parquet")
    pq.write_table(pa.table({"messages": [parts], "images": pa.array([[{"bytes": img, "path": None}]], pa.list_(image))}),
                   tmp_path / "e.parquet")
    data = load_config(None).data
    got = {f: sources.read_records(str(tmp_path / f), data, tmp_path / "cache")
           for f in ("a.json", "b.jsonl", "c.parquet", "d.parquet", "e.parquet")}
    want = [(("user", "<image>\n" + q), ("assistant", a))]
    assert {f: [r.turns for r in recs] for f, recs in got.items()} == {f: want for f in got}
    assert [got[f][0].images for f in got] == [("x.png",), ("x.png",)] + [(sha(img),)] * 3


def test_a_bare_caption_is_the_configured_prompt_and_the_caption_as_answer(demo, tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": _image(), "path": "x.png"}], "caption": ["A red square."]}),
                   tmp_path / "c.parquet")
    rec, = sources.read_records(str(tmp_path / "c.parquet"), load_config(None).data, tmp_path / "cache")
    cfg = demo_config(demo, tmp_path, "tokenizer.prompt=Caption it.").tokenizer
    fmt = text_format(load_tokenizer(cfg), cfg, 4)
    explicit = Record("1", rec.images, (("user", "<image>\nCaption it."), ("assistant", "A red square.")), "x")
    assert rec.turns == (("user", "<image>\n"), ("assistant", "A red square."))
    assert encode_sample(fmt, rec) == encode_sample(fmt, explicit)


# --- the stored join --------------------------------------------------------------------------------------

def test_the_join_is_stored_once_and_training_never_hashes_or_reads_image_bytes(demo, demo_cache, embedded,
                                                                                 tmp_path, monkeypatch):
    cfg, _ = embedded["hf"]
    store = Path(cfg.cache.dir) / sources.STORE
    assert len(list(store.glob("*.npz"))) == 3  # two train files and one val file
    src = sources.open_sources(str(sources.expand(cfg.data.records)[0]), cfg.data)[0]
    with np.load(store / f"{sources.identity(src)}.npz") as z:
        direct = pq.read_table(src.path, columns=["image"]).column("image").to_pylist()
        assert [bytes(d).hex() for d in z["sha256"]] == [sha(cell["bytes"]) for cell in direct]
        assert z["images"].tolist() == [1] * len(direct)

    def boom(*a, **kw):
        raise AssertionError("stage 2 read or hashed image bytes")

    monkeypatch.setattr(sources, "_hash_rows", boom)
    monkeypatch.setattr(parquet.ImageRows, "images", boom)
    tcfg = train_config(demo, cfg.cache.dir, tmp_path, *layout_overrides_of(cfg))
    data = load_data(tcfg, Dist())
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sources.expand(cfg.data.records))
    assert len(data.train) == n_rows and data.dropped == 0


def layout_overrides_of(cfg) -> list[str]:
    return [f"data.records={cfg.data.records}", f"data.val_records={cfg.data.val_records}", "data.image_root="]


def test_a_rewritten_file_is_hashed_again_and_a_moved_one_is_not(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _image(), "path": None}], "caption": ["x"]}), path)
    data = load_config(None).data
    calls = []
    real = sources._hash_rows
    monkeypatch.setattr(sources, "_hash_rows", lambda *a: calls.append(a) or real(*a))
    assert sources.read_records(str(path), data, tmp_path / "c")[0].images == (sha(_image()),)
    moved = tmp_path / "sub" / "b.parquet"
    moved.parent.mkdir()
    path.rename(moved)
    sources.read_records(str(moved), data, tmp_path / "c")
    assert len(calls) == 1
    other = _image((0, 0, 200))
    pq.write_table(pa.table({"image": [{"bytes": other, "path": None}], "caption": ["x"]}), moved)
    assert sources.read_records(str(moved), data, tmp_path / "c")[0].images == (sha(other),) and len(calls) == 2


def test_a_garbled_stored_join_is_hashed_again(tmp_path, capsys):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _image(), "path": None}], "caption": ["x"]}), path)
    data = load_config(None).data
    sources.read_records(str(path), data, tmp_path / "c")
    [stored] = (tmp_path / "c" / sources.STORE).glob("*.npz")
    for garbage in (b"not a zip", None):
        if garbage is None:  # a readable file of another length
            with stored.open("wb") as f:
                np.savez(f, sha256=np.zeros((2, 32), np.uint8), images=np.ones(2, np.int32))
        else:
            stored.write_bytes(garbage)
        assert sources.read_records(str(path), data, tmp_path / "c")[0].images == (sha(_image()),)
        out = capsys.readouterr().out
        assert ("unreadable" if garbage else "does not match") in out and "hashing" in out


def test_a_worker_reads_only_the_row_groups_its_rows_sit_in_and_only_the_image_column(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    imgs = [_image((i, 0, 0)) for i in range(40)]
    pq.write_table(pa.table({"conversations": ["[]"] * 40, "image_bytes": pa.array(imgs, pa.binary())}), path,
                   row_group_size=10)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        calls.append((kw["row_groups"], kw["columns"]))
        return real(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows = parquet.ImageRows(path, parquet.layout(path))
    assert [rows.images(r) for r in (21, 22, 29, 35)] == [[imgs[r]] for r in (21, 22, 29, 35)]
    assert calls == [([2], ["image_bytes"]), ([3], ["image_bytes"])]


def test_a_row_is_read_without_reading_its_whole_row_group(tmp_path, monkeypatch):
    """pyarrow's defaults (pre_buffer, unbuffered streams) read a whole column chunk for one row; a file in one
    row group (pandas' and pyarrow's default up to 1Mi rows) would then be read whole into memory."""
    path = tmp_path / "one_group.parquet"
    rng = np.random.default_rng(0)
    cells = [rng.bytes(4000) for _ in range(8000)]  # 32 MB, incompressible, one row group
    pq.write_table(pa.table({"caption": ["x"] * 8000, "jpg": pa.array(cells, pa.binary())}), path)
    read = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

        def readinto(self, b):
            n = super().readinto(b)
            read.append(n)
            return n

    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda source, **kw: real(Counting(source), **kw))
    rows = parquet.ImageRows(path, parquet.layout(path))
    assert rows.images(1) == [cells[1]] and rows.images(100) == [cells[100]]
    assert sum(read) < path.stat().st_size / 4, f"read {sum(read)} of {path.stat().st_size} bytes for two rows"


# --- several images, undecodable bytes ---------------------------------------------------------------------

def minimind_file(path, cells, tagged=True, list_type=False):
    conv = json.dumps([{"role": "user", "content": ("<image>\n" if tagged else "") + "Describe."},
                       {"role": "assistant", "content": "A shape."}])
    typ = pa.list_(pa.binary()) if list_type else pa.binary()
    pq.write_table(pa.table({"conversations": [conv] * len(cells), "image_bytes": pa.array(cells, typ)}), path,
                   row_group_size=3)


def test_rows_with_several_images_are_samples_of_several_images_and_rows_above_max_images_are_skipped(
        demo, tmp_path, capsys):
    good = [(demo / "images" / f"train/{i:05d}.jpg").read_bytes() for i in (0, 1, 2, 3)]
    cells = [[good[0]], [good[1], good[2]], [good[2]], [], [good[0], good[1], good[3]]]
    convs = [CONV, TWO, CONV, CONV, json.dumps([{"role": "user", "content": "<image><image><image> All?"},
                                                {"role": "assistant", "content": "Three."}])]
    pq.write_table(pa.table({"conversations": convs, "image_bytes": pa.array(cells, pa.list_(pa.binary()))}),
                   tmp_path / "m.parquet", row_group_size=3)
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/m.parquet", "data.val_records=", "data.max_images=2")
    m = run_embed(cfg, Dist())
    out = capsys.readouterr().out
    assert "1 row(s) hold more images than data.max_images (first: " in out and "m.parquet row 4)" in out
    assert "1 row(s) hold no image (first: " in out and "m.parquet row 3)" in out
    assert m["skipped_rows"] == {"too_many": 1, "no_image": 1}
    assert set(cache_rows(cfg.cache.dir)) == {sha(g) for g in good[:3]}  # each image once
    recs = sources.read_records(cfg.data.records, cfg.data, cfg.cache.dir)
    assert [r.images for r in recs] == [(sha(good[0]),), (sha(good[1]), sha(good[2])), (sha(good[2]),)]
    assert recs[1].turns[0] == ("user", "First <image>, then <image>: what?")
    with pytest.raises(ValueError, match=r"m\.parquet row 3: cannot become a sample \(one of the rows that hold no "
                                         r"image\); fix it, or set data\.strict=false"):
        sources.read_records(cfg.data.records, replace(cfg.data, strict=True), cfg.cache.dir)


def test_tags_that_do_not_match_the_images_are_skipped_and_counted_and_with_strict_one_line_before_any_work(
        demo, tmp_path, capsys):
    good = (demo / "images" / "train/00000.jpg").read_bytes()
    pq.write_table(pa.table({"conversations": [CONV, TWO], "image_bytes": pa.array([[good], [good, good, good]],
                                                                                    pa.list_(pa.binary()))}),
                   tmp_path / "m.parquet")
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/m.parquet", "data.val_records=", "data.strict=true")
    with pytest.raises(ValueError, match=r"m\.parquet row 1: 2 <image> tag\(s\) for 3 image\(s\)") as e:
        run_embed(cfg, Dist())
    assert "\n" not in str(e.value) and not cache.shard_dir(cfg.cache.dir).exists()
    m = run_embed(replace(cfg, data=replace(cfg.data, strict=False)), Dist())
    assert m["skipped_rows"] == {"mismatch": 1} and m["counts"]["images"] == 1
    assert "skipped 1 row(s) whose <image> tags and images differ in number (first: " in capsys.readouterr().out


def test_undecodable_bytes_are_failures_naming_file_and_row_and_the_rest_embedded(demo, tmp_path):
    good = (demo / "images" / "train/00000.jpg").read_bytes()
    minimind_file(tmp_path / "m.parquet", [good, b"not an image", good[:300], b"", good])
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/m.parquet", "data.val_records=",
                      "cache.max_failure_frac=0.9")
    m = run_embed(cfg, Dist())
    failures = [json.loads(x) for x in (tmp_path / "cache" / cache.FAILURES).read_text().splitlines()]
    want = {sha(b"not an image"): ("row 1", "not an image"), sha(good[:300]): ("row 2", "unreadable"),
            sha(b""): ("row 3", "empty")}
    assert {f["key"]: f["source"] for f in failures} == {k: f"{tmp_path}/m.parquet {row}" for k, (row, _) in want.items()}
    assert all(want[f["key"]][1] in f["reason"] for f in failures)
    assert m["counts"] == {"images": 4, "embedded": 1, "failed": 3} and set(cache_rows(cfg.cache.dir)) == {sha(good)}


# --- bad input: one line naming the file and row (group), nothing published --------------------------------

def _corrupt_page(path):
    col = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[col.data_page_offset:col.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _table(**cols):
    return pa.table(cols)


CONV = json.dumps([{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "A shape."}])
TWO = json.dumps([{"role": "user", "content": "First <image>, then <image>: what?"},
                  {"role": "assistant", "content": "Two shapes."}])
BAD = {  # name -> (write the file, overrides, what the line says)
    "corrupt page": (lambda p, img: (minimind_file(p, [img] * 6), _corrupt_page(p)), [],
                     r"m\.parquet row group 1: unreadable .*download or write it again"),
    "truncated": (lambda p, img: (minimind_file(p, [img] * 6), p.write_bytes(p.read_bytes()[:-200])), [],
                  r"m\.parquet: not a readable Parquet file .*download or write it again"),
    "not parquet": (lambda p, img: p.write_text("id,caption\n1,hello\n"), [],
                    r"m\.parquet: not a readable Parquet file"),
    "no image column": (lambda p, img: pq.write_table(_table(conversations=[CONV]), p), [],
                        r"m\.parquet: no image column \(looked for image_bytes, .*columns are conversations\); "
                        r"set data\.image_column"),
    "no text column": (lambda p, img: pq.write_table(_table(image_bytes=pa.array([img], pa.binary())), p), [],
                       r"m\.parquet: no text column .*set data\.text_column"),
    "override missing": (lambda p, img: minimind_file(p, [img]), ["data.image_column=picture"],
                         r"m\.parquet: no column 'picture' \(data\.image_column\); its columns are conversations, image_bytes"),
    "mistyped image": (lambda p, img: pq.write_table(_table(conversations=[CONV], image_bytes=["a.jpg"]), p), [],
                       r"m\.parquet: column 'image_bytes' is string, expected image bytes .*data\.image_column"),
    "mistyped text": (lambda p, img: pq.write_table(_table(conversations=[3], image_bytes=pa.array([img], pa.binary())), p),
                      [], r"m\.parquet: column 'conversations' is int64, expected a JSON string or a list of turns"),
    "bad json": (lambda p, img: pq.write_table(_table(conversations=[CONV, CONV, "[{oops"],
                                                      image_bytes=pa.array([img] * 3, pa.binary())), p), [],
                 r"m\.parquet row 2: conversations is not valid JSON .*fix the row"),
    "not a list": (lambda p, img: pq.write_table(_table(conversations=[CONV, '"hello"'],
                                                        image_bytes=pa.array([img] * 2, pa.binary())), p), [],
                   r"m\.parquet row 1: conversations must be a JSON list of turns, got a str"),
    "bad turns": (lambda p, img: pq.write_table(_table(conversations=[CONV, '[{"speaker": "me", "text": "hi"}]'],
                                                       image_bytes=pa.array([img] * 2, pa.binary())), p), [],
                  r"m\.parquet row 1: conversations\[0\] must be \{'from'.*or \{'role'"),
    "path only": (lambda p, img: pq.write_table(_table(caption=["a", "b"], image=[{"bytes": img, "path": "a.jpg"},
                                                                                  {"bytes": None, "path": "b.jpg"}]), p),
                  [], r"m\.parquet row 1: the image is only a path \('b\.jpg'\), not bytes inside the file"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_parquet_input_is_one_line_naming_file_and_row_and_nothing_is_published(demo, tmp_path, case):
    write, overrides, line = BAD[case]
    write(tmp_path / "m.parquet", (demo / "images" / "train/00000.jpg").read_bytes())
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/m.parquet", "data.val_records=", *overrides)
    with pytest.raises(ValueError, match=line) as e:
        run_embed(cfg, Dist())
    assert "\n" not in str(e.value)
    assert not cache.shard_dir(cfg.cache.dir).exists() and not (tmp_path / "cache" / cache.MANIFEST).exists()


@pytest.mark.slow
def test_bad_parquet_input_from_the_command_line_is_one_line_and_exit_2(demo, tmp_path):
    BAD["bad json"][0](tmp_path / "m.parquet", b"x")
    r = run_stage("embed.py", *demo_overrides(demo, tmp_path), f"data.records={tmp_path}/m.parquet", "data.val_records=")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path}/m.parquet row 2: conversations is not valid JSON")
    assert not cache.shard_dir(tmp_path / "cache").exists()


# --- stage 2 on Parquet records --------------------------------------------------------------------------

def test_training_on_minimind_parquet_uses_every_record(demo, layouts, embedded, tmp_path):
    cfg, _ = embedded["minimind"]
    tcfg = train_config(demo, cfg.cache.dir, tmp_path, *layout_overrides_of(cfg), "train.max_steps=2")
    data = load_data(tcfg, Dist())
    rows = {split: sum(pq.ParquetFile(p).metadata.num_rows for p in layouts["minimind"][split]) for split in layouts["minimind"]}
    assert (len(data.train), len(data.val), data.dropped) == (rows["train"], rows["val"], 0)
    assert data.train.image_rows(np.arange(len(data.train))) == rows["train"] - 3  # all but the 3 text-only rows
    final = fit(tcfg, Dist())
    assert np.isfinite(final["eval_loss"])


# --- kill -9 and torchrun on Parquet ---------------------------------------------------------------------

def kill9_then_rerun_is_bitwise_an_uninterrupted_run(demo, tmp_path, records: list[str], trials: int = 6, seed: int = 18):
    """kill -9 the embed of `records` (overrides) at random moments, rerun it: the cache of a run never killed."""
    over = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path), *records,
            "cache.shard_size=4", "encoder.batch_size=4", "encoder.num_workers=2"]
    t0 = time.time()
    ref = run_stage("embed.py", *over[:-1], "encoder.num_workers=0", f"cache.dir={tmp_path}/ref")
    within = time.time() - t0
    assert ref.returncode == 0, ref.stderr
    rng, killed = random.Random(seed), 0
    for trial in range(trials):
        out = kill_at_random("embed.py", over, rng, within)
        assert out.returncode in (0, -9), (trial, out.stderr[-1000:])
        killed += out.killed
    assert killed, "no run was killed"
    final = run_stage("embed.py", *over)
    assert final.returncode == 0, final.stderr
    assert_same_cache(tmp_path / "cache", tmp_path / "ref")


def two_ranks_equal_one_process(demo, tmp_path, records: list[str]):
    """torchrun with two ranks embeds `records` (overrides) into the cache one process writes."""
    over = [*demo_overrides(demo, tmp_path / "two"), *records, "encoder.num_workers=1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "stages/embed.py"), "--config", str(REPO / "configs/demo.toml"), *over],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_embed(demo_config(demo, tmp_path / "one", *records), Dist())
    assert_same_cache(tmp_path / "two" / "cache", tmp_path / "one" / "cache")


@pytest.mark.slow
def test_kill9_during_a_parquet_embed_then_rerun_is_bitwise_an_uninterrupted_run(demo, layouts, tmp_path):
    kill9_then_rerun_is_bitwise_an_uninterrupted_run(demo, tmp_path, layout_overrides(layouts["minimind"]))


@pytest.mark.slow
def test_torchrun_two_ranks_on_parquet_equal_one_process(demo, layouts, tmp_path):
    two_ranks_equal_one_process(demo, tmp_path, layout_overrides(layouts["minimind"]))
