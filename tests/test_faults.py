"""Hostile conditions: kill -9 at random moments, a full disk under each stage, garbage in a shard, and
user files that are not what they claim. Each ends in a rerun that resumes, or one line naming the file."""
import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, demo_config, demo_overrides, run_stage, train_config
from faults import kill_at_random, small_disk
from minivlm.cli import USER_ERRORS
from minivlm.config import RunFailed, load_config, to_toml, to_tree
from minivlm.dist import Dist
from minivlm.embedding import cache, shard
from minivlm.embedding.embed import run_embed
from minivlm.fileio import DiskFull, WriterLock, append_text, atomic_write, writing
from minivlm.formats.records import load_records
from minivlm.training import checkpoint
from minivlm.training.trainer import fit

# --- the embed lock ----------------------------------------------------------------------------------

HOLDER = """
import multiprocessing as mp, sys, time
from pathlib import Path
from minivlm.fileio import WriterLock
lock = WriterLock(Path(sys.argv[1]), shared=False)
child = mp.get_context(sys.argv[2]).Process(target=time.sleep, args=(60,))  # a worker that outlives us
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_dead_lock_holder_never_blocks_a_rerun_even_while_its_children_live(tmp_path, start_method):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), start_method], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunFailed, match=rf"being written by another process \(pid {holder.pid}\).*kill {holder.pid}"):
            WriterLock(tmp_path, shared=False)  # held while its holder lives
        assert WriterLock.holder(tmp_path) == holder.pid
        holder.kill()
        holder.wait()
        assert subprocess.run(["kill", "-0", str(child)]).returncode == 0, "the child should still be alive"
        assert WriterLock.holder(tmp_path) is None
        WriterLock(tmp_path, shared=False).release()
    finally:
        holder.kill()
        subprocess.run(["kill", "-9", str(child)], capture_output=True)


@pytest.mark.slow
def test_twenty_kill9_then_rerun_of_embed_all_accepted_and_the_cache_is_bitwise_the_same(demo, tmp_path):
    over = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path), "cache.shard_size=4",
            "encoder.batch_size=4", "encoder.num_workers=2"]  # forked workers that outlive a killed parent
    t0 = time.time()
    ref = run_stage("embed.py", *over[:-1], "encoder.num_workers=0", f"cache.dir={tmp_path}/ref")
    within = time.time() - t0
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(14)
    for trial in range(20):
        out = kill_at_random("embed.py", over, rng, within)
        assert out.returncode in (0, -9) and "being written by another process" not in out.stderr, (trial, out.stderr[-1000:])
    final = run_stage("embed.py", *over)
    assert final.returncode == 0, final.stderr
    assert_same_cache(tmp_path / "cache", tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_to_embed_publishes_whole_shards_only_in_one_line_and_the_rerun_is_bitwise_the_same(
        demo, demo_cache, tmp_path):
    """`kill PID` reaches the main process; a scheduler's SIGTERM reaches its DataLoader workers too."""
    over = [*demo_overrides(demo, tmp_path), "encoder.num_workers=2"]  # the demo_cache's plan, read by workers
    shards = cache.shard_dir(tmp_path / "cache")
    for kill in (os.kill, os.killpg):
        before = len(list(shards.glob("*.h5")))
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, str(REPO / "stages/embed.py"), *over], cwd=REPO, stderr=err,
                                    stdout=subprocess.DEVNULL, start_new_session=True)
            deadline = time.time() + 120
            while len(list(shards.glob("*.h5"))) <= before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            kill(proc.pid, signal.SIGTERM)
            assert proc.wait(60) == 128 + signal.SIGTERM, "finished before the signal"
            err.seek(0)
            assert err.read() == ("embed: stopped by SIGTERM; the shards published so far are kept, the ones in "
                                  "flight were dropped; rerun the same command to resume\n"), kill
        published = sorted(shards.glob("*"))
        assert before < len(published) < 12 and all(p.suffix == ".h5" for p in published)
        for path in published:
            shard.read_info(path)  # each one complete
    r = run_stage("embed.py", *over)
    assert r.returncode == 0, r.stderr
    assert_same_cache(tmp_path / "cache", demo_cache)


def assert_same_cache(a, b):
    ma, mb = cache.load_manifest(a), cache.load_manifest(b)
    assert ma["shards"] == mb["shards"] and ma["counts"] == mb["counts"]  # per-shard sha256 of the file bytes
    assert (a / cache.FAILURES).read_bytes() == (b / cache.FAILURES).read_bytes()
    assert not list(a.rglob("*.tmp"))


# --- a full disk ------------------------------------------------------------------------------------

def assert_one_disk_full_line(r, under):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: {under}") and "disk full" in lines[0] and "rerun" in lines[0], lines[0]
    assert not list(under.rglob("*.tmp")), "a temp file was left behind"


def test_running_out_of_space_mid_write_is_disk_full_naming_the_file(tmp_path):
    """Writers that report ENOSPC, or lose the errno as torch's zip writer does, both become DiskFull."""
    with small_disk(tmp_path / "disk", 1 << 20):
        target = tmp_path / "disk" / "big.bin"
        with pytest.raises(DiskFull, match=f"{target}: disk full"):
            atomic_write(target, lambda p: p.write_bytes(bytes(2 << 20)))
        with pytest.raises(DiskFull, match="train_state.pt: disk full"):
            with writing(tmp_path / "disk" / "train_state.pt"):
                torch.save({"t": torch.zeros(1 << 19)}, tmp_path / "disk" / "train_state.pt")
        (tmp_path / "disk" / "train_state.pt").unlink()
        assert list((tmp_path / "disk").iterdir()) == []
        log = tmp_path / "disk" / "metrics.jsonl"
        append_text(log, '{"step": 1}\n')
        with pytest.raises(DiskFull, match="metrics.jsonl"):
            append_text(log, "x" * (2 << 20))
        assert log.read_text() == '{"step": 1}\n'  # cut back: never half a line


def test_a_write_of_known_size_is_refused_up_front(tmp_path):
    with small_disk(tmp_path / "disk", 1 << 20):
        with pytest.raises(DiskFull, match=r"needed 4\.2 MB, .* free"):
            atomic_write(tmp_path / "disk" / "x", lambda p: pytest.fail("must not start"), needed=4_200_000)


def test_enospc_from_any_writer_is_disk_full_and_leaves_no_temp(tmp_path):
    def full(p):
        p.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFull, match="x.json: disk full"):
        atomic_write(tmp_path / "x.json", full)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_disk_during_embed_is_one_line_then_the_rerun_completes_bitwise(demo, tmp_path):
    over = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path), "cache.shard_size=16"]
    ref = run_stage("embed.py", *over, f"cache.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr
    with small_disk(tmp_path / "disk", 256 << 10) as disk:  # room for about half the shards
        r = run_stage("embed.py", *over, f"cache.dir={disk.path}/cache")
        assert_one_disk_full_line(r, disk.path / "cache")
        assert len(list(cache.shard_dir(disk.path / "cache").glob("*.h5"))) > 0
        disk.resize(16 << 20)
        r = run_stage("embed.py", *over, f"cache.dir={disk.path}/cache")
        assert r.returncode == 0, r.stderr
        assert_same_cache(disk.path / "cache", tmp_path / "ref")


@pytest.mark.slow
def test_full_disk_during_train_is_one_line_then_the_rerun_completes_bitwise(demo, demo_cache, tmp_path):
    tiny = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16",
            "train.batch_size=8", "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=1",
            "train.max_steps=6", "train.save_interval=2", "train.keep_checkpoints=1", "train.deterministic=true",
            "train.freeze_llm=0"]
    over = [*demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", *tiny]
    ref = run_stage("train.py", *over, "train.run_name=ref")
    assert ref.returncode == 0, ref.stderr
    ckpt = checkpoint.checkpoints(tmp_path / "runs" / "ref")[-1]
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())
    with small_disk(tmp_path / "disk", int(1.6 * ckpt_bytes) + (64 << 10)) as disk:  # one checkpoint fits, not two
        args = [*over, f"train.out_dir={disk.path}", "train.run_name=full"]
        r = run_stage("train.py", *args)
        assert_one_disk_full_line(r, disk.path / "full")
        assert [p.name for p in checkpoint.checkpoints(disk.path / "full")] == ["step-0000002"]
        disk.resize(64 << 20)
        r = run_stage("train.py", *args)
        assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
        assert (disk.path / "full/model.safetensors").read_bytes() == \
            (tmp_path / "runs/ref/model.safetensors").read_bytes()


# --- kill -9 at random moments: train and sweep -------------------------------------------------------

@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_to_bitwise_the_same_weights(demo, demo_cache, tmp_path):
    over = [*demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", "model.dim=32", "model.n_layer=2",
            "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16", "train.batch_size=8",
            "train.eval_batches=2", "train.eval_interval=3", "train.max_steps=12", "train.save_interval=2",
            "train.deterministic=true", "train.freeze_llm=0"]
    t0 = time.time()
    assert run_stage("train.py", *over, "train.run_name=ref").returncode == 0
    within = time.time() - t0
    rng = random.Random(12)
    for trial in range(3):
        out = kill_at_random("train.py", [*over, "train.run_name=killed"], rng, within)
        assert out.returncode in (0, -9), (trial, out.stderr[-2000:])
    r = run_stage("train.py", *over, "train.run_name=killed")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = tmp_path / "runs"
    assert (runs / "killed/model.safetensors").read_bytes() == (runs / "ref/model.safetensors").read_bytes()
    assert not list((runs / "killed").rglob("*.tmp"))


@pytest.mark.slow
def test_sweep_killed_at_random_moments_reruns_to_a_complete_summary(demo, demo_cache, tmp_path):
    base = train_config(demo, demo_cache, tmp_path, "train.max_steps=6", "train.save_interval=2")
    (tmp_path / "base.toml").write_text(to_toml(to_tree(base)))
    (tmp_path / "s.toml").write_text('name = "s"\n[grid]\n"train.lr" = [1e-3, 2e-3]\n')
    args = ["--config", str(tmp_path / "base.toml"), "--sweep", str(tmp_path / "s.toml")]
    rng = random.Random(13)
    for trial in range(3):
        out = kill_at_random("sweep.py", args, rng, 40.0, group=True)
        assert out.returncode in (0, -9), (trial, out.stderr[-2000:])
        for run in ("lr=1e-3", "lr=2e-3"):  # a run of the killed sweep stops (a checkpoint first) before the next
            deadline = time.time() + 30
            while WriterLock.holder(tmp_path / "runs/s" / run) is not None and time.time() < deadline:
                time.sleep(0.05)
    r = run_stage("sweep.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "runs/s/summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["done", "done"]


# --- garbage in a shard -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_garbage_bytes_in_a_shard_train_finite_or_stop_with_one_line_and_verify_names_it(
        demo, demo_cache, tmp_path, seed):
    rng = np.random.default_rng(seed)
    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_cache, cache_dir, ignore=shutil.ignore_patterns("samples"))
    shards = sorted(cache.shard_dir(cache_dir).glob("*.h5"))
    target = shards[int(rng.integers(len(shards)))]
    data = bytearray(target.read_bytes())
    n = int(rng.integers(1, 64))
    lo = 0 if seed % 2 else len(data) // 2  # anywhere (headers, keys), or among the rows
    for i, b in zip(rng.integers(lo, len(data), n), rng.integers(0, 256, n)):
        data[int(i)] = int(b)
    target.write_bytes(bytes(data))

    problems = cache.verify(cache_dir)
    assert problems and all(target.name in p for p in problems), problems
    cfg = train_config(demo, cache_dir, tmp_path, "train.max_steps=4")
    try:
        final = fit(cfg, Dist())
    except USER_ERRORS as e:
        assert len(str(e).splitlines()) == 1 and str(cache_dir) in str(e), e
        return
    assert all(np.isfinite(v) for k, v in final.items() if isinstance(v, float)), final


# --- user files that are not what they claim ----------------------------------------------------------

def test_records_with_non_utf8_bytes_name_the_file_and_line(demo, tmp_path):
    recs = json.loads((demo / "train.json").read_text())[:4]
    lines = [json.dumps(r).encode() for r in recs]
    lines[2] = lines[2].replace(b'"value": "', b'"value": "caf\xe9 ', 1)
    (tmp_path / "r.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"r\.jsonl line 3: byte 0xe9 at column \d+ is not UTF-8"):
        load_records(tmp_path / "r.jsonl")
    r = run_stage("embed.py", *demo_overrides(demo, tmp_path), f"data.records={tmp_path}/r.jsonl")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "r.jsonl line 3" in r.stderr, r.stderr
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    assert len(load_records(tmp_path / "bom.json")) == 4  # a UTF-8 byte-order mark is fine


def _garble(path, data=b"\xff\xfe garbage \x00\x81{[\n"):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["config", "sweep", "manifest", "shard", "tokenizer", "checkpoint"])
def test_an_unreadable_user_file_is_one_line_naming_it(demo, demo_cache, tmp_path, kind):
    """Each kind of file a user hands over, filled with garbage: a one-line user error that names the file."""
    from minivlm.training.sweep import load_sweep
    from minivlm.training.trainer import load_data
    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_cache, cache_dir, ignore=shutil.ignore_patterns("samples"))
    cfg = train_config(demo, cache_dir, tmp_path)
    if kind == "config":
        bad, call = _garble(tmp_path / "c.toml"), lambda: load_config(tmp_path / "c.toml")
    elif kind == "sweep":
        bad, call = _garble(tmp_path / "s.toml", b'name = "ok"\n[grid]\n"train.lr" = [1e-3, \xff]\n'), \
            lambda: load_sweep(tmp_path / "s.toml")
    elif kind == "manifest":
        bad, call = _garble(cache_dir / cache.MANIFEST), lambda: load_data(cfg, Dist())
    elif kind == "shard":
        shard = cache.shard_path(cache_dir, 2)
        bad, call = _garble(shard, shard.read_bytes()[:4096]), lambda: load_data(cfg, Dist())
    elif kind == "checkpoint":
        cfg = train_config(demo, cache_dir, tmp_path, "train.max_steps=2", "train.save_interval=1")
        fit(cfg, Dist())
        (cfg.train.run_dir / "model.safetensors").unlink()  # unfinished, so the rerun restores the checkpoint
        bad, call = _garble(checkpoint.checkpoints(cfg.train.run_dir)[-1] / "train_state.pt"), lambda: fit(cfg, Dist())
    else:
        tok = tmp_path / "tok"
        shutil.copytree(demo / "tokenizer", tok)
        bad = _garble(tok / "tokenizer.json")
        call = lambda: load_data(train_config(demo, cache_dir, tmp_path, f"tokenizer.name_or_path={tok}"), Dist())  # noqa: E731
    with pytest.raises(USER_ERRORS) as e:
        call()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(bad if kind != "tokenizer" else bad.parent) in msg, msg


# --- the format-1 upgrade ------------------------------------------------------------------------------

@pytest.mark.slow
def test_upgrade_killed_midway_then_rerun_trains_to_the_weights_of_a_fresh_format2_cache(demo, tmp_path):
    from test_cache import downgrade
    fresh = demo_config(demo, tmp_path / "fresh", "cache.shard_size=2")  # ~100 shards: a kill lands midway
    run_embed(fresh, Dist())
    old = tmp_path / "old" / "cache"
    shutil.copytree(fresh.cache.dir, old, ignore=shutil.ignore_patterns("samples"))
    downgrade(old)
    first = cache.shard_path(old, 0)
    inode = first.stat().st_ino
    args = ["--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path / "old"), "--upgrade"]
    proc = subprocess.Popen([sys.executable, str(REPO / "stages/embed.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while first.stat().st_ino == inode and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert json.loads((old / cache.MANIFEST).read_text())["format_version"] == 1, "the upgrade ended before the kill"
    with pytest.raises(ValueError, match="format 1 .*--upgrade"):
        cache.load_manifest(old)
    r = run_stage("embed.py", *args)
    assert r.returncode == 0 and "upgrade:" in r.stdout, r.stderr
    assert_same_cache(old, Path(fresh.cache.dir))
    runs = {}
    for name, cache_dir in (("fresh", Path(fresh.cache.dir)), ("upgraded", old)):
        cfg = train_config(demo, cache_dir, tmp_path / name, "train.max_steps=2", "cache.shard_size=2")
        fit(cfg, Dist())
        runs[name] = (cfg.train.run_dir / "model.safetensors").read_bytes()
    assert runs["fresh"] == runs["upgraded"]
