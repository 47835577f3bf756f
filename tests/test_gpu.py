"""The CUDA tier (`pytest -m gpu`, part of `make gpu-check`): bf16 steps with fused AdamW and pinned batches
and no host sync between log steps, exact resume, torch.compile, DDP over NCCL, stage 1 on CUDA, packed rows
(FlexAttention and flash-attn against SDPA with the block mask, a packed step with no host sync).
Every test here is skipped with the reason "needs CUDA" where there is none."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, demo_config, train_config
from minivlm.dist import Dist
from minivlm.embedding import cache
from minivlm.training.metrics import peak_flops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = Dist(device="cuda:0")


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_bf16_steps_with_fused_adamw_and_pinned_batches_never_sync_between_log_steps(demo, demo_cache, tmp_path,
                                                                                       monkeypatch):
    import minivlm.training.trainer as trainer
    cfg = train_config(demo, demo_cache, tmp_path, "train.max_steps=8", "train.log_interval=4", "train.eval_interval=4",
                       "train.save_interval=4", "train.grad_accum=2", "train.freeze_llm=0")
    seen, calls = {"pinned": set()}, [0]
    real_step, real_to_device = trainer.train_step, trainer.to_device

    def to_device(batch, device, codec):
        seen["pinned"] |= {v.is_pinned() for v in batch.values() if torch.is_tensor(v)}
        return real_to_device(batch, device, codec)

    def guarded_step(model, opt, mbs, tc, scaler, dtype, device):
        """From here until the next step starts, any host sync raises, except after a log step."""
        calls[0] += 1
        seen.update(fused=opt.param_groups[0]["fused"], dtype=dtype)
        torch.cuda.set_sync_debug_mode("error")
        out = real_step(model, opt, mbs, tc, scaler, dtype, device)
        if calls[0] % 4 == 0:  # a log step: its numbers are read next
            torch.cuda.set_sync_debug_mode(0)
        return out

    monkeypatch.setattr(trainer, "to_device", to_device)
    monkeypatch.setattr(trainer, "train_step", guarded_step)
    try:
        final = trainer.fit(cfg, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert seen == {"pinned": {True}, "fused": True, "dtype": torch.bfloat16}
    assert calls[0] == 8 and np.isfinite(final["loss"])
    if peak_flops(CUDA.device):
        assert 0 < final["mfu"] < 1
    assert all(v.dtype == torch.float32 for v in load_file(str(cfg.train.run_dir / "model.safetensors")).values())


RESUME_SCRIPT = """
import os, signal, sys
import minivlm.training.trainer as trainer
from minivlm.config import load_config
from minivlm.dist import Dist
stop_at, real, n = int(sys.argv[2]), trainer.train_step, [0]
def step(*a, **kw):
    out = real(*a, **kw)
    n[0] += 1
    if n[0] == stop_at:
        os.kill(os.getpid(), signal.SIGINT)
    return out
trainer.train_step = step
try:
    trainer.fit(load_config(sys.argv[1]), Dist(device="cuda:0"))
except KeyboardInterrupt:
    sys.exit(3)
"""


def test_a_run_stopped_and_resumed_on_cuda_gives_the_same_losses_and_weights(demo, demo_cache, tmp_path):
    from minivlm.config import to_toml, to_tree
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS, set before CUDA starts
    runs = {}
    for name in ("straight", "stopped"):
        cfg = train_config(demo, demo_cache, tmp_path, "train.max_steps=8", "train.deterministic=true",
                           "model.dropout=0.1", "train.freeze_llm=0", f"train.run_name={name}")
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(to_tree(cfg)))
        runs[name] = (cfg, path)
    run = lambda path, stop: subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(path), str(stop)],  # noqa: E731
                                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    r = run(runs["straight"][1], 0)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(runs["stopped"][1], 3)
    assert r.returncode == 3, r.stderr[-3000:]
    r = run(runs["stopped"][1], 0)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    a, b = (runs[k][0].train.run_dir for k in ("straight", "stopped"))
    assert losses(a) == losses(b) and len(losses(a)) == 8
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torch_compile_gives_the_same_losses_within_bf16_tolerance(demo, demo_cache, tmp_path):
    from minivlm.training.trainer import fit
    out = {}
    for compiled in (False, True):
        cfg = train_config(demo, demo_cache, tmp_path, "train.max_steps=6", "train.freeze_llm=0",
                           f"train.compile={str(compiled).lower()}", f"train.run_name=compile-{compiled}")
        fit(cfg, CUDA)
        out[compiled] = losses(cfg.train.run_dir)
    assert out[True].keys() == out[False].keys()
    for step, loss in out[False].items():
        assert out[True][step] == pytest.approx(loss, rel=2e-2), step


def test_ddp_over_nccl_with_one_rank_steps_like_the_plain_model(demo, demo_cache, tmp_path, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from minivlm.training.data import load_data, to_device
    from minivlm.training.trainer import amp_dtype, build_model, evaluate, train_step
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        cfg = train_config(demo, demo_cache, tmp_path, "train.grad_accum=2", "train.freeze_llm=0")
        data = load_data(cfg, CUDA)
        dtype = amp_dtype(cfg.train, CUDA.device)
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(build_model(cfg, data, CUDA.device, init=False))
        (raw, opt, scaler), (plain, plain_opt, plain_scaler) = models
        ddp = DDP(raw, device_ids=[0])
        batches = [to_device(data.train[ix], CUDA.device, data.codec) for ix in data.sampler.batches(0)[:4]]
        for mbs in (batches[:2], batches[2:]):
            a = train_step(ddp, opt, mbs, cfg.train, scaler, dtype, CUDA.device)
            b = train_step(plain, plain_opt, mbs, cfg.train, plain_scaler, dtype, CUDA.device)
            assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-3)
        for p, q in zip(raw.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
        ours, theirs = evaluate(raw, data.eval_batches, dtype, CUDA.device), evaluate(plain, data.eval_batches, dtype,
                                                                                       CUDA.device)
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-3)  # all_reduce over one rank
    finally:
        torch.distributed.destroy_process_group()


def test_stage1_on_cuda_equals_cpu_within_fp16_and_has_another_fingerprint(demo, tmp_path):
    from minivlm.embedding.embed import run_embed
    manifests, rows = {}, {}
    for name, dist in (("cpu", Dist()), ("cuda", CUDA)):
        cfg = demo_config(demo, tmp_path / name)
        manifests[name] = run_embed(cfg, dist)
        rows[name] = {}
        for p in sorted(cache.shard_dir(cfg.cache.dir).glob("shard-*.h5")):
            with h5py.File(p, "r") as f:  # float16 rows: plain h5py reads them
                rows[name].update(zip(f["keys"].asstr()[...], f["embeddings"][...].astype(np.float32)))
    assert manifests["cuda"]["fingerprint_id"] != manifests["cpu"]["fingerprint_id"]
    assert (manifests["cuda"]["encoder"]["fingerprint"]["compute_dtype"], manifests["cpu"]["encoder"]["fingerprint"]
            ["compute_dtype"]) == ("float16", "float32")
    assert rows["cuda"].keys() == rows["cpu"].keys()
    for k, cpu in rows["cpu"].items():
        scale = float(np.abs(cpu).max())
        assert float(np.abs(rows["cuda"][k] - cpu).max()) <= 1e-2 * scale + 1e-3, k


# Packed rows on CUDA (minivlm.training.attention): rows of 384 tokens, so FlexAttention's 128-token blocks
# hold several samples, parts of samples, and pairs of blocks with no sample in common.
PACKED_SAMPLES = [(150, (3, 90)), (60, ()), (170, (160,)), (120, ()), (200, (10,)), (30, ())]
PACKED_ROWS, PACKED_L = [[0, 1, 2], [3, 4, 5]], 384


def packed_model_and_batch():
    """A model with 64-wide heads, GQA and qk_norm (whose fp32 weight leaves q and k in fp32 under autocast) on
    CUDA, and a packed batch in pinned host memory."""
    from test_model import pack, sample, tiny_vlm
    model = tiny_vlm(dim=256, n_head=4, n_kv_head=2, qk_norm=True, max_seq_len=512).to(CUDA.device).train()
    samples = [sample(n, at, seed=i) for i, (n, at) in enumerate(PACKED_SAMPLES)]
    ids, images, labels, packing = pack(samples, PACKED_ROWS, PACKED_L)
    host = {"input_ids": ids, "images": images, "labels": labels, **packing}
    return model, {k: v.pin_memory() for k, v in host.items()}


def forward(model, batch):
    b = {k: v.to(CUDA.device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast("cuda", torch.bfloat16):
        return model(b["input_ids"], b["images"], b["labels"], positions=b["positions"], cu_seqlens=b["cu_seqlens"])


def force_backend(monkeypatch, name):
    import minivlm.training.attention as attention
    import minivlm.training.model as model_module
    monkeypatch.setattr(model_module, "attention_backend", lambda *a: attention.Backend(name, "forced by the test"))


def varlen_backends() -> list[str]:
    """FlexAttention always (CUDA torch has Triton), flash-attn where installed. Looped over rather than
    parametrized: the CPU tier counts one skip per test function here (test_bench)."""
    from minivlm.training.attention import flash_attn_varlen_func
    return ["flex"] + (["flash_attn"] if flash_attn_varlen_func is not None else [])


def test_varlen_kernels_give_the_logits_and_gradients_of_sdpa_with_the_block_mask(monkeypatch):
    model, batch = packed_model_and_batch()
    got = {}
    for name in ["sdpa"] + varlen_backends():
        force_backend(monkeypatch, name)
        out = forward(model, batch)
        out.loss.backward()
        got[name] = out.logits.float(), out.loss.detach(), [p.grad.float() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    ref_logits, ref_loss, ref_grads = got.pop("sdpa")
    for name, (logits, loss, grads) in got.items():
        torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2, msg=name)  # bf16: 8 mantissa bits
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2), name
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= 3e-2 * r.norm() + 1e-6, name


def test_a_packed_bf16_training_step_never_syncs(monkeypatch):
    """Forward from pinned batches, backward and a fused AdamW step with host syncs raising, for the backend
    attention_backend picks under torch.compile, then each backend eagerly; the first step compiles
    (FlexAttention, torch.compile) outside the check."""
    from minivlm.training.attention import attention_backend
    print(f"packed attention: {attention_backend(CUDA.device, torch.bfloat16, 0.0)}")
    for backend, compiled in [(None, True), ("sdpa", False)] + [(b, False) for b in varlen_backends()]:
        if backend is not None:
            force_backend(monkeypatch, backend)
        model, batch = packed_model_and_batch()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        run = torch.compile(model) if compiled else model

        def step():
            loss = forward(run, batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [step() for _ in range(3)]
        except RuntimeError as e:
            e.add_note(f"packed step with backend {backend or 'as chosen'}, compiled={compiled}")
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(torch.isfinite(x).item() for x in losses), (backend, compiled)
