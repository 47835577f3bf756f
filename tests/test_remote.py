"""Sources by URL: a real S3 API on loopback (moto's server), a proxy in front of it that drops connections
mid-read, retries with backoff, the one line without the extra. Skipped, saying why, without s3fs / moto."""
import json
import socket
import sys
import threading

import pytest
from test_faults import assert_same_cache
from test_tars import _tar, tar_overrides, tar_set  # noqa: F401  (tar_set: the module's fixture)

from conftest import demo_config
from minivlm.config import RunFailed, load_config
from minivlm.demo.parquet import write_layout
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.embedding.embed import run_embed
from minivlm.formats import remote, sources, tars

BUCKET = "minivlm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of `port`: every `every`-th connection is closed once the server has
    sent `after` bytes on it, mid-answer (a flaky network, a load balancer cutting a stream)."""

    def __init__(self, port: int, every: int = 2, after: int = 6000):
        self.target, self.every, self.after = port, every, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            limit = self.after if self.connections % self.every == 0 else None
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, limit), daemon=True).start()

    def _pipe(self, src, dst, limit):
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[:limit - sent])
                    self.dropped += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


@pytest.fixture(scope="module")
def s3(demo, tar_set, tmp_path_factory):  # noqa: F811
    """moto's S3 server on a free loopback port, holding the demo's tars, a Parquet file and JSON + images."""
    s3fs = pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'minivlm[remote]'")
    server_mod = pytest.importorskip("moto.server", reason="S3 tests need moto's server: pip install 'moto[server]'")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(k, v)  # credentials from the usual environment
        port = free_port()
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}")
            fs.mkdir(BUCKET)
            parquet = write_layout(demo, "minimind", tmp_path_factory.mktemp("pq"), files=1, row_group_size=50)
            for split, paths in tar_set.items():
                fs.put([str(p) for p in paths], f"{BUCKET}/tars/{split}/")
            fs.put(str(parquet["val"][0]), f"{BUCKET}/parquet/{parquet['val'][0].name}")
            fs.put([str(demo / "train.json"), str(demo / "val.json")], f"{BUCKET}/demo/")
            fs.put(str(demo / "images"), f"{BUCKET}/demo/", recursive=True)
            yield port, parquet["val"][0]
        finally:
            server.stop()


def s3_overrides(tar_set, parquet, port: int) -> list[str]:  # noqa: F811
    train = tar_overrides(tar_set)[0].split("=", 1)[1]
    pattern = f"s3://{BUCKET}/tars/train/" + train.rsplit("/", 1)[1]
    return [f"data.records={pattern}", f"data.val_records=s3://{BUCKET}/parquet/{parquet.name}", "data.image_root=",
            f'data.storage_options={{endpoint_url = "http://127.0.0.1:{port}"}}']


@pytest.fixture(scope="module")
def local_ref(demo, tar_set, s3, tmp_path_factory):  # noqa: F811
    """The same tars (train) and Parquet file (val) embedded from local files."""
    _, parquet = s3
    work = tmp_path_factory.mktemp("local_ref")
    run_embed(demo_config(demo, work, *tar_overrides(tar_set)[:1], f"data.val_records={parquet}", "data.image_root="),
              Dist())
    return work / "cache"


def test_tars_and_parquet_under_s3_embed_to_the_same_cache_as_the_local_files(demo, tar_set, s3, local_ref,  # noqa: F811
                                                                              tmp_path):
    port, parquet = s3
    cfg = demo_config(demo, tmp_path, *s3_overrides(tar_set, parquet, port), "encoder.num_workers=2")
    m = run_embed(cfg, Dist())
    assert_same_cache(tmp_path / "cache", local_ref)
    assert m["records"][0].startswith(f"s3://{BUCKET}/tars/train/{{") and m["sources"][0]["file"].startswith("s3://")


def test_a_server_that_drops_connections_mid_read_still_ends_in_the_same_cache(demo, tar_set, s3, local_ref,  # noqa: F811
                                                                               tmp_path, monkeypatch):
    port, parquet = s3
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    monkeypatch.setattr(remote, "BLOCK", 64 << 10)  # many ranged reads: many chances to be cut
    proxy = DroppingProxy(port)
    try:
        cfg = demo_config(demo, tmp_path, *s3_overrides(tar_set, parquet, proxy.port))
        run_embed(cfg, Dist())
    finally:
        proxy.close()
    assert proxy.dropped >= 3, f"the proxy cut only {proxy.dropped} of {proxy.connections} connections"
    assert_same_cache(tmp_path / "cache", local_ref)


def test_json_records_and_an_image_root_under_s3_embed_to_the_folder_cache(demo, demo_cache, s3, tmp_path):
    port, _ = s3
    cfg = demo_config(demo, tmp_path, f"data.records=s3://{BUCKET}/demo/train.json",
                      f"data.val_records=s3://{BUCKET}/demo/val.json", f"data.image_root=s3://{BUCKET}/demo/images",
                      f'data.storage_options={{endpoint_url = "http://127.0.0.1:{port}"}}')
    run_embed(cfg, Dist())
    assert_same_cache(tmp_path / "cache", demo_cache)


# --- retries and one-line errors, on fsspec's in-memory filesystem ---------------------------------------------

@pytest.fixture
def memory_tar(demo, tmp_path):
    """memory://bucket/s.tar: samples a (image 0, "one"), b (image 1, "two"), then c0..c9 (images 2..11)."""
    fsspec = pytest.importorskip("fsspec", reason="URL tests need fsspec: pip install 'minivlm[remote]'")
    img = [p.read_bytes() for p in sorted((demo / "images" / "train").iterdir())[:12]]
    _tar(tmp_path / "s.tar", [("a.jpg", img[0]), ("a.txt", b"one"), ("b.jpg", img[1]), ("b.txt", b"two")]
         + [m for i in range(10) for m in ((f"c{i}.jpg", img[2 + i]), (f"c{i}.txt", b"more"))])
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/s.tar", (tmp_path / "s.tar").read_bytes())
    yield fs, img[1]
    fs.rm("/bucket", recursive=True)


def failing(monkeypatch, fs, method: str, times: int, when=lambda *a, **kw: True):
    """fs.method raises ConnectionResetError `times` times (where `when` holds), then reads as before."""
    real, left = getattr(type(fs), method), [times]

    def flaky(self, *a, **kw):
        if left[0] and when(*a, **kw):
            left[0] -= 1
            raise ConnectionResetError("Connection reset by peer")
        return real(self, *a, **kw)

    monkeypatch.setattr(type(fs), method, flaky)
    return left


def test_a_read_that_fails_is_retried_with_backoff_and_succeeds(memory_tar, monkeypatch, tmp_path):
    fs, _ = memory_tar
    waits = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    left = failing(monkeypatch, fs, "cat_file", remote.RETRIES - 1)
    recs = sources.read_records("memory://bucket/s.tar", load_config(None).data, tmp_path / "c")
    assert [r.turns[-1][1] for r in recs][:3] == ["one", "two", "more"] and left == [0]
    assert waits == [remote.BACKOFF_S * 2 ** i for i in range(remote.RETRIES - 1)]


def test_a_read_that_keeps_failing_at_load_stops_with_one_line_naming_the_url(memory_tar, monkeypatch, tmp_path):
    fs, _ = memory_tar
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    failing(monkeypatch, fs, "info", 100)
    with pytest.raises(remote.RemoteError, match=r"^memory://bucket/s\.tar: info failed 5 times, the last with "
                                                 r"ConnectionResetError \(Connection reset by peer\); check the network"):
        sources.read_records("memory://bucket/s.tar", load_config(None).data, tmp_path / "c")


def test_an_image_read_that_keeps_failing_stops_stage_1_naming_tar_member_and_url_and_a_rerun_resumes(
        demo, memory_tar, monkeypatch, tmp_path):
    fs, _ = memory_tar
    cfg = demo_config(demo, tmp_path, "data.records=memory://bucket/s.tar", "data.val_records=", "data.image_root=",
                      "cache.shard_size=2", "encoder.batch_size=2")
    sources.load([cfg.data.records], cfg.data, cfg.cache.dir)  # hashed: stage 1 now reads only for its workers
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    monkeypatch.setattr(remote, "BLOCK", 512)
    c0 = tars.index(remote.Url.of("memory://bucket/s.tar")).image_offset[2]
    failing(monkeypatch, fs, "cat_file", 10 ** 6, lambda path, start=None, end=None, **kw: start == c0)
    with pytest.raises(RunFailed, match=r"^memory://bucket/s\.tar member c0\.jpg: memory://bucket/s\.tar: read failed "
                                        r"5 times, the last with ConnectionResetError .*then rerun \(the published "
                                        r"shards are kept, the ones in flight dropped\)$") as e:
        run_embed(cfg, Dist())
    assert "\n" not in str(e.value) and not (tmp_path / "cache" / cache.FAILURES).exists()
    assert [p.name for p in cache.shard_dir(cfg.cache.dir).glob("*.h5")] == ["shard-00000.h5"]  # a and b
    monkeypatch.undo()  # the store answers again: the rerun completes the cache, nothing recorded as failed
    assert run_embed(cfg, Dist())["counts"] == {"images": 12, "embedded": 12, "failed": 0}


def test_an_image_refused_by_the_store_is_a_failure_naming_tar_and_member(demo, memory_tar, monkeypatch, tmp_path):
    fs, _ = memory_tar
    cfg = demo_config(demo, tmp_path, "data.records=memory://bucket/s.tar", "data.val_records=", "data.image_root=",
                      "cache.max_failure_frac=0.5")
    sources.load([cfg.data.records], cfg.data, cfg.cache.dir)
    monkeypatch.setattr(remote, "BLOCK", 512)
    b_jpg = tars.index(remote.Url.of("memory://bucket/s.tar")).image_offset[1]
    real = type(fs).cat_file

    def refuse(self, path, start=None, end=None, **kw):
        if start == b_jpg:
            raise PermissionError("Access Denied")
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(fs), "cat_file", refuse)
    m = run_embed(cfg, Dist())
    failure, = [json.loads(x) for x in (tmp_path / "cache" / cache.FAILURES).read_text().splitlines()]
    assert failure["source"] == "memory://bucket/s.tar member b.jpg"
    assert failure["reason"].startswith("memory://bucket/s.tar: PermissionError (Access Denied); check the URL")
    assert m["counts"] == {"images": 12, "embedded": 11, "failed": 1}


def test_a_url_without_the_remote_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec raises ImportError
    with pytest.raises(ValueError, match=r"^s3://b/x\.tar: reading URLs needs fsspec .*; pip install 'minivlm\[remote\]'$"):
        sources.expand("s3://b/x.tar")


def test_storage_options_is_a_toml_table_in_the_config_and_on_the_command_line(tmp_path):
    (tmp_path / "c.toml").write_text('[data]\nstorage_options = {endpoint_url = "http://127.0.0.1:9000", anon = true}\n')
    assert load_config(tmp_path / "c.toml").data.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True}
    cfg = load_config(None, ['data.storage_options={anon = true, client_kwargs = {region_name = "eu-west-1"}}'])
    assert cfg.data.storage_options == {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
    with pytest.raises(ValueError, match=r"data\.storage_options: expected an inline TOML table"):
        load_config(None, ["data.storage_options=anon"])
