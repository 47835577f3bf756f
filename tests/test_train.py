"""Stage 2 end to end: it learns from the images, resumes exactly, survives kills, runs under torchrun."""
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, crc32_cache, demo_overrides, mixed_records, run_stage, train_config
from minivlm.config import RunFailed, to_toml, to_tree
from minivlm.dist import Dist
from minivlm.embedding import shard
from minivlm.embedding.cache import verify
from minivlm.training import checkpoint
from minivlm.training.data import load_data, load_splits, open_cache
from minivlm.training.trainer import fit, lr_at

# 48 train records at batch 8 = 6 steps per epoch, so 2k = 8 steps crosses an epoch boundary.
RESUME = ("train.max_steps=8", "model.dropout=0.1", "train.deterministic=true", "train.lr=3e-3", "train.warmup_steps=2",
          "train.freeze_llm=0")


def small_records(demo, tmp_path, n=48):
    recs = json.loads((demo / "train.json").read_text())[:n]
    (tmp_path / "r48.json").write_text(json.dumps(recs))
    return f"data.records={tmp_path}/r48.json"


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from minivlm.config import TrainConfig
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 100, tc) == pytest.approx(0.1) and lr_at(9, 100, tc) == pytest.approx(1.0)
    assert lr_at(55, 100, tc) == pytest.approx(0.55) and lr_at(100, 100, tc) == pytest.approx(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["false", "true"], ids=["padded", "packed"])
def test_stop_mid_epoch_then_resume_gives_identical_weights(demo, demo_cache, tmp_path, monkeypatch, packing):
    """Also from a checkpoint of an earlier minivlm, whose cursor counted each rank's batches; packed, on samples of
    0, 1 and 2 images whose rows hold several samples."""
    rec = small_records(demo, tmp_path) if packing == "false" else mixed_records(demo, tmp_path / "m.json")
    straight = train_config(demo, demo_cache, tmp_path, rec, "train.run_name=straight", f"train.packing={packing}",
                            *RESUME)
    fit(straight, Dist())

    import minivlm.training.trainer as trainer
    real_step, calls = trainer.train_step, []

    def step_then_ctrl_c(*a, **kw):
        out = real_step(*a, **kw)
        calls.append(1)
        if len(calls) == 3:  # step 3 of 6 in epoch 0
            os.kill(os.getpid(), signal.SIGINT)
        return out

    stopped = train_config(demo, demo_cache, tmp_path, rec, "train.run_name=stopped", f"train.packing={packing}",
                           *RESUME)
    monkeypatch.setattr(trainer, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fit(stopped, Dist())
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert [p.name for p in checkpoint.checkpoints(stopped.train.run_dir)] == ["step-0000003"]
    # as minivlm wrote it before the global cursor: the micro-batches each rank had read, and the world size
    state_json = checkpoint.checkpoints(stopped.train.run_dir)[0] / "state.json"
    state = json.loads(state_json.read_text())
    assert (state["sample"], state["global_batch"]) == (3 * 8, 8)
    old = {k: v for k, v in state.items() if k not in ("sample", "batch_size", "grad_accum", "global_batch")}
    state_json.write_text(json.dumps({**old, "batch": 3}))
    fit(stopped, Dist())
    assert_same_weights(straight.train.run_dir, stopped.train.run_dir)
    steps = [json.loads(ln)["step"] for ln in (stopped.train.run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == list(range(1, 9))  # every step logged exactly once across the stop
    assert not torch.are_deterministic_algorithms_enabled()  # train.deterministic holds for the run only


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_gives_identical_weights(demo, demo_cache, tmp_path):
    """A packed run (samples of 0, 1 and 2 images, several a row) killed after a checkpoint resumes to the weights of
    a run that never stopped."""
    rec = mixed_records(demo, tmp_path / "m.json")
    over = [*demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", rec, *RESUME[:-1], "train.freeze_llm=0",
            "model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16",
            "train.batch_size=8", "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=1",
            "train.packing=true"]
    fit(train_config(demo, demo_cache, tmp_path, rec, "train.run_name=straight", "train.packing=true", *RESUME),
        Dist())
    killed = tmp_path / "runs" / "killed"
    args = [str(REPO / "stages/train.py"), *over, "train.run_name=killed", "train.save_interval=5"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.checkpoints(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint.checkpoints(killed)] == ["step-0000005"]
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout
    assert_same_weights(tmp_path / "runs" / "straight", killed)


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_second_writer_is_refused_and_sigterm_stops_at_a_step_with_a_checkpoint_then_resumes_bitwise(
        demo, demo_cache, tmp_path, one_thread):
    rec = small_records(demo, tmp_path)
    fit(train_config(demo, demo_cache, tmp_path, rec, "train.run_name=straight", *RESUME, "train.max_steps=80"), Dist())
    over = [*demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", rec, *RESUME, "train.max_steps=80",
            "model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16",
            "train.batch_size=8", "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=1",
            "train.save_interval=0", "train.run_name=run"]
    run_dir = tmp_path / "runs" / "run"
    with open(tmp_path / "stderr", "w") as err:
        first = subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), *over], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() or first.poll() is not None, "the first step")
        os.kill(first.pid, signal.SIGSTOP)  # mid-run, holding the lock, writing nothing while we look
        before = snapshot(run_dir)
        second = run_stage("train.py", *over)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: {run_dir} is being written by another process (pid {first.pid})")
        assert snapshot(run_dir) == before, "the refused run touched the first one's files"
        os.kill(first.pid, signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 128 + signal.SIGTERM
    finally:
        first.kill()
    saved = checkpoint.checkpoints(run_dir)[-1].name
    step = int(saved.split("-")[1])
    assert (tmp_path / "stderr").read_text() == (f"train: stopped at step {step} by SIGTERM; checkpoint {saved} saved; "
                                                 f"rerun the same command to resume\n")
    assert 0 < step < 80 and not (run_dir / "model.safetensors").exists()
    r = run_stage("train.py", *over)
    assert r.returncode == 0 and f"resumed {run_dir} from {saved}" in r.stdout, r.stderr[-2000:]
    assert_same_weights(tmp_path / "runs" / "straight", run_dir)
    assert [row["step"] for row in metric_rows(run_dir) if "loss" in row] == list(range(1, 81))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(demo, demo_cache, tmp_path):
    rec = small_records(demo, tmp_path)
    cfg = train_config(demo, demo_cache, tmp_path, rec, "train.run_name=crash", "train.save_interval=2",
                       "train.max_steps=6")
    (tmp_path / "c.toml").write_text(to_toml(to_tree(cfg)))
    script = (
        "import os, signal, sys, torch\n"
        "from minivlm.training import checkpoint\n"
        "real = torch.save\n"
        "def save_then_die(obj, path, *a, **k):\n"
        "    real(obj, path, *a, **k)\n"
        "    if 'step-0000004' in str(path):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.torch.save = save_then_die\n"
        "from minivlm.config import load_config\n"
        "from minivlm.dist import Dist\n"
        "from minivlm.training.trainer import fit\n"
        f"fit(load_config({str(tmp_path / 'c.toml')!r}), Dist())\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    run_dir = cfg.train.run_dir
    assert (run_dir / "checkpoints" / "step-0000004.tmp").is_dir()
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-0000002"]
    fit(cfg, Dist())  # loads step 2, resumes from it, removes the half-written step 4
    assert not (run_dir / "checkpoints" / "step-0000004.tmp").exists()
    assert (run_dir / "model.safetensors").exists()


READS = """
import json, os, runpy, signal, sys, time
import minivlm.training.trainer as trainer
real, log, stop_at, done = trainer.train_step, sys.argv[1], int(sys.argv[2]), [0]

def recorded(model, opt, micro_batches, *a, **kw):
    out = real(model, opt, micro_batches, *a, **kw)
    done[0] += 1
    with open(f"{log}.{os.environ.get('RANK', '0')}", "a") as f:  # one line per step: the samples it read
        f.write(json.dumps([int(i) for mb in micro_batches for i in mb["index"]]) + "\\n")
    if done[0] == stop_at and os.environ.get("RANK") == "0":
        os.kill(os.getppid(), signal.SIGTERM)  # to torchrun, as a scheduler does; it passes it on to every rank
        time.sleep(3)                          # ... before this rank joins the vote on stopping after this step
    return out

trainer.train_step = recorded
sys.argv = ["stages/train.py", *sys.argv[3:]]
runpy.run_path("stages/train.py", run_name="__main__")
"""


def step_reads(log: Path, ranks: int) -> list[list[int]]:
    """The samples each step read, over every rank, from READS' per-rank logs."""
    per_rank = [[json.loads(ln) for ln in Path(f"{log}.{r}").read_text().splitlines()] for r in range(ranks)]
    return [sorted(sum(step, [])) for step in zip(*per_rank)]


@pytest.mark.slow
def test_torchrun_logs_and_checkpoints_once_stops_on_sigterm_and_resumes_on_two_ranks_bitwise_or_on_one_alike(
        demo, demo_cache, tmp_path):
    """2 ranks x batch 4 to step 40 (stopped by SIGTERM to torchrun), then 1 rank x grad_accum 2 to step 60: the
    same global batch, so every step reads what an uninterrupted 2-rank run reads. Packed batches of samples of 0,
    1 and 2 images: packing lays out a micro-batch, never picks its samples."""
    rec = mixed_records(demo, tmp_path / "m.json")  # 6 steps an epoch: step 40 is mid-epoch
    (tmp_path / "reads.py").write_text(READS)
    over = [*demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", rec, "model.dim=32", "model.n_layer=2",
            "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16", "train.batch_size=4", "train.max_steps=60",
            "train.eval_batches=4", "train.eval_interval=20", "train.log_interval=1", "train.save_interval=30",
            "train.deterministic=true", "train.freeze_llm=0", "train.lr=3e-3", "train.warmup_steps=2",
            "train.packing=true"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def train(launcher, name, *extra, stop_at=0):
        return subprocess.run([*launcher, str(tmp_path / "reads.py"), str(tmp_path / name), str(stop_at), *over,
                               f"train.run_name={name}", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)

    runs = tmp_path / "runs"
    r = train(torchrun, "straight")
    assert r.returncode == 0 and r.stdout.count("train: done") == 1, r.stderr[-3000:]
    assert [p.name for p in checkpoint.checkpoints(runs / "straight")] == ["step-0000030", "step-0000060"]
    r = train(torchrun, "stopped", stop_at=40)
    assert r.returncode != 0 and r.stderr.count("train: stopped") == 1, r.stderr[-3000:]  # rank 0's line only
    assert "train: stopped at step 40 by SIGTERM; checkpoint step-0000040 saved; rerun" in r.stderr
    assert [p.name for p in checkpoint.checkpoints(runs / "stopped")] == ["step-0000030", "step-0000040"]
    assert not (runs / "stopped" / "model.safetensors").exists()
    shutil.copytree(runs / "stopped", runs / "one")

    r = train(torchrun, "stopped")  # on two ranks again: bitwise the uninterrupted run
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    assert_same_weights(runs / "straight", runs / "stopped")
    for name in ("straight", "stopped"):  # every step logged once, by rank 0, across the stop
        rows = metric_rows(runs / name)
        assert [x["step"] for x in rows if "loss" in x] == list(range(1, 61))
        assert [x["step"] for x in rows if "eval_loss" in x] == [20, 40, 60]
    r = train([sys.executable], "one", "train.grad_accum=2")  # on one rank: the same global batch of 8
    assert r.returncode == 0 and f"resumed {runs / 'one'} from step-0000040" in r.stdout, r.stderr[-3000:]
    want = step_reads(tmp_path / "straight", 2)
    assert len(want) == 60 and len({i for step in want[:6] for i in step}) == 48  # an epoch reads every sample once
    assert step_reads(tmp_path / "stopped", 2) == want
    assert step_reads(tmp_path / "one", 1) == want[40:]
    final = [metric_rows(runs / name)[-1] for name in ("straight", "one")]
    assert final[0]["step"] == final[1]["step"] == 60
    assert final[1]["eval_loss"] == pytest.approx(final[0]["eval_loss"], abs=1e-3)


@pytest.mark.slow
def test_packed_and_padded_runs_of_60_steps_end_with_the_same_eval_loss(demo, demo_cache, tmp_path, one_thread):
    """Packing changes how a step's samples are laid out, never the step: the same samples, the same token-weighted
    loss, so the runs differ by float summation order alone. The packed rows hold several samples (pad_frac falls)."""
    rec = mixed_records(demo, tmp_path / "m.json")
    final, pad = {}, {}
    for packing in ("false", "true"):
        cfg = train_config(demo, demo_cache, tmp_path, rec, f"train.run_name={packing}", f"train.packing={packing}",
                           "train.max_steps=60", "train.freeze_llm=0", "train.lr=3e-3", "train.log_interval=10")
        final[packing] = fit(cfg, Dist())
        pad[packing] = np.mean([r["pad_frac"] for r in metric_rows(cfg.train.run_dir) if "pad_frac" in r])
    assert final["true"]["eval_loss"] == pytest.approx(final["false"]["eval_loss"], abs=1e-3)
    assert final["true"]["image_gap"] == pytest.approx(final["false"]["image_gap"], abs=2e-3)
    assert pad["true"] < pad["false"] - 0.1, pad


@pytest.mark.slow
def test_init_from_loads_an_lm_checkpoint_and_refuses_a_poor_match(demo, demo_cache, tmp_path):
    rec = small_records(demo, tmp_path)
    cfg = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=1", "train.run_name=a")
    fit(cfg, Dist())
    lm = {k: v for k, v in weights(cfg.train.run_dir).items() if not k.startswith("projector.")}
    save_file({("_orig_mod." + k): v for k, v in lm.items()}, str(tmp_path / "lm.safetensors"))
    cfg_b = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=1", "train.run_name=b",
                         f"train.init_from={tmp_path}/lm.safetensors", "train.freeze_llm=2", "train.lr=0")
    fit(cfg_b, Dist())
    after = weights(cfg_b.train.run_dir)
    assert all(torch.equal(after[k], v) for k, v in lm.items())  # loaded, and frozen at freeze_llm=2
    save_file({k: v for k, v in list(lm.items())[:3]}, str(tmp_path / "poor.safetensors"))
    with pytest.raises(ValueError, match="lacks .* tensors: .*allow_partial_init"):
        fit(train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=1", "train.run_name=c",
                         f"train.init_from={tmp_path}/poor.safetensors"), Dist())


@pytest.mark.slow
@pytest.mark.parametrize("setting, width", [("model.pool=2", 1), ("model.pixel_shuffle=2", 4)])
def test_a_run_with_fewer_tokens_per_image_trains_captions_and_evaluates_on_the_same_cache(
        demo, demo_cache, tmp_path, one_thread, setting, width):
    """The demo cache's 4x4 grid (T=16) becomes 4 tokens per image in the model: training, live captioning and
    evaluation all read the cache's rows as they are and reduce them the same way."""
    from minivlm.training.model import VLM
    from minivlm.use.captioner import caption_features, caption_files, load_run
    from minivlm.use.evaluation import evaluate_run
    cfg = train_config(demo, demo_cache, tmp_path, small_records(demo, tmp_path), "train.max_steps=3", setting)
    final = fit(cfg, Dist())
    assert np.isfinite(final["eval_loss"])
    vc = VLM.from_pretrained(cfg.train.run_dir).config
    assert (vc.cache_tokens, vc.image_tokens, vc.image_dim) == (16, 4, 64)
    cap = load_run(cfg.train.run_dir)
    assert cap.model.projector[0].in_features == width * 64 and cap.fmt.image_tokens == 4
    _, index = open_cache(cfg)
    key = load_splits(cfg, index)[1].records[0].images[0]
    [(_, caption, error)] = caption_files(cap, [demo / "images" / key], max_new_tokens=8)
    reader, stored = index.reader(), np.empty((1, index.codec.row_bytes), np.uint8)  # its row, from the cache
    reader.read(*(np.array([i]) for i in index.locations[key]), stored)
    reader.close()
    cached = index.codec.decode(torch.from_numpy(stored))  # (1, 16, 64)
    assert error is None and caption == caption_features(cap, cached, max_new_tokens=8)[0]
    result = evaluate_run(cfg.train.run_dir, n=2)
    assert np.isfinite(result["eval_loss"]) and len(result["captions"]) == 2


@pytest.mark.slow
def test_a_run_cannot_resume_or_start_from_a_run_with_another_token_reduction(demo, demo_cache, tmp_path, one_thread):
    rec = small_records(demo, tmp_path)
    first = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=2", "train.run_name=a")
    fit(first, Dist())
    with pytest.raises(ValueError, match="trained with other settings \\(model.pool: 1 -> 2\\).*run_name") as e:
        fit(train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=2", "train.run_name=a", "model.pool=2"),
            Dist())
    assert "\n" not in str(e.value)
    for setting, needle in [("model.pool=2", "model.pool: 1 there, 2 here"),
                            ("model.pixel_shuffle=2", "model.pixel_shuffle: 1 there, 2 here")]:
        with pytest.raises(ValueError, match=f"init_from={first.train.run_dir}: .*{needle}") as e:
            fit(train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=2", "train.run_name=b", setting,
                             f"train.init_from={first.train.run_dir}"), Dist())
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_stage_errors_are_one_line(demo, demo_cache, tmp_path):
    r = run_stage("train.py", *demo_overrides(demo, tmp_path), f"cache.dir={tmp_path}/none")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "run stages/embed.py" in r.stderr
    r = run_stage("train.py", *demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", "encoder.pool=1")
    assert r.returncode == 2 and "encoder.pool=2" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run_stage("train.py", *demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", "train.log_interval=0")
    assert (r.returncode, r.stderr) == (2, "error: train.log_interval must be >= 1, got 0\n")
    r = run_stage("train.py", *demo_overrides(demo, tmp_path), f"cache.dir={demo_cache}", "model.pool=3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model.pool=3" in r.stderr and "4x4" in r.stderr


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing_and_other_settings_are_refused(demo, demo_cache, tmp_path):
    rec = small_records(demo, tmp_path)
    cfg = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=3", "train.run_name=done")
    first = fit(cfg, Dist())
    metrics = (cfg.train.run_dir / "metrics.jsonl").read_text()
    mtime = (cfg.train.run_dir / "model.safetensors").stat().st_mtime_ns
    assert fit(cfg, Dist()) == first
    assert (cfg.train.run_dir / "metrics.jsonl").read_text() == metrics
    assert (cfg.train.run_dir / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="trained with other settings \\(train.lr: 0.002 -> 0.001\\).*run_name"):
        fit(train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=3", "train.run_name=done",
                         "train.lr=1e-3"), Dist())
    longer = fit(train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=5", "train.run_name=done"), Dist())
    assert longer["step"] == 5


class Killed(Exception):
    """Stands in for a kill at a chosen point of the end of a run."""


def metric_rows(run_dir) -> list[dict]:
    """metrics.jsonl without the figures that depend on timing."""
    timing = {"samples_per_s", "tokens_per_s", "image_rows_per_s", "data_wait", "peak_mem_mb", "mfu"}
    return [{k: v for k, v in json.loads(ln).items() if k not in timing}
            for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_between_final_checkpoint_and_weights_the_rerun_logs_the_final_eval_once(demo, demo_cache, tmp_path,
                                                                                          monkeypatch):
    rec = small_records(demo, tmp_path)
    cfg = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=3", "train.run_name=end")
    real = checkpoint.save_final

    def killed(*a, **kw):
        raise Killed

    monkeypatch.setattr(checkpoint, "save_final", killed)
    with pytest.raises(Killed):
        fit(cfg, Dist())
    monkeypatch.setattr(checkpoint, "save_final", real)
    fit(cfg, Dist())
    rows = metric_rows(cfg.train.run_dir)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def end_state(run_dir) -> dict:
    """Everything a finished run leaves, timing figures aside."""
    run_dir = Path(run_dir)
    files = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "tokenizer").rglob("*"))
             if p.is_file()}
    return {"metrics": metric_rows(run_dir), "weights": (run_dir / "model.safetensors").read_bytes(),
            "model_config": json.loads((run_dir / "model_config.json").read_text()), "tokenizer": files,
            "checkpoints": [p.name for p in checkpoint.checkpoints(run_dir)]}


@pytest.mark.slow
def test_the_end_of_a_run_cut_short_anywhere_reruns_to_the_same_end_state(demo, demo_cache, tmp_path, monkeypatch):
    import minivlm.training.model as model
    import minivlm.training.trainer as trainer
    rec = small_records(demo, tmp_path)
    over = (rec, "train.max_steps=3", "train.save_interval=2")
    fit(train_config(demo, demo_cache, tmp_path, *over, "train.run_name=straight"), Dist())
    want = end_state(tmp_path / "runs" / "straight")

    def after(real):
        def cut(*a, **kw):
            real(*a, **kw)
            raise Killed
        return cut

    def before(real):
        def cut(*a, **kw):
            raise Killed
        return cut

    points = [(trainer, "run_eval", after),            # the final eval row is in metrics.jsonl
              (checkpoint, "save_final", before),      # ... and the final checkpoint is published
              (model, "atomic_write_json", before),    # ... and tokenizer/ is written
              (model, "save_weights", before)]         # ... and model_config.json: only the weights are missing
    for i, (module, name, when) in enumerate(points):
        cfg = train_config(demo, demo_cache, tmp_path, *over, f"train.run_name=cut{i}")
        real = getattr(module, name)
        monkeypatch.setattr(module, name, when(real))
        with pytest.raises(Killed):
            fit(cfg, Dist())
        monkeypatch.setattr(module, name, real)
        assert not (cfg.train.run_dir / "model.safetensors").exists()
        fit(cfg, Dist())
        assert end_state(cfg.train.run_dir) == want, f"cut short at {name}"
        fit(cfg, Dist())  # and once more, finished: nothing changes
        assert end_state(cfg.train.run_dir) == want


def test_no_tensor_is_read_on_the_host_between_log_steps(demo, demo_cache, tmp_path, monkeypatch):
    """.item(), float(), int(), .tolist() on a tensor, called from minivlm: on CUDA each waits for the GPU.
    minivlm.training.data is left out: it builds batches on the host (the sampler's epoch order is a CPU tensor)
    and never sees a device tensor."""
    import minivlm.training.trainer as trainer
    rec = small_records(demo, tmp_path)
    cfg = train_config(demo, demo_cache, tmp_path, rec, "train.max_steps=8", "train.log_interval=4",
                       "train.eval_interval=4", "train.save_interval=4", "train.grad_accum=2")
    step, reads = [0], collections.Counter()  # reads by the step in flight (its data, its step, what follows it)
    for name in ("item", "tolist", "__float__", "__int__"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), **kw):
            where = sys._getframe(1).f_code.co_filename
            if where.startswith(str(REPO / "minivlm")) and where != str(REPO / "minivlm" / "training" / "data.py"):
                reads[step[0]] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = trainer.train_step

    def counting_step(*a, **kw):
        step[0] += 1
        return real_step(*a, **kw)

    monkeypatch.setattr(trainer, "train_step", counting_step)
    fit(cfg, Dist())
    assert step[0] == 8 and reads[4] > 0 and reads[8] > 0  # the log steps read, so the count works
    assert {s: n for s, n in reads.items() if s % 4} == {}


def corrupt_row(cfg, step: int) -> tuple[Path, int, bytes]:
    """Make the first cached row read at `step` (1-based, grad_accum 1) inf, as an encoder that overflowed
    would have stored it: the shard rewritten by the real writer, so its checksums hold. Returns the shard,
    the row and the shard file's original bytes."""
    data = load_data(cfg, Dist())
    sp = data.train.split
    j = sp.slots(np.asarray(data.sampler.batches(0)[step - 1]))[0]  # the step's first image read
    s, row = int(sp.shard[j]), int(sp.row[j])
    info = data.index.shards[s]
    reader = data.index.reader(mapped=False)
    rows = np.empty((info.n_rows, info.codec.row_bytes), np.uint8)
    reader.read(np.full(info.n_rows, s), np.arange(info.n_rows), rows)
    reader.close()
    data.train.close()
    original = info.path.read_bytes()
    rows[row] = info.codec.encode(torch.full((1, info.codec.tokens, info.codec.width), torch.inf)).numpy()
    keys = shard.read_info(info.path, keys=True).keys
    shard.write_shard(info.path, rows, info.codec, keys, **{**info.attrs, "failures": []})
    return info.path, row, original


def test_a_cache_with_crc32_row_checksums_verifies_and_trains_to_the_weights_of_a_fresh_one(demo, demo_cache, tmp_path,
                                                                                          one_thread):
    old = tmp_path / "cache"
    shutil.copytree(demo_cache, old, ignore=shutil.ignore_patterns("samples"))
    crc32_cache(old)  # as minivlm wrote it before xxh3_64
    assert verify(old) == []
    rec = small_records(demo, tmp_path)
    runs = [train_config(demo, cache_dir, tmp_path, rec, "train.max_steps=3", f"train.run_name={name}")
            for name, cache_dir in (("fresh", demo_cache), ("crc32", old))]
    for cfg in runs:
        fit(cfg, Dist())
    assert_same_weights(*(cfg.train.run_dir for cfg in runs))


@pytest.mark.slow
@pytest.mark.parametrize("checksum", ["xxh3_64", "crc32"])
def test_a_row_failing_its_checksum_stops_training_with_the_line_verify_prints(demo, demo_cache, tmp_path, checksum):
    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_cache, cache_dir, ignore=shutil.ignore_patterns("samples"))
    if checksum == "crc32":
        crc32_cache(cache_dir)  # as minivlm wrote it before xxh3_64
    cfg = train_config(demo, cache_dir, tmp_path, "train.max_steps=3")
    data = load_data(cfg, Dist())
    sp = data.train.split
    j = sp.slots(np.asarray(data.sampler.batches(0)[1]))[0]  # read by step 2
    s, row = int(sp.shard[j]), int(sp.row[j])
    info = data.index.shards[s]
    with h5py.File(info.path) as f:
        key = f["keys"][row].decode()
    data.train.close()
    raw = bytearray(info.path.read_bytes())
    raw[info.values_at + row * info.codec.values_bytes + 11] ^= 0x08  # one bit of one value of that row
    info.path.write_bytes(bytes(raw))
    line = f"{info.path}: row {row} (image {key}) fails its {checksum} checksum"
    verify = run_stage("embed.py", "--config", str(REPO / "configs/demo.toml"), *demo_overrides(demo, tmp_path),
                       f"cache.dir={cache_dir}", "--verify")
    assert verify.returncode == 1 and f"verify: {line}" in verify.stdout, verify.stdout
    (tmp_path / "c.toml").write_text(to_toml(to_tree(cfg)))
    r = run_stage("train.py", "--config", str(tmp_path / "c.toml"))
    assert r.returncode == 1 and r.stderr.startswith(f"error: {line}") and r.stderr.count("\n") == 1, r.stderr
    assert not (cfg.train.run_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_a_non_finite_row_stops_training_at_its_step_naming_the_row_and_a_rerun_resumes(demo, demo_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    rec = small_records(demo, tmp_path)
    over = (rec, "train.max_steps=6", "train.log_interval=3", "train.save_interval=2")
    straight = train_config(demo, demo_cache, tmp_path, *over, "train.run_name=straight")
    fit(straight, Dist())
    cfg = train_config(demo, cache, tmp_path, *over, "train.run_name=bad")
    path, row, original = corrupt_row(cfg, step=4)
    named = rf"non-finite .* at step 4 .*{path.name} rows? [0-9, ]*\b{row}\b.*stages/embed.py .*--verify"
    with pytest.raises(RunFailed, match=named) as e:
        fit(cfg, Dist())  # flagged on the device at step 4, acted on before step 4's checkpoint
    assert "\n" not in str(e.value) and "resume from step-0000002" in str(e.value)
    run_dir = cfg.train.run_dir
    assert not (run_dir / "model.safetensors").exists()
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-0000002"]

    late = train_config(demo, cache, tmp_path, rec, "train.max_steps=6", "train.log_interval=5",
                        "train.save_interval=0", "train.run_name=late")
    with pytest.raises(RunFailed, match=named.replace("step-0000002", "")):
        fit(late, Dist())  # acted on at the next log step (5), naming the first bad step (4)
    assert not (late.train.run_dir / "metrics.jsonl").exists()  # step 5's row was not logged either
    assert not checkpoint.checkpoints(late.train.run_dir) and not (late.train.run_dir / "model.safetensors").exists()

    path.write_bytes(original)  # the cache repaired: the rerun resumes from the last finite checkpoint
    fit(cfg, Dist())
    assert_same_weights(straight.train.run_dir, run_dir)
