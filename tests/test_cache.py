"""minivlm.embedding.cache and minivlm.embedding.shard on tiny fakes: the format-2 layout as plain h5py reads it, every codec
decoded by its documented rule, per-row checksums as the xxhash library computes them that name the row (and
the CRC-32 ones older caches hold), the manifest, and the upgrades of format 1 and of CRC-32 caches."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
import xxhash

from conftest import crc32_cache, write_crc32_shard
from minivlm.config import CACHE_DTYPES, RunFailed
from minivlm.embedding import cache, shard

T, D = 3, 4
META = dict(fingerprint="{}", fingerprint_id="fp", failures=[])


def features(n: int, seed: int = 0) -> torch.Tensor:
    """Activation-like rows: mostly small, a few large values, one all-zero token (a zero scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D, generator=g) * torch.rand(n, T, 1, generator=g) * 4
    x[0, 0] = 0
    return x


def fake_shards(cache_dir, plan, dtype="float16", seed=0, crc32=()) -> dict[str, torch.Tensor]:
    """Shards of random features through the real writer (those numbered in `crc32` rewritten as older
    minivlm wrote them); returns key -> the float32 features written."""
    codec, rows = shard.Codec(dtype, T, D), {}
    for i, keys in enumerate(plan):
        x = features(len(keys), seed + i)
        shard.write_shard(cache.shard_path(cache_dir, i), codec.encode(x).numpy(), codec, keys, shard_index=i,
                          plan=cache.plan_hash(keys), **META)
        if i in crc32:
            write_crc32_shard(cache.shard_path(cache_dir, i))
        rows.update(zip(keys, x))
    return rows


def decoded_by_h5py(path) -> dict[str, np.ndarray]:
    """The format-2 contract read with plain h5py and decoded by the rules written in minivlm/embedding/shard.py's
    docstring, none of our code: float16 as is, bfloat16 bits << 16, int8 * scale, e4m3fn bits * scale."""
    with h5py.File(path, "r") as f:
        codec, emb = f.attrs["codec"], f["embeddings"]
        assert emb.chunks is None and emb.compression is None  # contiguous, unfiltered
        out = {}
        for i, key in enumerate(f["keys"][...]):
            v = emb[i]
            if codec == "float16":
                x = v.astype(np.float32)
            elif codec == "bfloat16":
                x = (v.astype(np.uint32) << 16).view(np.float32)
            elif codec == "int8":
                x = v.astype(np.float32) * f["scales"][i][:, None]
            else:  # OCP FP8 E4M3 (e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities
                sign = np.where(v >> 7, -1.0, 1.0)
                e, m = (v >> 3) & 0xF, (v & 7).astype(np.float64)
                x = (sign * np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7)))
                x = x.astype(np.float32) * f["scales"][i][:, None]
            out[key.decode()] = x
    return out


def test_the_plan_is_sorted_unique_keys_cut_into_fixed_size_shards():
    assert cache.plan_shards(["c", "a", "b", "a", "d"], 3) == [["a", "b", "c"], ["d"]]
    assert cache.plan_hash(["a", "b"]) != cache.plan_hash(["b", "a"])


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_plain_h5py_reads_every_codec_bitwise_as_the_reader_decodes_it(tmp_path, dtype):
    plan = [[f"img{i}.jpg" for i in range(6)]]
    written = fake_shards(tmp_path, plan, dtype)
    info = shard.read_info(cache.shard_path(tmp_path, 0), keys=True)
    reader = shard.RowReader([info], mapped=False)
    rows = np.empty((6, info.codec.row_bytes), np.uint8)
    reader.read(np.zeros(6, np.int64), np.arange(6), rows)
    ours = info.codec.decode(torch.from_numpy(rows)).float().numpy()
    ref = decoded_by_h5py(info.path)
    for i, key in enumerate(info.keys):
        assert np.array_equal(ours[i], ref[key]), (dtype, key)
    x = torch.stack([written[k] for k in info.keys])
    err = ((torch.from_numpy(ours) - x).norm() / x.norm()).item()
    assert err < {"float16": 1e-3, "bfloat16": 5e-3, "int8": 2e-2, "float8_e4m3": 6e-2}[dtype], err
    assert info.codec.row_bytes == {"float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3": 1}[dtype] * T * D + \
        (4 * T if dtype in ("int8", "float8_e4m3") else 0)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_each_rows_checksum_is_xxh3_64_of_its_stored_bytes_as_the_xxhash_library_computes_it(tmp_path, dtype):
    fake_shards(tmp_path, [[f"img{i}.jpg" for i in range(5)]], dtype)
    with h5py.File(cache.shard_path(tmp_path, 0), "r") as f:  # plain h5py: the documented layout
        assert f.attrs["checksum"] == "xxh3_64" and f["checksums"].dtype == np.uint64
        stored = [f["embeddings"][i].tobytes() + (f["scales"][i].tobytes() if "scales" in f else b"") for i in range(5)]
        assert f["checksums"][...].tolist() == [xxhash.xxh3_64_intdigest(b) for b in stored]


def test_a_shard_with_crc32_checksums_reads_the_rows_it_holds_and_verifies(tmp_path):
    written = fake_shards(tmp_path, [["a", "b", "c"], ["d", "e"]], "int8", crc32=[1])  # a resumed embed: both
    cache.finalize(tmp_path, [3, 2], {"fingerprint_id": "fp"})
    index = cache.build_index(tmp_path, cache.load_manifest(tmp_path))
    assert [s.checksum for s in index.shards] == ["xxh3_64", "crc32"] and cache.verify(tmp_path) == []
    reader = index.reader(mapped=False)
    rows = np.empty((5, index.codec.row_bytes), np.uint8)
    reader.read(np.array([1, 0, 1, 0, 0]), np.array([1, 0, 0, 2, 1]), rows)
    reader.close()
    x = torch.stack([written[k] for k in "eadcb"])
    assert (index.codec.decode(torch.from_numpy(rows)) - x).norm() / x.norm() < 2e-2


def test_an_unknown_row_checksum_is_refused_naming_the_shard(tmp_path):
    fake_shards(tmp_path, [["a", "b"]])
    path = cache.shard_path(tmp_path, 0)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = "sha1"
    with pytest.raises(ValueError, match=r"shard-00000.h5: row checksum 'sha1' is not one this minivlm knows "
                                         r"\(xxh3_64, crc32\); update minivlm"):
        shard.read_info(path)


def test_a_shard_replaced_after_its_header_was_read_is_refused_naming_it(tmp_path):
    fake_shards(tmp_path, [["a", "b"]], crc32=[0])
    info = shard.read_info(cache.shard_path(tmp_path, 0))
    reader = shard.RowReader([info], mapped=False)
    assert shard.upgrade_shard(info.path)  # as `embed.py --upgrade` under a running job
    with pytest.raises(ValueError, match=r"shard-00000.h5 was replaced after this run read its header"):
        reader.read(np.array([0]), np.array([1]), np.empty((1, info.codec.row_bytes), np.uint8))


def test_mapped_and_pread_reads_give_the_same_rows_and_zeros_for_text_only(tmp_path):
    fake_shards(tmp_path, [["a", "b", "c"], ["d", "e"]], "int8")
    infos = [shard.read_info(cache.shard_path(tmp_path, i)) for i in range(2)]
    shard_ix, row_ix = np.array([1, -1, 0, 1, 0]), np.array([1, 0, 2, 0, 0])
    got = []
    for mapped in (True, False):
        reader = shard.RowReader(infos, mapped=mapped)
        out = np.full((5, infos[0].codec.row_bytes), 7, np.uint8)
        reader.read(shard_ix, row_ix, out)
        reader.close()
        got.append(out)
    assert np.array_equal(*got) and not got[0][1].any() and got[0][0].any()


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("checksum", ["xxh3_64", "crc32"])
def test_a_flipped_byte_in_row_r_is_named_by_verify_and_stops_the_reader(tmp_path, mapped, checksum):
    plan = cache.plan_shards([f"img{i}.jpg" for i in range(6)], 3)
    fake_shards(tmp_path, plan, crc32=[1] if checksum == "crc32" else [0])  # the other shard: the other algorithm
    cache.finalize(tmp_path, [3, 3], {"fingerprint_id": "fp"})
    assert cache.verify(tmp_path) == []
    info = shard.read_info(cache.shard_path(tmp_path, 1), keys=True)
    data = bytearray(info.path.read_bytes())
    data[info.values_at + 2 * info.codec.values_bytes + 5] ^= 0x10  # one bit inside row 2
    info.path.write_bytes(bytes(data))
    line = f"{info.path}: row 2 (image img5.jpg) fails its {checksum} checksum"
    problems = cache.verify(tmp_path)
    assert any(p.startswith(line) for p in problems) and all("shard-00001.h5" in p for p in problems), problems
    reader = cache.build_index(tmp_path, cache.load_manifest(tmp_path)).reader(mapped)
    out = np.empty((2, info.codec.row_bytes), np.uint8)
    reader.read(np.array([1, 1]), np.array([1, 0]), out)  # the good rows of that shard read fine
    with pytest.raises(RunFailed, match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        reader.read(np.array([0, 1]), np.array([0, 2]), out)


def test_the_manifest_waits_for_every_shard_and_the_index_finds_each_key(tmp_path):
    plan = cache.plan_shards([f"img{i}.jpg" for i in range(6)], 2)
    fake_shards(tmp_path, plan[:2])
    assert cache.finalize(tmp_path, [2, 2, 2], {"fingerprint_id": "fp"}) is None  # shard 2 not published yet
    fake_shards(tmp_path, plan)
    manifest = cache.finalize(tmp_path, [2, 2, 2], {"fingerprint_id": "fp"})
    assert manifest["counts"] == {"images": 6, "embedded": 6, "failed": 0}
    assert (manifest["tokens"], manifest["width"], manifest["dtype"]) == (T, D, "float16")
    assert json.loads((tmp_path / cache.MANIFEST).read_text()) == manifest and cache.verify(tmp_path) == []
    assert cache.build_index(tmp_path, manifest).locations["img3.jpg"] == (1, 1)


LAYOUT = np.array([[3, 1, 2, 40, 90], [1, 1, 1, 8, 8], [5, 2, 2, 70, 60]])  # tile count, grid, height, width


def tiled_cache(cache_dir) -> torch.Tensor:
    """Shard 0: images a, b, c of 3, 1 and 5 tiles (LAYOUT); shard 1: d and e, one row and grid (1, 1) each.
    Returns shard 0's 9 rows of features."""
    codec, x = shard.Codec("float16", T, D), features(9)
    shards = ((["a", "b", "c"], x, LAYOUT), (["d", "e"], features(2, 1), np.array([[1, 1, 1, 8, 8]] * 2)))
    for i, (keys, rows, layout) in enumerate(shards):
        shard.write_shard(cache.shard_path(cache_dir, i), codec.encode(rows).numpy(), codec, keys, shard_index=i,
                          plan=cache.plan_hash(keys), tiles=layout, **META)
    cache.finalize(cache_dir, [3, 2], {"fingerprint_id": "fp", "encoder": {"fingerprint": {"tiles": "anyres"}}})
    return x


def test_a_tiled_shard_holds_each_images_tiles_as_consecutive_rows_as_plain_h5py_reads_them(tmp_path):
    x, by_h5py = tiled_cache(tmp_path), {}
    for i in range(2):  # the layout written in shard.py's docstring, read with plain h5py
        with h5py.File(cache.shard_path(tmp_path, i), "r") as f:
            counts = f["tiles"][:, 0] if "tiles" in f else np.ones(len(f["keys"]), int)  # absent: one row each
            by_h5py.update((k.decode(), f["embeddings"][start:start + n])
                           for k, start, n in zip(f["keys"], np.cumsum([0, *counts[:-1]]), counts))
            if i == 0:
                assert f["embeddings"].shape == (9, T, D) and np.array_equal(f["tiles"][...], LAYOUT)
            else:  # untiled images: the layout of a cache before tiles
                assert set(f) == {"embeddings", "checksums", "keys"}
    assert list(by_h5py) == ["a", "b", "c", "d", "e"]
    manifest = cache.load_manifest(tmp_path)
    assert manifest["counts"] == {"images": 5, "embedded": 5, "failed": 0, "tiles": 11} and cache.verify(tmp_path) == []
    index = cache.build_index(tmp_path, manifest)
    assert index.tiled and index.locations == {"a": (0, 0), "b": (0, 3), "c": (0, 4), "d": (1, 0), "e": (1, 1)}
    assert index.image_tiles(np.array([0, 0, 0, 1, -1]), np.array([0, 3, 4, 1, 0])).tolist() == \
        [*LAYOUT.tolist(), [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]  # an untiled shard keeps no sizes
    with pytest.raises(ValueError, match="not the first row of an image"):
        index.image_tiles(np.array([0]), np.array([1]))
    shards, rows = index.rows(["c", "a", "e"])
    assert shards.tolist() == [0] * 8 + [1] and rows.tolist() == [4, 5, 6, 7, 8, 0, 1, 2, 1]
    out = np.empty((len(rows), index.codec.row_bytes), np.uint8)
    index.reader(mapped=False).read(shards, rows, out)
    got = index.codec.decode(torch.from_numpy(out))
    assert torch.equal(got, torch.from_numpy(np.concatenate([by_h5py["c"], by_h5py["a"], by_h5py["e"]])))
    assert torch.equal(got[:8], torch.cat([x[4:], x[:3]]).half())


def test_a_flipped_byte_in_a_tile_names_the_image_it_belongs_to(tmp_path):
    tiled_cache(tmp_path)
    info = shard.read_info(cache.shard_path(tmp_path, 0))
    data = bytearray(info.path.read_bytes())
    data[info.values_at + 6 * info.codec.values_bytes + 3] ^= 0x10  # row 6: image c's third tile
    info.path.write_bytes(bytes(data))
    line = f"{info.path}: row 6 (image c) fails its xxh3_64 checksum"
    assert any(p.startswith(line) for p in cache.verify(tmp_path))
    reader = cache.build_index(tmp_path, cache.load_manifest(tmp_path)).reader(mapped=False)
    with pytest.raises(RunFailed, match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        reader.read(np.array([0]), np.array([6]), np.empty((1, info.codec.row_bytes), np.uint8))


def test_chunked_or_filtered_embeddings_are_refused_naming_the_shard(tmp_path):
    fake_shards(tmp_path, [["a", "b"]])
    path = cache.shard_path(tmp_path, 0)
    with h5py.File(path, "r+") as f:
        emb = f["embeddings"][...]
        del f["embeddings"]
        f.create_dataset("embeddings", data=emb, chunks=(1, T, D), compression="gzip")
    with pytest.raises(ValueError, match="shard-00000.h5: embeddings is not stored as contiguous float16"):
        shard.read_info(path)


# --- the upgrades: format 1, and CRC-32 row checksums ---------------------------------------------------

def write_format1(path, rows: np.ndarray, keys, attrs: dict) -> None:
    """A shard as minivlm wrote it before format 2 (cache.write_shard of 2026-11): one fletcher32 chunk per
    float16 row, the encoder's fingerprint JSON under `encoder` and its id under `fingerprint`."""
    n = len(rows)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("embeddings", shape=rows.shape, dtype="float16", chunks=(1, *rows.shape[1:]) if n else None,
                              fletcher32=bool(n))
        if n:
            ds[...] = rows
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(format_version=1, fingerprint=attrs["fingerprint_id"], encoder=attrs["fingerprint"],
                       shard_index=attrs["shard_index"], plan=attrs["plan"], n_rows=n, tokens=rows.shape[1],
                       width=rows.shape[2], failures=json.dumps(attrs["failures"]), complete=True)


def downgrade(cache_dir) -> None:
    """Turn a format-2 float16 cache into the format-1 cache the code before format 2 wrote for the same images."""
    m = json.loads((cache_dir / cache.MANIFEST).read_text())
    for entry in m["shards"]:
        info = shard.read_info(cache.shard_dir(cache_dir) / entry["file"], keys=True)
        reader = shard.RowReader([info], mapped=False)
        rows = np.empty((info.n_rows, info.codec.row_bytes), np.uint8)
        reader.read(np.zeros(info.n_rows, np.int64), np.arange(info.n_rows), rows)
        reader.close()
        emb = rows.view(np.float16).reshape(info.n_rows, info.codec.tokens, info.codec.width)
        write_format1(info.path, emb, info.keys, info.attrs)
        entry["sha256"] = "format-1 bytes"
    v1 = {k: v for k, v in m.items() if k != "fingerprint_id"}
    v1.update(format_version=1, encoder={k: v for k, v in m["encoder"].items() if k != "fingerprint"},
              fingerprint=m["fingerprint_id"], fingerprint_fields=m["encoder"]["fingerprint"])
    (cache_dir / cache.MANIFEST).write_text(json.dumps(v1))


def test_upgrade_rewrites_a_format1_cache_into_the_bytes_a_fresh_format2_cache_has(demo_cache, tmp_path):
    old = tmp_path / "cache"
    shutil.copytree(demo_cache, old, ignore=shutil.ignore_patterns("samples"))
    downgrade(old)
    with pytest.raises(ValueError, match=r"is in format 1 .*stages/embed.py --config <config> --upgrade"):
        cache.load_manifest(old)
    assert cache.upgrade(old) == len(cache.load_manifest(demo_cache)["shards"])
    fresh, upgraded = cache.load_manifest(demo_cache), cache.load_manifest(old)
    assert upgraded["shards"] == fresh["shards"]  # every shard file bitwise the fresh one (sha256)
    assert {k: v for k, v in upgraded.items() if k != "written_at"} == {k: v for k, v in fresh.items() if k != "written_at"}
    assert cache.upgrade(old) == 0 and cache.verify(old) == []


def test_a_corrupt_format1_row_stops_the_upgrade_naming_it(tmp_path):
    rows = features(3).numpy().astype(np.float16)
    path = cache.shard_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    write_format1(path, rows, ["a", "b", "c"], dict(fingerprint_id="fp", fingerprint="{}", shard_index=0, plan="p",
                                                     failures=[]))
    data = bytearray(path.read_bytes())
    at = data.index(rows[1].tobytes())
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000.h5: row 1 \(image b\) fails its fletcher32 checksum"):
        cache.upgrade(tmp_path)
    assert path.read_bytes() == bytes(data), "the corrupt shard was replaced"


def test_upgrade_rewrites_a_crc32_cache_into_the_bytes_a_fresh_cache_has_also_after_a_kill(demo_cache, tmp_path):
    old = tmp_path / "cache"
    shutil.copytree(demo_cache, old, ignore=shutil.ignore_patterns("samples"))
    crc32_cache(old)
    os.utime(old / cache.MANIFEST, ns=(0, 0))  # written by the embed run, long before the upgrade
    fresh = cache.load_manifest(demo_cache)
    assert cache.load_manifest(old)["shards"] != fresh["shards"] and cache.verify(old) == []
    shards = sorted(cache.shard_dir(old).glob("shard-*.h5"))
    assert shard.upgrade_shard(shards[0])  # a first run killed after one shard, before the manifest
    assert cache.upgrade(old) == len(shards) - 1
    upgraded = cache.load_manifest(old)
    assert upgraded["shards"] == fresh["shards"]  # every shard file bitwise the fresh one (sha256)
    assert {k: v for k, v in upgraded.items() if k != "written_at"} == {k: v for k, v in fresh.items() if k != "written_at"}
    assert cache.upgrade(old) == 0 and cache.load_manifest(old) == upgraded and cache.verify(old) == []


def test_upgrade_killed_after_its_last_shard_writes_the_manifest_on_the_rerun(demo_cache, tmp_path):
    old = tmp_path / "cache"
    shutil.copytree(demo_cache, old, ignore=shutil.ignore_patterns("samples"))
    crc32_cache(old)
    os.utime(old / cache.MANIFEST, ns=(0, 0))
    for p in cache.shard_dir(old).glob("shard-*.h5"):
        shard.upgrade_shard(p)
    assert cache.upgrade(old) == 0
    assert cache.load_manifest(old)["shards"] == cache.load_manifest(demo_cache)["shards"] and cache.verify(old) == []


def test_a_corrupt_crc32_row_stops_the_upgrade_naming_it(tmp_path):
    fake_shards(tmp_path, [["a", "b", "c"]], crc32=[0])
    info = shard.read_info(cache.shard_path(tmp_path, 0))
    data = bytearray(info.path.read_bytes())
    data[info.values_at + info.codec.values_bytes + 3] ^= 0x40  # inside row 1
    info.path.write_bytes(bytes(data))
    with pytest.raises(RunFailed, match=r"shard-00000.h5: row 1 \(image b\) fails its crc32 checksum"):
        cache.upgrade(tmp_path)
    assert info.path.read_bytes() == bytes(data), "the corrupt shard was replaced"


def test_compare_reports_the_codec_error_of_one_cache_against_another(tmp_path):
    plan = [[f"img{i}.jpg" for i in range(8)]]
    for name, dtype in (("a", "float16"), ("b", "int8")):
        fake_shards(tmp_path / name, plan, dtype)
        cache.finalize(tmp_path / name, [8], {"fingerprint_id": name, "encoder": {"fingerprint": {"storage_dtype": dtype}}})
    same = cache.compare(tmp_path / "a", tmp_path / "a")
    assert same["relative_rms"]["max"] == 0 and same["cosine"]["mean"] == pytest.approx(1, abs=1e-6)
    r = cache.compare(tmp_path / "a", tmp_path / "b")
    assert r["rows"] == 8 and r["fingerprint_differs"] == ["storage_dtype"] and r["bytes_per_row"] == [24, 24]
    assert 0 < r["relative_rms"]["mean"] < 0.02 and r["cosine"]["median"] > 0.999 and 0 < r["max_abs"]["max"] < 0.1


def test_compare_reads_every_tile_and_refuses_caches_of_other_tiles(tmp_path):
    tiled_cache(tmp_path / "a")
    tiled_cache(tmp_path / "b")
    r = cache.compare(tmp_path / "a", tmp_path / "b")
    assert (r["images"], r["rows"], r["relative_rms"]["max"]) == (5, 11, 0)
    fake_shards(tmp_path / "c", [["a", "b", "c"], ["d", "e"]])  # the same keys, one row each
    cache.finalize(tmp_path / "c", [3, 2], {"fingerprint_id": "fp", "encoder": {"fingerprint": {}}})
    with pytest.raises(ValueError, match="cut images into other tiles .*only caches of the same tiles compare"):
        cache.compare(tmp_path / "a", tmp_path / "c")
