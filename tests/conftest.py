"""Shared fixtures: a tiny offline demo (images, records, CLIP, tokenizer) built once per session with the
same code `make demo-data` uses, and configs built from the real dataclasses.

Tiers: `slow` marks the end-to-end tests (training to the end, subprocesses, torchrun, the bench);
`gpu` the CUDA tier (tests/test_gpu.py); `browser` the view page in Debian's chromium (tests/test_view.py).
`make test` runs everything, `make test-fast` none of these tiers.
Every test leaves the process as it found it (deterministic mode, RNG, logging levels): see
`restore_global_state`."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivlm.config import RunConfig, load_config
from minivlm.demo.folder import make_demo

REPO = Path(__file__).resolve().parents[1]
SHARED_REF = REPO.parent / "shared" / "ref"


@pytest.fixture(autouse=True)
def restore_global_state():
    """Undo what a test changed process-wide, so no test depends on the order tests run in."""
    import torch
    from transformers.utils import logging as hf_logging
    deterministic, rng, threads = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state(), \
        torch.get_num_threads()
    hf_level, hf_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in [None, *logging.root.manager.loggerDict]}
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(hf_level)
    (hf_logging.enable_progress_bar if hf_bar else hf_logging.disable_progress_bar)()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def one_thread(monkeypatch):
    """One compute thread here and in the stages the test starts: on two busy cores, two threads per process
    spin against each other (150 tiny steps: ~100 s with two, ~4 s with one), and a bitwise comparison
    between this process and a stage needs the same thread count on both sides."""
    import torch
    torch.set_num_threads(1)  # restored by restore_global_state
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=160, n_val=32, seed=0)
    return d


def demo_overrides(demo: Path, work: Path) -> list[str]:
    return [f"data.records={demo}/train.json", f"data.val_records={demo}/val.json", f"data.image_root={demo}/images",
            f"encoder.name_or_path={demo}/encoder", f"tokenizer.name_or_path={demo}/tokenizer",
            f"cache.dir={work}/cache", "cache.shard_size=16", "encoder.num_workers=0", "encoder.batch_size=8",
            f"train.out_dir={work}/runs", "train.num_workers=0"]


def mixed_records(demo: Path, path: Path, singles: int = 30, pairs: int = 15) -> str:
    """A records file of the demo's single-image records, its images paired into two-image records (the answer
    describes the first, then the second) and its text-only records, interleaved: samples of 0, 1 and 2 images
    and of very different lengths, so packed rows hold several. Returns the data.records override."""
    from minivlm.demo.pairs import pair_records
    recs = json.loads((demo / "train.json").read_text())
    single, text = [r for r in recs if "image" in r][:singles], [r for r in recs if "image" not in r]
    mixed = single + pair_records(single)[:pairs] + text
    mixed = [mixed[i] for i in np.random.default_rng(0).permutation(len(mixed))]
    path.write_text(json.dumps(mixed))
    return f"data.records={path}"


def demo_config(demo: Path, work: Path, *overrides: str) -> RunConfig:
    return load_config(REPO / "configs" / "demo.toml", demo_overrides(demo, work) + list(overrides))


def run_stage(script: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a stage script the way a user does, from the repo root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "stages" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def tokenizer_dir(version: str) -> Path:
    path = SHARED_REF / f"minimind-tokenizer-{version}"
    if not path.is_dir():
        pytest.skip(f"{path} absent (the real MiniMind tokenizers live in ../shared/ref)")
    return path


@pytest.fixture(scope="session")
def demo_cache(demo, tmp_path_factory) -> Path:
    """The session's demo embedded once (shards of 16 images); tests that train read it, never write it."""
    from minivlm.dist import Dist
    from minivlm.embedding.embed import run_embed
    work = tmp_path_factory.mktemp("cached")
    run_embed(demo_config(demo, work), Dist())
    return work / "cache"


def train_config(demo: Path, cache_dir: Path, work: Path, *overrides: str) -> RunConfig:
    """A tiny, fast stage-2 config on the session cache."""
    return demo_config(demo, work, f"cache.dir={cache_dir}", "model.dim=32", "model.n_layer=2", "model.n_head=2",
                       "model.n_kv_head=1", "model.multiple_of=16", "train.batch_size=8", "train.eval_batches=2",
                       "train.log_interval=1", "train.eval_interval=0", "train.save_interval=0", *overrides)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """The full demo, embedded and trained with configs/demo.toml as `make demo` does (about two minutes).

    Shared by the learnability, captioning and evaluation tests; none of them writes to it."""
    from minivlm.dist import Dist
    from minivlm.embedding.embed import run_embed
    from minivlm.training.trainer import fit
    work = tmp_path_factory.mktemp("full_demo")
    make_demo(work / "demo", seed=0)
    cfg = load_config(REPO / "configs" / "demo.toml", [
        f"data.records={work}/demo/train.json", f"data.val_records={work}/demo/val.json",
        f"data.image_root={work}/demo/images", f"encoder.name_or_path={work}/demo/encoder",
        f"tokenizer.name_or_path={work}/demo/tokenizer", f"cache.dir={work}/cache", f"train.out_dir={work}/runs"])
    run_embed(cfg, Dist())
    final = fit(cfg, Dist())
    return cfg, final


def write_crc32_shard(path: Path) -> None:
    """Rewrite a published shard as minivlm wrote shards before xxh3_64 (format 2 of 2026-12-03): the same
    datasets and attributes, with `checksum` "crc32" and zlib's CRC-32 of each row's stored bytes (its
    `embeddings` row, then its `scales` row) as uint32. Plain h5py and zlib only, none of our code."""
    import zlib

    import h5py
    import numpy as np
    with h5py.File(path, "r") as f:
        data = {name: f[name][...] for name in ("embeddings", "scales", "keys") if name in f}
        attrs = dict(f.attrs)
    n = len(data["embeddings"])
    crc = [zlib.crc32(data["embeddings"][i].tobytes() + (data["scales"][i].tobytes() if "scales" in data else b""))
           for i in range(n)]
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=data["embeddings"])
        if "scales" in data:
            f.create_dataset("scales", data=data["scales"])
        f.create_dataset("checksums", data=np.array(crc, np.uint32))
        f.create_dataset("keys", data=data["keys"], dtype=h5py.string_dtype("utf-8"))
        f.attrs.update({**attrs, "checksum": "crc32"})


def crc32_cache(cache_dir: Path) -> None:
    """Every shard of a complete cache rewritten by `write_crc32_shard`, its manifest's sha256 updated: the
    cache minivlm wrote for the same images before xxh3_64."""
    import hashlib
    import json
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = cache_dir / "shards" / entry["file"]
        write_crc32_shard(path)
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (cache_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
