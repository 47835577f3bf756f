"""minivlm.cache on tiny fakes: the shard plan, a shard's bytes against h5py's own reads, the manifest, --verify."""
import json

import h5py
import numpy as np

from minivlm import cache

T, D = 3, 4


def fake_shards(cache_dir, plan, seed=0) -> dict[str, np.ndarray]:
    rng, rows = np.random.default_rng(seed), {}
    for i, keys in enumerate(plan):
        emb = rng.standard_normal((len(keys), T, D)).astype(np.float16)  # (n, T, D)
        cache.write_shard(cache.shard_path(cache_dir, i), i, keys, emb, [], "fp", "{}", cache.plan_hash(keys))
        rows.update(zip(keys, emb))
    return rows


def test_the_plan_is_sorted_unique_keys_cut_into_fixed_size_shards():
    assert cache.plan_shards(["c", "a", "b", "a", "d"], 3) == [["a", "b", "c"], ["d"]]
    assert cache.plan_hash(["a", "b"]) != cache.plan_hash(["b", "a"])


def test_row_offsets_point_at_the_raw_bytes_h5py_reads_for_each_row(tmp_path):
    plan = cache.plan_shards([f"img{i}.jpg" for i in range(5)], 5)
    rows = fake_shards(tmp_path, plan)
    path = cache.shard_path(tmp_path, 0)
    with h5py.File(path, "r") as f:  # the reference: h5py itself
        ref = {k.decode(): f["embeddings"][i] for i, k in enumerate(f["keys"][...])}
        offsets = cache.row_offsets(path, f["embeddings"])
    raw = path.read_bytes()
    for i, key in enumerate(plan[0]):
        row = np.frombuffer(raw[offsets[i]:offsets[i] + T * D * 2], np.float16).reshape(T, D)
        assert np.array_equal(row, ref[key]) and np.array_equal(row, rows[key])


def test_the_manifest_waits_for_every_shard_and_verify_names_a_corrupted_one(tmp_path):
    plan = cache.plan_shards([f"img{i}.jpg" for i in range(6)], 2)
    fake_shards(tmp_path, plan[:2])
    assert cache.finalize(tmp_path, plan, {"fingerprint": "fp"}) is None  # shard 2 not published yet
    fake_shards(tmp_path, plan)
    manifest = cache.finalize(tmp_path, plan, {"fingerprint": "fp"})
    assert manifest["counts"] == {"images": 6, "embedded": 6, "failed": 0} and (manifest["tokens"], manifest["width"]) == (T, D)
    assert json.loads((tmp_path / cache.MANIFEST).read_text()) == manifest and cache.verify(tmp_path) == []
    index = cache.build_index(tmp_path, manifest)
    assert index.locations["img3.jpg"] == (1, 1)
    path = cache.shard_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[int(index.offsets[1][0])] ^= 0xFF  # one flipped bit in a row
    path.write_bytes(bytes(data))
    problems = cache.verify(tmp_path)
    assert problems and all("shard-00001.h5" in p for p in problems)
