"""A cache by URL through its machine-local mirror: the demo cache in a real S3 API on loopback (moto's server)
behind the proxy that counts what the server receives (tests/store.py). Skipped, saying why, without s3fs /
moto."""
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from faults import small_disk
from safetensors.torch import load_file
from store import StoreProxy, free_port, moto_s3

from conftest import REPO, demo_config, demo_overrides, run_stage, train_config, write_crc32_shard
from minivlm.dist import Dist
from minivlm.embedding import cache, mirror
from minivlm.fileio import DiskFull
from minivlm.formats import remote
from minivlm.training.trainer import fit
from minivlm.use.evaluation import evaluate_run

BUCKET = "minivlm-mirror"  # moto keeps its buckets per process: not test_remote.py's
TINY = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16",
        "train.batch_size=8", "train.eval_batches=2", "train.log_interval=1", "train.eval_interval=0",
        "train.save_interval=0", "train.max_steps=3", "train.deterministic=true"]


@contextlib.contextmanager
def new_process():
    """What a new process starts with: no remote metadata asked, no mirror brought up to date, no s3fs listing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "_INFO", {})
        mp.setattr(mirror, "_SYNCED", {})
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        yield


@pytest.fixture(autouse=True)
def each_test_a_new_process():
    pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'minivlm[remote]'")
    with new_process():
        yield


@pytest.fixture(scope="module")
def s3(demo_cache):
    """moto's S3 server on a free loopback port, the demo cache uploaded under demo/; yields (port, s3fs)."""
    s3fs = pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'minivlm[remote]'")
    pytest.importorskip("moto.server", reason="S3 tests need moto's server: pip install 'moto[server]'")
    with moto_s3() as port:
        fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}")
        fs.mkdir(BUCKET)
        upload(fs, demo_cache, "demo")
        yield port, fs


@pytest.fixture(scope="module")
def store(s3):
    proxy = StoreProxy(s3[0])
    yield proxy
    proxy.close()


def upload(fs, local: Path, prefix: str) -> None:
    """A local cache's manifest, failures and shards under s3://BUCKET/prefix/ (plain s3fs)."""
    for name in ["manifest.json", "failures.jsonl", *(f"shards/{p.name}" for p in (local / "shards").glob("*.h5"))]:
        fs.put_file(str(local / name), f"{BUCKET}/{prefix}/{name}")


def url_overrides(store: StoreProxy, prefix: str, mirror_dir: Path) -> list[str]:
    return [f"cache.dir=s3://{BUCKET}/{prefix}", f"cache.mirror={mirror_dir}",
            f'cache.storage_options={{endpoint_url = "http://127.0.0.1:{store.port}"}}']


def shard_gets(store: StoreProxy, prefix: str) -> dict[str, int]:
    return {k.rsplit("/", 1)[1]: n for (m, k), n in store.requests.items()
            if m == "GET" and k.startswith(f"{BUCKET}/{prefix}/shards/")}


def shard_names(cache_dir: Path) -> list[str]:
    return sorted(s["file"] for s in json.loads((cache_dir / "manifest.json").read_text())["shards"])


def test_a_fresh_mirror_gets_each_shard_once_and_a_later_run_only_asks_the_manifest_s_identity(
        demo, demo_cache, store, tmp_path):
    cfg = demo_config(demo, tmp_path, *url_overrides(store, "demo", tmp_path / "mirror"))
    store.reset()
    local = mirror.local(cfg)
    assert shard_gets(store, "demo") == dict.fromkeys(shard_names(demo_cache), 1)
    assert (local / "manifest.json").read_bytes() == (demo_cache / "manifest.json").read_bytes()
    assert cache.verify(local) == []
    with new_process():
        store.reset()
        assert mirror.local(cfg) == local
        assert dict(store.requests) == {("HEAD", f"{BUCKET}/demo/manifest.json"): 1}
    other = demo_config(demo, tmp_path, *url_overrides(store, "other", tmp_path / "mirror"))
    with new_process(), pytest.raises(ValueError, match=f"mirror {local} holds a copy of cache s3://{BUCKET}/demo, "):
        mirror.local(other)


def test_a_byte_flipped_in_a_remote_shard_is_one_line_naming_shard_and_row_and_a_rerun_says_the_same(
        demo, demo_cache, s3, store, tmp_path):
    _, fs = s3
    bad = tmp_path / "bad"
    for name in ["manifest.json", "failures.jsonl", *(f"shards/{n}" for n in shard_names(demo_cache))]:
        (bad / name).parent.mkdir(parents=True, exist_ok=True)
        (bad / name).write_bytes((demo_cache / name).read_bytes())
    target = bad / "shards" / "shard-00001.h5"
    with h5py.File(target, "r") as f:
        row_bytes = f["embeddings"][0].nbytes
        at = f["embeddings"].id.get_offset() + 3 * row_bytes + 5  # a byte inside row 3
    data = bytearray(target.read_bytes())
    data[at] ^= 0xFF
    target.write_bytes(bytes(data))
    upload(fs, bad, "corrupt")
    cfg = demo_config(demo, tmp_path, *url_overrides(store, "corrupt", tmp_path / "mirror"))
    said = []
    for _ in range(2):
        with new_process(), pytest.raises(ValueError) as e:
            mirror.local(cfg)
        said.append(str(e.value))
        assert not (tmp_path / "mirror" / "shards" / "shard-00001.h5").exists()
        assert not list((tmp_path / "mirror").rglob("*.tmp")) and not (tmp_path / "mirror" / "manifest.json").exists()
    assert said[0] == said[1] and "\n" not in said[0], said
    assert said[0].startswith(f"s3://{BUCKET}/corrupt/shards/shard-00001.h5: row 3 (image "), said[0]


def test_a_remote_cache_embedded_again_is_noticed_and_the_copy_brought_up_to_date_never_mixed(
        demo, demo_cache, s3, store, tmp_path):
    _, fs = s3
    upload(fs, demo_cache, "changing")
    cfg = demo_config(demo, tmp_path, *url_overrides(store, "changing", tmp_path / "mirror"))
    mirror.local(cfg)
    # another embed: shard 2 rewritten (the same rows with crc32 checksums), the manifest with its sha256
    new = tmp_path / "new"
    (new / "shards").mkdir(parents=True)
    (new / "shards" / "shard-00002.h5").write_bytes((demo_cache / "shards" / "shard-00002.h5").read_bytes())
    write_crc32_shard(new / "shards" / "shard-00002.h5")
    manifest = json.loads((demo_cache / "manifest.json").read_text())
    manifest["shards"][2]["sha256"] = hashlib.sha256((new / "shards/shard-00002.h5").read_bytes()).hexdigest()
    fs.rm_file(f"{BUCKET}/changing/manifest.json")  # an embed under way: the store holds no manifest
    with new_process(), pytest.raises(ValueError, match=f"cache s3://{BUCKET}/changing is incomplete \\(no manifest"):
        mirror.local(cfg)
    fs.put_file(str(new / "shards" / "shard-00002.h5"), f"{BUCKET}/changing/shards/shard-00002.h5")
    fs.pipe_file(f"{BUCKET}/changing/sources/0123.npz", b"a stored join")  # copied as it is, for a run's start-up
    fs.pipe_file(f"{BUCKET}/changing/manifest.json", json.dumps(manifest).encode())
    with new_process():
        store.reset()
        local = mirror.local(cfg)
    assert shard_gets(store, "changing") == {"shard-00002.h5": 1}
    assert json.loads((local / "manifest.json").read_text()) == manifest
    assert cache.verify(local) == [] and (local / "sources" / "0123.npz").read_bytes() == b"a stored join"


def test_a_mirror_on_a_disk_too_small_is_one_line_with_the_bytes_needed_before_any_download(
        demo, demo_cache, store, tmp_path):
    needed = sum((demo_cache / "shards" / n).stat().st_size for n in shard_names(demo_cache))
    with small_disk(tmp_path / "disk", max(4096, needed // 2 // 4096 * 4096)):
        cfg = demo_config(demo, tmp_path, *url_overrides(store, "demo", tmp_path / "disk" / "mirror"))
        store.reset()
        with pytest.raises(DiskFull) as e:
            mirror.local(cfg)
        assert "\n" not in str(e.value) and f"need {needed} bytes" in str(e.value), str(e.value)
        assert shard_gets(store, "demo") == {}
        assert [p.name for p in (tmp_path / "disk" / "mirror").rglob("*") if p.is_file()] == [".mirror.lock"]


def test_an_unreachable_store_is_one_line_after_the_retries(demo, monkeypatch, tmp_path):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    cfg = demo_config(demo, tmp_path, f"cache.dir=s3://{BUCKET}/demo", f"cache.mirror={tmp_path}/mirror",
                      f'cache.storage_options={{endpoint_url = "http://127.0.0.1:{free_port()}", '
                      f'config_kwargs = {{retries = {{max_attempts = 1}}}}, retries = 1}}')
    with pytest.raises(remote.RemoteError) as e:
        mirror.local(cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"s3://{BUCKET}/demo/manifest.json: info failed "
                                                                 f"{remote.RETRIES} times"), str(e.value)


@pytest.mark.slow
def test_two_trainers_on_a_fresh_mirror_fetch_each_shard_once_and_end_bitwise_as_on_the_local_cache(
        demo, demo_cache, store, tmp_path, one_thread):
    fit(train_config(demo, demo_cache, tmp_path / "local", *TINY), Dist())
    over = [*demo_overrides(demo, tmp_path), *TINY, *url_overrides(store, "demo", tmp_path / "mirror")]
    store.reset()
    procs = [subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), *over, f"train.run_name=t{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert shard_gets(store, "demo") == dict.fromkeys(shard_names(demo_cache), 1)
    want = load_file(str(tmp_path / "local" / "runs" / "demo" / "model.safetensors"))
    for i in range(2):
        got = load_file(str(tmp_path / "runs" / f"t{i}" / "model.safetensors"))
        assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want), f"run t{i}"
    with new_process():  # a second run on the same mirror (evaluate reads the run's cache.dir): no GET for a shard
        store.reset()
        evaluate_run(tmp_path / "runs" / "t0", n=4)
    assert shard_gets(store, "demo") == {} and store.count("HEAD") == 1


@pytest.mark.slow
def test_embed_into_s3_gives_the_objects_of_a_local_embed_and_a_kill9_then_rerun_the_same(
        demo, demo_cache, s3, store, tmp_path):
    _, fs = s3
    over = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path),
            *url_overrides(store, "embedded", tmp_path / "m1")]
    store.reset()
    first = subprocess.Popen([sys.executable, str(REPO / "stages/embed.py"), *over], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while store.count("PUT", f"{BUCKET}/embedded/shards/") < 2 and first.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # mid-run: shards uploaded, others not yet
    assert first.wait(60) == -signal.SIGKILL
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/embedded/manifest.json")
    uploaded = fs.find(f"{BUCKET}/embedded/shards")
    assert len(uploaded) < len(shard_names(demo_cache))  # (a PUT the proxy counted may not have ended)
    for key in uploaded:  # each object there is a whole published shard
        assert fs.cat_file(key) == (demo_cache / "shards" / key.rsplit("/", 1)[1]).read_bytes(), key
    rerun = [*over[:-2], f"cache.mirror={tmp_path}/m2", over[-1]]  # another machine: resumes from the store
    r = run_stage("embed.py", *rerun)
    assert r.returncode == 0, r.stderr[-2000:]
    fs.invalidate_cache()
    keys = {k.split(f"{BUCKET}/embedded/", 1)[1] for k in fs.find(f"{BUCKET}/embedded")}
    assert keys == {"manifest.json", "failures.jsonl", *(f"shards/{n}" for n in shard_names(demo_cache))}
    for name in keys - {"manifest.json"}:
        assert fs.cat_file(f"{BUCKET}/embedded/{name}") == (demo_cache / name).read_bytes(), name
    got, want = (json.loads(b) for b in (fs.cat_file(f"{BUCKET}/embedded/manifest.json"),
                                         (demo_cache / "manifest.json").read_bytes()))
    assert {k: v for k, v in got.items() if k != "written_at"} == {k: v for k, v in want.items() if k != "written_at"}
