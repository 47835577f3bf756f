"""WebDataset tars as img2dataset writes them (stdlib tarfile, its member names and .json), grouped as webdataset
groups members; one cache row per unique image keyed by SHA-256; bad tars; kill -9 and torchrun on tars."""
import io
import json
import tarfile

import numpy as np
import pytest
from test_embed import cache_rows
from test_sources import (
    folder_rows_by_sha,
    kill9_then_rerun_is_bitwise_an_uninterrupted_run,
    sha,
    two_ranks_equal_one_process,
)

from conftest import demo_config, train_config
from minivlm.config import load_config
from minivlm.demo.tars import write_tar, write_tars
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.embed import run_embed
from minivlm.formats import sources, tars
from minivlm.training.data import load_data

PER_TAR = 64


@pytest.fixture(scope="module")
def tar_set(demo, tmp_path_factory):
    """The session demo as img2dataset tars: train in 3 shards of 64 samples, val in 1; 8 images repeated."""
    return write_tars(demo, tmp_path_factory.mktemp("tars"), per_tar=PER_TAR, repeat=8)


def tar_overrides(paths) -> list[str]:
    """Train as a brace pattern over its shards (as webdataset and img2dataset users write it), val as one tar."""
    train = paths["train"]
    pattern = f"{train[0].parent}/{{00000..{len(train) - 1:05d}}}.tar"
    return [f"data.records={pattern}", f"data.val_records={paths['val'][0]}", "data.image_root="]


@pytest.fixture(scope="module")
def tar_embedded(demo, tar_set, tmp_path_factory):
    cfg = demo_config(demo, tmp_path_factory.mktemp("tar_embedded"), *tar_overrides(tar_set))
    return cfg, run_embed(cfg, Dist())


# --- acceptance 1: img2dataset tars embed to exactly the unique images, bitwise the folder rows -------------

def test_img2dataset_tars_embed_exactly_the_unique_images_bitwise_the_folder_rows(demo, demo_cache, tar_set,
                                                                                   tar_embedded):
    cfg, manifest = tar_embedded
    folder = folder_rows_by_sha(demo, demo_cache)
    rows = cache_rows(cfg.cache.dir)
    assert rows.keys() == folder.keys()  # repeated images once; the failed download absent
    assert all(np.array_equal(rows[k], folder[k]) for k in rows)
    assert manifest["counts"] == {"images": len(folder), "embedded": len(folder), "failed": 0}
    assert manifest["skipped_rows"] == {} and len(manifest["sources"]) == len(tar_set["train"]) + 1


def test_tar_records_are_the_captions_keyed_by_member_key(demo, tar_set, tar_embedded):
    cfg, _ = tar_embedded
    recs = sources.read_records(cfg.data.records, cfg.data, cfg.cache.dir)
    folder = {r["image"]: r["conversations"][-1]["value"] for r in json.loads((demo / "train.json").read_text())
              if "image" in r}
    by_sha = {sha((demo / "images" / k).read_bytes()): caption for k, caption in folder.items()}
    assert len(recs) == len(folder) + 8  # every image, and the repeated ones again
    assert all(r.turns == (("user", "<image>\n"), ("assistant", by_sha[r.images[0]])) for r in recs)
    assert recs[0].id == "000000000" and recs[PER_TAR].id == "000010000"  # 5 digits shard + 4 position
    assert recs[0].where == f"{tar_set['train'][0]} member 000000000.jpg"


def test_members_are_grouped_by_key_as_webdataset_groups_them():
    # webdataset's base_plus_ext: the key is the path up to the first dot of the basename
    assert tars.split_name("000010023.jpg") == ("000010023", "jpg")
    assert tars.split_name("a/b.c/img.seg.png") == ("a/b.c/img", "seg.png")
    assert tars.split_name("README") == (None, None) and tars.split_name("dir.d/README") == (None, None)


def test_brace_patterns_expand_as_webdataset_expands_them(tmp_path):
    assert sources.braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert sources.braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert sources.braces("s/{00000..00000}.tar") == ["s/00000.tar"] and sources.braces("x.tar") == ["x.tar"]
    with pytest.raises(FileNotFoundError, match=r"records file .*s/00001\.tar not found"):
        (tmp_path / "s").mkdir() or (tmp_path / "s/00000.tar").write_bytes(b"")
        sources.expand(f"{tmp_path}/s/{{00000..00001}}.tar")


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:  # a directory entry
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_directories_extensionless_and_other_members_are_ignored_and_extensions_lowercased(demo, tmp_path):
    img = (demo / "images" / "train/00000.jpg").read_bytes()
    meta = json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]})
    path = tmp_path / "s.tar"
    _tar(path, [("sub.d", None), ("sub/k1.JPG", img), ("sub/k1.cls", b"3"), ("sub/k1.json", meta.encode()), ("LICENSE", b"x"),
                ("sub/k2.webp", img), ("sub/k2.txt", b"caption two")])
    recs = sources.read_records(str(path), load_config(None).data, tmp_path / "c")
    assert [(r.id, r.turns) for r in recs] == [("sub/k1", (("user", "<image>\nWhat?"), ("assistant", "A."))),
                                               ("sub/k2", (("user", "<image>\n"), ("assistant", "caption two")))]
    assert recs[0].images == recs[1].images == (sha(img),)


# --- bad input: one line naming the tar (and member) ----------------------------------------------------------

def _samples(img: bytes, n: int = 4) -> list[tuple[str, bytes, str]]:
    return [(f"00000{i:04d}", img, f"caption {i}") for i in range(n)]


def _cut(cut_at):
    def write(p, img):
        write_tar(p, _samples(img))
        p.write_bytes(p.read_bytes()[:cut_at(p)])
    return write


def _gzip(p, img):
    import gzip
    write_tar(p, _samples(img))
    p.write_bytes(gzip.compress(p.read_bytes()))


BAD_TARS = {
    "truncated mid-member": (_cut(lambda p: 512 * 12 + 100), r"s\.tar: truncated or corrupt after member 000000001\.\w+ "
                             r"\(unexpected end of data\); download or write the tar again"),
    "truncated at a member's end": (_cut(lambda p: tars.index(p).image_offset[2] - 512),
                                    r"s\.tar: truncated after member 000000001\.txt \(no end-of-archive blocks\); "
                                    r"download or write the tar again"),
    "not a tar": (lambda p, img: p.write_bytes(b"<html>404 Not Found</html>\n" * 40),
                  r"s\.tar: not a tar file \(.*\); download or write the tar again"),
    "empty file": (lambda p, img: p.write_bytes(b""), r"s\.tar: not a tar file .*download or write the tar again"),
    "compressed": (_gzip, r"s\.tar: a gzip-compressed tar; .*decompress it"),
    "one extension twice": (lambda p, img: _tar(p, [("k.jpg", img), ("k.txt", b"a"), ("k.txt", b"b")]),
                            r"s\.tar member k\.txt: a second \.txt under key 'k'; .*write the tar again"),
    "bad json": (lambda p, img: _tar(p, [("k.jpg", img), ("k.json", b"{oops")]),
                 r"s\.tar member k\.json: unreadable json \(JSONDecodeError: .*\); fix the member"),
}


@pytest.mark.parametrize("case", BAD_TARS)
def test_a_bad_tar_is_one_line_naming_tar_and_member_and_nothing_is_published(demo, tmp_path, case):
    write, line = BAD_TARS[case]
    write(tmp_path / "s.tar", (demo / "images" / "train/00000.jpg").read_bytes())
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/s.tar", "data.val_records=")
    with pytest.raises(ValueError, match=line) as e:
        run_embed(cfg, Dist())
    assert "\n" not in str(e.value)
    assert not cache.shard_dir(cfg.cache.dir).exists() and not (tmp_path / "cache" / cache.MANIFEST).exists()


def test_samples_without_image_or_caption_or_with_two_images_are_skipped_naming_tar_and_member_rest_embedded(
        demo, tmp_path, capsys):
    imgs = [(demo / "images" / f"train/{i:05d}.jpg").read_bytes() for i in range(4)]
    _tar(tmp_path / "s.tar", [("a.jpg", imgs[0]), ("a.txt", b"one"),
                              ("b.txt", b"no image"), ("b.json", b'{"caption": "no image"}'),
                              ("c.jpg", imgs[1]), ("c.json", b'{"status": "success", "caption": null}'),
                              ("d.jpg", imgs[2]), ("d.png", imgs[3]), ("d.txt", b"two images"),
                              ("e.jpg", imgs[3]), ("e.txt", b"five")])
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/s.tar", "data.val_records=")
    m = run_embed(cfg, Dist())
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning: skipped")]  # one line a reason
    assert sorted(warnings) == sorted([
        f"warning: skipped 1 row(s) hold no image (first: {tmp_path}/s.tar member b.txt)",
        f"warning: skipped 1 row(s) hold no text (first: {tmp_path}/s.tar member c.jpg)",
        f"warning: skipped 1 row(s) hold several images in a tar sample (one a sample) (first: {tmp_path}/s.tar "
        f"member d.jpg)"])
    assert m["skipped_rows"] == {"no_image": 1, "no_text": 1, "several": 1}
    assert set(cache_rows(cfg.cache.dir)) == {sha(imgs[0]), sha(imgs[3])}  # nothing else lost


def test_undecodable_image_members_are_failures_naming_tar_and_member(demo, tmp_path):
    good = (demo / "images" / "train/00000.jpg").read_bytes()
    _tar(tmp_path / "s.tar", [("a.jpg", good), ("a.txt", b"ok"), ("b.jpg", good[:300]), ("b.txt", b"cut")])
    cfg = demo_config(demo, tmp_path, f"data.records={tmp_path}/s.tar", "data.val_records=", "cache.max_failure_frac=0.9")
    m = run_embed(cfg, Dist())
    failure, = [json.loads(x) for x in (tmp_path / "cache" / cache.FAILURES).read_text().splitlines()]
    assert failure["key"] == sha(good[:300]) and failure["source"] == f"{tmp_path}/s.tar member b.jpg"
    assert m["counts"] == {"images": 2, "embedded": 1, "failed": 1}


def test_training_on_tars_uses_every_sample_and_never_reads_image_bytes(demo, tar_embedded, tmp_path, monkeypatch):
    cfg, _ = tar_embedded

    def boom(*a, **kw):
        raise AssertionError("stage 2 read or hashed image bytes")

    monkeypatch.setattr(sources, "_hash_rows", boom)
    monkeypatch.setattr(tars.ImageRows, "images", boom)
    tcfg = train_config(demo, cfg.cache.dir, tmp_path, *[f"data.{k}={getattr(cfg.data, k)}" for k in
                                                         ("records", "val_records", "image_root")])
    data = load_data(tcfg, Dist())
    n_train = sum("image" in r for r in json.loads((demo / "train.json").read_text())) + 8  # and the repeats
    assert (len(data.train), data.dropped) == (n_train, 0)
    monkeypatch.setattr(tars, "_INDEXED", {})  # a new process: a rerun loads its stored samples, scanning no tar
    monkeypatch.setattr(tars, "scan", boom)
    assert len(load_data(tcfg, Dist()).train) == n_train


def test_the_stored_join_of_a_tar_costs_no_read_after_its_index_pass(tar_set, tmp_path, monkeypatch):
    """A remote tar is downloaded once for its index and hashes, not again to hash its images."""
    path = tar_set["train"][0]
    src = sources.open_sources(str(path), load_config(None).data)[0]
    tars.index(path)

    def no_read(*a, **kw):
        raise AssertionError("read the tar again")

    monkeypatch.setattr(tars.remote, "read_range", no_read)
    monkeypatch.setattr(tars.remote, "open_binary", no_read)
    joined = sources.row_images(src, tmp_path)
    with tarfile.open(path) as tf:  # the reference: the stdlib's own reading of each image member
        images = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
        keys = [k for row in range(len(images)) for k in joined.keys(row, joined.start)]
        assert keys == [sha(tf.extractfile(m).read()) for m in images]


# --- reads: by offset, forward, bounded ---------------------------------------------------------------------

def test_a_worker_reads_only_the_blocks_its_rows_sit_in(demo, tar_set, monkeypatch):
    path = tar_set["train"][0]
    idx = tars.index(path)
    monkeypatch.setattr(tars.remote, "BLOCK", 4096)
    reads = []
    real = tars.remote.read_range
    monkeypatch.setattr(tars.remote, "read_range", lambda p, a, b: reads.append((a, b)) or real(p, a, b))
    rows = tars.ImageRows(path, tars.layout(path))
    with tarfile.open(path) as tf:
        direct = {m.name: tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")}
    assert [rows.images(r) for r in (40, 41, 50)] == [[direct[f"0000000{r}.jpg"]] for r in (40, 41, 50)]
    assert reads and reads[0][0] == idx.image_offset[40] and all(b - a <= 4096 for a, b in reads)
    assert sum(b - a for a, b in reads) < path.stat().st_size / 4


# --- kill -9 and torchrun on tars ---------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_during_a_tar_embed_then_rerun_is_bitwise_an_uninterrupted_run(demo, tar_set, tmp_path):
    """One kill (seed 26: at 3/4 of an uninterrupted run's time, past start-up, shards being published) and a rerun;
    the Parquet test kills six times, the code after the source is the same."""
    kill9_then_rerun_is_bitwise_an_uninterrupted_run(demo, tmp_path, tar_overrides(tar_set), trials=1, seed=26)


@pytest.mark.slow
def test_torchrun_two_ranks_on_tars_equal_one_process(demo, tar_set, tmp_path):
    two_ranks_equal_one_process(demo, tmp_path, tar_overrides(tar_set))
