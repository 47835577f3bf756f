"""Stage-2 data: rows stay aligned with their records, order is deterministic and resumable, bad caches fail clearly."""
import dataclasses
import json
import re
import shutil
import weakref

import h5py
import numpy as np
import pytest
import torch

from conftest import mixed_records, train_config
from minivlm.config import RunFailed
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.shard import Codec
from minivlm.training import data
from minivlm.training.data import (
    BatchSampler,
    Loader,
    Samples,
    load_splits,
    open_cache,
    split_tokens,
    stored_splits,
    to_device,
)
from minivlm.training.text import encode_sample, load_tokenizer, text_format


def dataset(cfg, split="train", mapped=None, packing=None):
    manifest, index = open_cache(cfg)
    fmt = text_format(load_tokenizer(cfg.tokenizer), cfg.tokenizer, index.tokens)
    train, val = load_splits(cfg, index)
    return Samples(train if split == "train" else val, index.reader(mapped), fmt, packing=packing), index, fmt


def loc(ds, i: int) -> tuple[int, int]:
    """(shard, row) of sample i's first image; (-1, -1) for a text-only sample."""
    sp = ds.split
    return (int(sp.shard[sp.first[i]]), int(sp.row[sp.first[i]])) if sp.first[i + 1] > sp.first[i] else (-1, -1)


@pytest.fixture(params=[True, False], ids=["mapped", "pread"])
def mapped(request):
    """Both ways rows are read: copied out of a mapped shard (caches that fit in memory) or with pread."""
    return request.param


def images(ds, batch) -> torch.Tensor:
    """The batch's image rows as the model gets them: decoded by to_device."""
    return to_device(batch, "cpu", ds.reader.codec)["images"]


def h5py_row(path, row) -> np.ndarray:
    with h5py.File(path) as f:  # the reference: h5py itself
        return f["embeddings"][row]


def same(a, b) -> bool:
    """Equal batch entries: tensors, or the host-side sample index."""
    return torch.equal(a, b) if torch.is_tensor(a) else np.array_equal(a, b)


def test_batch_rows_are_the_cache_rows_of_their_records(demo, demo_cache, tmp_path, mapped):
    ds, index, fmt = dataset(train_config(demo, demo_cache, tmp_path), mapped=mapped)
    ix = [5, 0, 17, len(ds) - 1]
    batch = ds[ix]
    got = iter(images(ds, batch))  # (K, T, D): the batch's images in order
    for b, i in enumerate(ix):
        rec = ds.split.records[i]
        n_placeholders = int((batch["input_ids"][b] == fmt.image_token_id).sum())
        if not rec.images:
            assert n_placeholders == 0
            continue
        shard, row = index.locations[rec.images[0]]
        with h5py.File(index.shards[shard].path) as f:
            assert f["keys"][row].decode() == rec.images[0]
            assert np.array_equal(next(got).numpy(), f["embeddings"][row])
        assert n_placeholders == index.tokens
    assert next(got, None) is None and (batch["labels"] != -100).any(dim=1).all()


@pytest.mark.parametrize("packing", [None, 0, 200], ids=["padded", "packed-longest", "packed-200"])
def test_samples_of_any_shape_reach_the_batch_as_alone_with_their_images_in_tag_order(demo, demo_cache, tmp_path,
                                                                                       packing):
    """Samples of 0, 1 and 2 images: each sample's ids and labels in its row (padded, or packed with others) are
    its ids and labels alone, its positions count from 0, and the batch's images are, in placeholder order, the
    cache rows of each sample's image keys in tag order (h5py reads them)."""
    cfg = train_config(demo, demo_cache, tmp_path, mixed_records(demo, tmp_path / "m.json"))
    ds, index, fmt = dataset(cfg, packing=packing)
    assert sorted(set(ds.text.placeholders.tolist())) == [0, 1, 2]
    shared = 0
    for ix in BatchSampler(ds, 8, seed=0).batches(0):
        batch = ds[ix]
        assert sorted(batch["index"].tolist()) == sorted(ix)  # packing lays out, never picks
        recs = [ds.split.records[i] for i in batch["index"]]
        want = [h5py_row(index.shards[s].path, r) for rec in recs for s, r in map(index.locations.get, rec.images)]
        got = images(ds, batch)
        assert len(got) == len(want) and all(np.array_equal(g.numpy(), w) for g, w in zip(got, want))
        ids, labels = batch["input_ids"], batch["labels"]
        pos = batch.get("positions", torch.arange(ids.shape[1]).expand_as(ids))  # padded: each row one sample
        assert ("positions" in batch) == (len(ids) < len(ix))  # packed where a row holds several, else padded
        runs = [(r, a) for r in range(len(ids)) for a in range(ids.shape[1]) if pos[r, a] == 0]
        alone = iter(encode_sample(fmt, rec) for rec in recs)
        for r, a in runs:
            one = next(alone, None) if (labels[r, a:] != -100).any() or packing is None else None
            if one is None:  # a row's padding tail
                assert (ids[r, a:] == fmt.pad_id).all() and (labels[r, a:] == -100).all()
                continue
            n = len(one[0])
            assert ids[r, a:a + n].tolist() == one[0] and labels[r, a:a + n].tolist() == one[1]
            assert pos[r, a:a + n].tolist() == list(range(n))
        shared += sum(int((pos[r] == 0).sum()) > 2 for r in range(len(ids)))  # rows of two samples or more
        if "positions" in batch:
            assert torch.equal(batch["cu_seqlens"], torch.cat([(pos.flatten() == 0).nonzero().flatten(),
                                                               torch.tensor([pos.numel()])]).int())
            assert ids.shape[1] <= (packing or max(ds.text.length[ix]))
    assert (shared > 0) == (packing is not None)


def test_the_shuffled_images_of_a_sample_are_all_another_samples(demo, demo_cache, tmp_path):
    cfg = train_config(demo, demo_cache, tmp_path, mixed_records(demo, tmp_path / "m.json"))
    ds, _, _ = dataset(cfg)
    for ix in BatchSampler(ds, 8, seed=1).batches(0):
        batch = ds[ix]
        owner = np.repeat(np.arange(len(batch["index"])), ds.text.placeholders[batch["index"]])  # (K,) sample of row k
        if len(set(owner)) > 1:
            assert (owner[batch["shuffled"]] != owner).all() and len(batch["shuffled"]) == len(owner)


def test_samples_too_long_or_with_too_many_images_are_skipped_counted_and_named_once_and_the_rest_train(
        demo, demo_cache, tmp_path, capsys):
    """One line each, naming the first such record, at load; every other sample is kept (nothing lost)."""
    recs = json.loads((demo / "train.json").read_text())[:40]
    long = dict(recs[3], id="long", conversations=[{"from": "human", "value": "<image>\n" + "describe " * 200},
                                                   {"from": "gpt", "value": "A shape."}])
    many = dict(recs[5], id="many", image=[recs[i]["image"] for i in range(3)], conversations=[
        {"from": "human", "value": "<image><image><image> All three?"}, {"from": "gpt", "value": "Shapes."}])
    (tmp_path / "r.json").write_text(json.dumps(recs + [long, many]))
    cfg = train_config(demo, demo_cache, tmp_path, f"data.records={tmp_path}/r.json", "data.max_images=2")
    got = data.load_data(cfg, Dist())
    out = capsys.readouterr().out
    assert len(got.train) == 40 and got.too_long.count == 1
    lines = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert any("skipped 1 row(s) hold more images than data.max_images (first: " in ln and "(id many)" in ln
               for ln in lines), out
    assert any(f"skipped 1 sample(s) whose images and prompt do not fit tokenizer.max_len={cfg.tokenizer.max_len} "
               f"(first: {tmp_path}/r.json record 40 (id long))" in ln for ln in lines), out


def test_samples_longer_than_the_models_positions_are_skipped_naming_the_setting_and_strict_stops_naming_the_sample(
        demo, demo_cache, tmp_path, capsys):
    """tokenizer.max_len above model.max_seq_len: a long sample is left out like one too long for the tokenizer (not
    'sequence end exceeds' at its first step), and data.strict names it and the setting to raise."""
    recs = json.loads((demo / "train.json").read_text())[:40]
    long = dict(recs[3], id="long", conversations=[{"from": "human", "value": "<image>\n" + "describe " * 60},
                                                   {"from": "gpt", "value": "A shape."}])
    (tmp_path / "r.json").write_text(json.dumps(recs + [long]))
    cfg = train_config(demo, demo_cache, tmp_path, f"data.records={tmp_path}/r.json", "tokenizer.max_len=512",
                       "model.max_seq_len=64")
    got = data.load_data(cfg, Dist())
    assert len(got.train) == 40 and got.too_long.count == 1 and got.skipped["too_long"][0] == 1
    assert (f"skipped 1 sample(s) whose images and prompt do not fit model.max_seq_len=64 (first: {tmp_path}/r.json "
            f"record 40 (id long)); raise model.max_seq_len") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"r\.json record 40 \(id long\): its images and prompt do not fit "
                                         r"model\.max_seq_len=64; raise model\.max_seq_len"):
        data.load_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, strict=True)), Dist())


def test_text_only_records_are_kept_and_failed_images_dropped_and_counted(demo, demo_cache, tmp_path):
    recs = json.loads((demo / "train.json").read_text())
    missing = dict(recs[0], id="gone", image="train/not-embedded.jpg")
    (tmp_path / "r.json").write_text(json.dumps(recs + [missing]))
    cfg = train_config(demo, demo_cache, tmp_path, f"data.records={tmp_path}/r.json")
    _, index = open_cache(cfg)
    train, _ = load_splits(cfg, index)
    n_images = np.diff(train.first)
    assert train.dropped == 1 and int((n_images == 0).sum()) == sum("image" not in r for r in recs)


def test_hash_split_is_deterministic_and_disjoint(demo, demo_cache, tmp_path):
    cfg = train_config(demo, demo_cache, tmp_path, "data.val_records=", "data.val_frac=0.2")
    _, index = open_cache(cfg)
    a_train, a_val = load_splits(cfg, index)
    b_train, b_val = load_splits(cfg, index)
    keys = lambda s: {k for r in s.records for k in r.images}  # noqa: E731
    assert keys(a_val) == keys(b_val) and not keys(a_val) & keys(a_train)
    assert 0.1 < len(keys(a_val)) / (len(keys(a_val)) + len(keys(a_train))) < 0.3


def test_sampler_is_deterministic_partitions_ranks_and_resumes_mid_epoch(demo, demo_cache, tmp_path):
    ds, _, _ = dataset(train_config(demo, demo_cache, tmp_path))
    s = BatchSampler(ds, 8, seed=3)
    assert s.batches(0) == BatchSampler(ds, 8, seed=3).batches(0) and s.batches(0) != s.batches(1)
    assert sorted(sum(s.batches(0), [])) == sorted(set(sum(s.batches(0), [])))
    r0, r1 = BatchSampler(ds, 8, 3, rank=0, world_size=2), BatchSampler(ds, 8, 3, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(ds) // 16
    assert not set(sum(r0.batches(0), [])) & set(sum(r1.batches(0), []))
    s.set_position(1, 3 * 8)  # 3 steps of 8 samples into epoch 1
    assert list(s) == s.batches(1)[3:]


def steps(ds, batch_size: int, grad_accum: int, world_size: int, epoch: int) -> list[list[int]]:
    """The samples each optimizer step reads, over every rank and micro-step."""
    ranks = [BatchSampler(ds, batch_size, 3, r, world_size, grad_accum=grad_accum).batches(epoch)
             for r in range(world_size)]
    n = len(ranks[0]) // grad_accum
    assert all(len(r) == len(ranks[0]) for r in ranks)  # every rank the same number of batches
    return [sorted(i for r in ranks for b in r[k * grad_accum:(k + 1) * grad_accum] for i in b) for k in range(n)]


def test_every_split_of_a_global_batch_reads_the_same_samples_at_every_step(demo, demo_cache, tmp_path):
    ds, _, _ = dataset(train_config(demo, demo_cache, tmp_path))
    for epoch in (0, 1):
        want = steps(ds, 16, 1, 1, epoch)
        assert len(want) == len(ds) // 16 and len({i for step in want for i in step}) == 16 * len(want)
        for batch_size, grad_accum, world_size in ((8, 2, 1), (8, 1, 2), (4, 2, 2), (2, 4, 2), (4, 1, 4)):
            assert steps(ds, batch_size, grad_accum, world_size, epoch) == want, (batch_size, grad_accum, world_size)
    s = BatchSampler(ds, 4, 3, rank=1, world_size=2, grad_accum=2)
    s.set_position(1, 5 * 16)  # resumed after 5 steps: this rank's micro-batches of step 6 on
    assert list(s) == s.batches(1)[5 * 2:]


def test_held_out_batches_cover_the_same_samples_on_any_number_of_ranks(demo, demo_cache, tmp_path):
    val, _, _ = dataset(train_config(demo, demo_cache, tmp_path), "val")
    for limit in (1, 3, 100):  # train.eval_batches: global batches of 8 samples, or more than the set holds
        for batch_size, grad_accum, world_size in ((8, 1, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)):
            got = sorted(i for r in range(world_size) for b in BatchSampler(
                val, batch_size, 0, r, world_size, shuffle=False, grad_accum=grad_accum).batches(0)[:limit * grad_accum]
                for i in b)
            assert got == list(range(min(len(val), limit * 8))), (limit, batch_size, grad_accum, world_size)


def test_reader_threads_deliver_the_same_batches_in_order_as_inline_reads(demo, demo_cache, tmp_path, mapped):
    ds, _, _ = dataset(train_config(demo, demo_cache, tmp_path), mapped=mapped)
    s = BatchSampler(ds, 8, seed=0)
    inline = list(Loader(ds, s, 0))
    ds.close()
    threaded = list(Loader(ds, s, 3))
    assert len(inline) == len(threaded) == len(s)
    for a, b in zip(inline, threaded):
        assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    s.set_position(0, (len(s) - 2) * 8)
    it = iter(Loader(ds, s, 2))
    assert torch.equal(next(it)["input_ids"], inline[-2]["input_ids"])
    it.close()  # a loop that stops mid-epoch: the reader threads are shut down


def test_the_loader_holds_no_batch_beyond_the_read_it_came_from(demo, demo_cache, tmp_path, monkeypatch):
    ds, _, _ = dataset(train_config(demo, demo_cache, tmp_path))
    monkeypatch.setattr(Loader, "READ_BYTES", 2 * ds.row_bytes)  # a read per batch; a text group is many batches
    alive = []
    for batch in Loader(ds, BatchSampler(ds, 2, seed=0), 0):
        alive.append(weakref.ref(batch["rows"]))
        assert sum(r() is not None for r in alive) <= 2  # this batch and at most the one before it
    assert len(alive) > 2


def test_a_read_buffer_is_reused_only_once_nothing_made_from_it_is_left():
    codec = Codec("float16", 3, 4)
    buffers = data.Buffers(codec.row_bytes)
    holders = {  # each the only thing left of a read
        "slice": lambda t: t[1:],
        "split part": lambda t: t.split(1)[-1],
        "NumPy array of a part": lambda t: t.split(2)[0].numpy(),
        "decoded rows": codec.decode,  # float16 rows on the CPU: a view of the stored bytes
    }
    for name, hold in holders.items():
        t = buffers.take(4)
        at, kept = t.data_ptr(), hold(t)
        del t
        assert buffers.take(4).data_ptr() != at, f"read into while its {name} was held"
        del kept
        assert buffers.take(4).data_ptr() == at, f"not reused once its {name} was dropped"


def test_rows_a_caller_still_holds_are_never_read_over(demo, demo_cache, tmp_path, monkeypatch):
    cfg = train_config(demo, demo_cache, tmp_path)
    ds, _, _ = dataset(cfg)
    reference, _, _ = dataset(cfg)  # reads of its own, into buffers of its own
    monkeypatch.setattr(Loader, "READ_BYTES", 2 * ds.row_bytes)  # a read per batch of 2
    monkeypatch.setattr(data.Buffers, "KEEP", 3)                   # reads outgrow the buffers kept
    held = []
    for i, batch in enumerate(Loader(ds, BatchSampler(ds, 2, seed=0), 2)):
        if i % 3 == 0:  # a part of the read, alone; the batch itself is dropped
            held.append((batch["index"], batch["rows"].split(1)[0] if i % 2 else batch["rows"][:1].numpy()))
    assert len(held) > 3 * data.Buffers.KEEP
    for index, first_row in held:
        assert np.array_equal(np.asarray(first_row), reference.rows(index)[:1].numpy())


def test_batches_collated_together_equal_each_batch_alone(demo, demo_cache, tmp_path):
    ds, _, _ = dataset(train_config(demo, demo_cache, tmp_path))
    batches = [[3, 1, 4], [len(ds) - 1], [5, 9, 2, 6, 0]]
    for together, ix in zip(ds.text_batches(batches), batches):
        alone = ds[ix]
        assert together.keys() <= alone.keys() and all(same(together[k], alone[k]) for k in together)
        assert together["input_ids"].is_contiguous()


def test_row_reads_equal_h5py_reads_for_every_row(demo, demo_cache, tmp_path, mapped):
    ds, index, _ = dataset(train_config(demo, demo_cache, tmp_path), mapped=mapped)
    batch = ds[list(range(len(ds)))]
    got = images(ds, batch)
    locs = [loc(ds, i) for i in batch["index"] if loc(ds, i)[0] >= 0]
    assert len(got) == len(locs)
    for k, (s, r) in enumerate(locs):
        assert np.array_equal(got[k].numpy(), h5py_row(index.shards[s].path, r))


def test_truncated_shard_fails_at_open_naming_the_file(demo, demo_cache, tmp_path, mapped):
    broken = tmp_path / "cache"
    shutil.copytree(demo_cache, broken)
    ds, index, _ = dataset(train_config(demo, broken, tmp_path), mapped=mapped)
    first = next(i for i in range(len(ds)) if loc(ds, i)[0] == 0)
    with open(index.shards[0].path, "r+b") as f:
        f.truncate(index.shards[0].end - 10)
    with pytest.raises(ValueError, match="shard-00000.h5: .* bytes, but its rows reach byte .*truncated.*--verify"):
        ds[[first]]


def test_shard_cut_short_after_open_fails_the_read_naming_the_file(demo, demo_cache, tmp_path):
    broken = tmp_path / "cache"
    shutil.copytree(demo_cache, broken)
    ds, index, _ = dataset(train_config(demo, broken, tmp_path), mapped=False)  # a cut mapping is a SIGBUS
    in_shard0 = [i for i in range(len(ds)) if loc(ds, i)[0] == 0]
    last = max(in_shard0, key=lambda i: loc(ds, i)[1])
    ds[[in_shard0[0]]]
    with open(index.shards[0].path, "r+b") as f:
        f.truncate(index.shards[0].end - 10)
    with pytest.raises(ValueError, match=rf"shard-00000.h5: row {loc(ds, last)[1]} \(bytes .*\) is cut short.*--verify"):
        ds[[last]]


def test_a_corrupt_row_stops_the_batch_naming_shard_row_and_key(demo, demo_cache, tmp_path, mapped):
    broken = tmp_path / "cache"
    shutil.copytree(demo_cache, broken)
    ds, index, _ = dataset(train_config(demo, broken, tmp_path), mapped=mapped)
    i = next(i for i in range(len(ds)) if loc(ds, i)[0] == 1)
    row = loc(ds, i)[1]
    info = index.shards[1]
    data_ = bytearray(info.path.read_bytes())
    data_[info.values_at + row * info.codec.values_bytes + 7] ^= 1
    info.path.write_bytes(bytes(data_))
    key = ds.split.records[i].images[0]
    with pytest.raises(RunFailed, match=rf"shard-00001.h5: row {row} \(image {key}\) fails its xxh3_64 checksum"):
        ds[[0, i]]


def test_missing_and_incomplete_cache_say_what_to_run(demo, demo_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no shards; run stages/embed.py"):
        open_cache(train_config(demo, tmp_path / "nothing", tmp_path))
    partial = tmp_path / "partial"
    shutil.copytree(demo_cache, partial)
    (partial / cache.MANIFEST).unlink()
    with pytest.raises(ValueError, match="incomplete.*rerun stages/embed.py"):
        open_cache(train_config(demo, partial, tmp_path))
    shutil.copytree(demo_cache, tmp_path / "holes")
    cache.shard_path(tmp_path / "holes", 2).unlink()
    with pytest.raises(ValueError, match="incomplete: 1 shard\\(s\\) missing.*shard-00002.h5"):
        open_cache(train_config(demo, tmp_path / "holes", tmp_path))


def test_shape_and_encoder_mismatches_name_the_field(demo, demo_cache, tmp_path):
    cfg = train_config(demo, demo_cache, tmp_path)
    manifest, index = open_cache(cfg)
    with pytest.raises(ValueError, match=f"T \\(image tokens\\) = {index.tokens}, the model expects 99"):
        open_cache(cfg, tokens=99)
    with pytest.raises(ValueError, match=f"D \\(width\\) = {index.width}, the model expects 7"):
        open_cache(cfg, width=7)
    with pytest.raises(ValueError, match="the config has encoder.keep_cls=True where cache .* has encoder.keep_cls=False"):
        open_cache(train_config(demo, demo_cache, tmp_path, "encoder.keep_cls=true"))


def test_stored_samples_are_kept_and_reused_only_for_the_same_inputs(demo, demo_cache, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_cache, cache_dir, ignore=shutil.ignore_patterns(data.SAMPLES))
    cfg = train_config(demo, cache_dir, tmp_path)
    manifest, index = open_cache(cfg)
    fmt = text_format(load_tokenizer(cfg.tokenizer), cfg.tokenizer, index.tokens)
    reference = [split_tokens(fmt, sp) for sp in load_splits(cfg, index)]  # from the records themselves
    first = stored_splits(cfg, index, manifest, fmt, save=True)
    (kept,) = (cache_dir / data.SAMPLES).glob("*.npz")

    def equal(a, b) -> bool:
        return all(np.array_equal(x.shard, y.shard) and np.array_equal(x.row, y.row) and
                   np.array_equal(x.first, y.first) and x.dropped == y.dropped and u == v
                   and all(np.array_equal(getattr(s, f.name), getattr(t, f.name)) for f in dataclasses.fields(s))
                   for (x, s, u), (y, t, v) in zip(a, b))

    assert equal(first, reference) and first[0][0].records is None  # a run keeps no records
    monkeypatch.setattr(data, "load_splits", lambda *a: pytest.fail("read the records again"))
    assert equal(stored_splits(cfg, index, manifest, fmt), reference)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads((demo / "train.json").read_text())[:-1]))
    longer = text_format(fmt.tokenizer, dataclasses.replace(cfg.tokenizer, max_len=90), index.tokens)
    for other_cfg, other_fmt in ((train_config(demo, cache_dir, tmp_path, f"data.records={fewer}"), fmt),
                                 (cfg, longer), (train_config(demo, cache_dir, tmp_path, "data.val_records="), fmt)):
        with pytest.raises(pytest.fail.Exception, match="read the records again"):
            stored_splits(other_cfg, index, manifest, other_fmt)
    with pytest.raises(pytest.fail.Exception, match="read the records again"):  # another cache: other rows
        stored_splits(cfg, index, {**manifest, "shards": manifest["shards"][::-1]}, fmt)
    kept.write_bytes(b"not a zip")
    monkeypatch.undo()
    assert equal(stored_splits(cfg, index, manifest, fmt), reference)  # unreadable: read again, said so
    assert "is unreadable" in capsys.readouterr().out


def test_a_batch_counts_its_real_text_tokens_and_names_its_cached_rows(demo, demo_cache, tmp_path):
    ds, _, fmt = dataset(train_config(demo, demo_cache, tmp_path))
    ix = [0, 3, 5]
    batch = ds[ix]
    unpadded = [encode_sample(fmt, ds.split.records[i])[0] for i in ix]  # one sample at a time, no padding
    assert ds.text_tokens(batch["index"]) == sum(sum(t != fmt.image_token_id for t in ids) for ids in unpadded)
    assert ds.image_rows(batch["index"]) == 3 and list(batch["index"]) == ix
    named = ds.describe_rows(batch["index"])
    for i in ix:
        shard, row = loc(ds, i)
        assert re.search(rf"{ds.reader.shards[shard].path.name} rows? [0-9, ]*\b{row}\b", named), named


def test_model_pool_and_pixel_shuffle_set_the_placeholders_while_rows_stay_as_cached(demo, demo_cache, tmp_path):
    """The demo cache holds a 4x4 grid (T=16) per image: a run's reduction changes its placeholders, never its rows."""
    from minivlm.dist import Dist
    plain = data.load_data(train_config(demo, demo_cache, tmp_path), Dist())
    assert plain.fmt.image_tokens == plain.index.tokens == 16
    for setting, n in [("model.pool=2", 4), ("model.pixel_shuffle=2", 4), ("model.pool=4", 1),
                       ("model.pool=2,model.pixel_shuffle=2", 1)]:
        d = data.load_data(train_config(demo, demo_cache, tmp_path, *setting.split(",")), Dist())
        assert d.fmt.image_tokens == n
        for ours, theirs in zip(d.eval_batches, plain.eval_batches):
            assert np.array_equal(ours["index"], theirs["index"]) and torch.equal(ours["rows"], theirs["rows"])
            per_sample = (ours["input_ids"] == d.fmt.image_token_id).sum(1).numpy()
            assert np.array_equal(per_sample, n * d.val.text.placeholders[ours["index"]])
            assert to_device(ours, "cpu", d.codec)["images"].shape[1:] == (16, d.index.width)
        d.train.close()
    plain.train.close()
    for setting, needle in [("model.pool=3", "model.pool=3 x model.pixel_shuffle=1 must divide the cache's 4x4 patch"),
                            ("model.pixel_shuffle=8", "model.pool=1 x model.pixel_shuffle=8 must divide")]:
        with pytest.raises(ValueError, match=needle) as e:
            data.load_data(train_config(demo, demo_cache, tmp_path, setting), Dist())
        assert "\n" not in str(e.value)
