"""Stage 2: train the VLM from the cache. `fit` orders the loop (step, log, evaluate, checkpoint), as
nanoGPT's train.py does; `train_step` is the whole optimisation step.

Design choices:
- No vision forward and no image decoding: batches are cached rows + tokens (minivlm.training.data assembles them).
- AdamW (fused on CUDA), no decay on norms/biases/embeddings, linear warmup then cosine to min_lr.
- Gradient accumulation with DDP `no_sync` on every micro-step but the last; AMP bf16 on CUDA by
  default (fp16 with GradScaler as an option), fp32 on CPU.
- No host sync inside a step (a step of a 26M LM is milliseconds of GPU work; a sync per step idles the
  GPU while Python catches up): loss and grad norm stay on the device and are read at log steps only;
  ranks agree on a stop request at log steps; a non-finite loss or grad norm is flagged on the device
  and acted on at the next log step, and before any checkpoint or final save, naming the first bad step
  and the cache rows it read.
- Seeds are offset by rank, so dropout differs across ranks (DDP broadcasts rank 0's initial weights).
- The loop's position is an explicit `TrainState`; `checkpoint.Checkpoints` decides when
  to save and what a checkpoint holds; metrics go to a logger (minivlm.training.metrics). Exact resume: a
  resumed run replays the same batches with the same state and ends bitwise equal on CPU with
  deterministic settings. On another number of ranks with the same global batch (2 ranks x grad_accum 1
  -> 1 rank x 2) every step reads the same samples; only float summation order (and dropout's per-rank
  masks) differ.
- The end of a run (final eval row, final checkpoint, final files) can be interrupted anywhere and rerun
  to the same end state: the logger writes a step's eval row once, a saved step is not saved again, and
  `model.safetensors` is the last final file written.
- Progress: a tqdm bar where stdout is a terminal; where it is not (a log file, a scheduler's capture), tqdm
  turns itself off and a line per train.log_interval goes to stdout instead, so a long run is never silent.
- eval_loss_shuffled: the same eval batches with images rolled across the batch. The gap to
  eval_loss is how much the model uses the image (and proof that rows stay aligned with records).
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minivlm.config import RunConfig, RunFailed, TrainConfig, to_toml, to_tree
from minivlm.dist import Dist, print0
from minivlm.embedding.shard import Codec
from minivlm.fileio import WriterLock, atomic_write_text
from minivlm.stop import Interrupted, signal_name, stop_requests
from minivlm.training import checkpoint
from minivlm.training.checkpoint import Checkpoints, TrainState
from minivlm.training.data import Loader, Samples, TrainData, load_data, step_batches, to_device
from minivlm.training.metrics import (
    MetricsLogger,
    Throughput,
    flop_counts,
    last_metrics,
    open_wandb,
    peak_flops,
    peak_memory_mb,
)
from minivlm.training.attention import Backend, attention_backend
from minivlm.training.model import VLM, VLMConfig, freeze, next_token_targets, num_params, param_groups
from minivlm.training.pretrained import init_from
from minivlm.training.text import IGNORE


@dataclass(frozen=True)
class StepStats:
    loss: torch.Tensor        # () on the device: mean over the micro-batches
    grad_norm: torch.Tensor   # () on the device: before clipping
    samples: int


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def amp_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, cfg.dtype)


def autocast(dtype: torch.dtype, device: str):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def train_step(model, opt, micro_batches: list[dict], cfg: TrainConfig, scaler, dtype: torch.dtype,
               device: str) -> StepStats:
    """One optimizer step over `micro_batches` (already on device): accumulate, clip, step, zero. Nothing
    here reads a device value on the host (fp16's GradScaler aside: its step checks for inf)."""
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast(dtype, device):
                out = model(mb["input_ids"], mb["images"], mb["labels"], positions=mb.get("positions"),
                            cu_seqlens=mb.get("cu_seqlens"), image_index=mb.get("image_index"))
            scaler.scale(out.loss / n).backward()
        total += out.loss.detach()
    scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return StepStats(total / n, grad_norm.detach(), sum(len(mb["index"]) for mb in micro_batches))  # samples, not rows


@torch.no_grad()
def evaluate(model: VLM, batches: list[dict], codec: Codec, dtype: torch.dtype, device: str) -> dict:
    """Token-weighted eval loss with true images and with every sample's images replaced by another's."""
    was_training = model.training
    model.eval()
    sums = {"eval_loss": 0.0, "eval_loss_shuffled": 0.0}
    count = 0
    for batch in batches:
        b = to_device(batch, device, codec)
        images, targets = b["images"], next_token_targets(b["labels"], b.get("positions"))
        shuffled = images[torch.from_numpy(b["shuffled"]).to(device)] if images is not None else None
        for name, images in (("eval_loss", images), ("eval_loss_shuffled", shuffled)):
            with autocast(dtype, device):
                logits = model(b["input_ids"], images, positions=b.get("positions"), cu_seqlens=b.get("cu_seqlens"),
                               image_index=b.get("image_index")).logits
            sums[name] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                          ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    if torch.distributed.is_initialized():
        t = torch.tensor([sums["eval_loss"], sums["eval_loss_shuffled"], count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        sums["eval_loss"], sums["eval_loss_shuffled"], count = t[0].item(), t[1].item(), int(t[2].item())
    model.train(was_training)
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["image_gap"] = out["eval_loss_shuffled"] - out["eval_loss"]
    return out




def batch_layout(cfg: RunConfig, device: str) -> tuple[int | None, Backend]:
    """How training batches are laid out (`data.Samples`' packing: None padded) and the attention kernel that
    keeps packed samples apart. Rows are as wide as the model takes where attention costs each sample its own
    length only (the varlen kernels); through SDPA (its mask, or `gather`'s padded length classes) a wide row
    costs more than its samples, so rows are no wider than the micro-batch's longest sample (0), and a packed
    step never computes more positions than a padded one."""
    backend = attention_backend(device, amp_dtype(cfg.train, device), cfg.model.dropout)
    if not cfg.train.packing:
        return None, backend
    return (0 if backend.name in ("sdpa", "gather") else cfg.model.max_seq_len), backend


def build_model(cfg: RunConfig, data: TrainData, device: str, init: bool):
    """The VLM (optionally initialised from an LM checkpoint), frozen per freeze_llm, its optimizer and scaler."""
    tc = cfg.train
    model = VLM(cfg.model, data.fmt.vocab_size, data.index.width, data.fmt.image_token_id,
                newline=data.fmt.tiling == "anyres")
    if init and tc.init_from:
        init_from(model, tc.init_from, tc.allow_partial_init, data.manifest)
    freeze(model, tc.freeze_llm)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            **({"fused": True} if device.startswith("cuda") else {}))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype(tc, device) == torch.float16)
    return model, opt, scaler


class NonFinite:
    """The first step whose loss or gradient norm was not finite, flagged on the device (no host sync
    per step) and read by `check` at log steps and before every save. The sample indices of the steps
    since the last check stay on the host, so the error can name the cache rows the bad step read."""

    def __init__(self, device: str):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.samples: dict[int, list[np.ndarray]] = {}

    def update(self, step: int, stats: StepStats, index: list[np.ndarray]) -> None:
        bad = ~(torch.isfinite(stats.loss) & torch.isfinite(stats.grad_norm))
        self.first = torch.where(bad & (self.first < 0), step, self.first)
        self.samples[step] = index

    def check(self, train: Samples, ckpt: Checkpoints) -> None:
        """Raise RunFailed (one line, exit 1) if a step since the last check was not finite."""
        first = int(self.first)  # the host read: at log steps and saves only
        if first < 0:
            self.samples.clear()
            return
        rows = train.describe_rows(np.concatenate(self.samples[first]))
        since = f"resume from {ckpt.latest.name}" if ckpt.latest else "start over"
        raise RunFailed(f"train: non-finite loss or gradient norm at step {first} (no checkpoint written after it); "
                        f"that step read {rows}; check the cache with `python stages/embed.py --config <this "
                        f"config> --verify` (re-embed with --overwrite if a shard is bad), then rerun to {since}")


@contextlib.contextmanager
def deterministic(enabled: bool):
    """torch.use_deterministic_algorithms for the run only (restored after, also on errors)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def wrap(raw: VLM, cfg: RunConfig, dist: Dist):
    """torch.compile and DDP around the model as configured; checkpoints always save `raw`."""
    model = torch.compile(raw) if cfg.train.compile else raw
    if dist.is_distributed:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                    find_unused_parameters=cfg.model.use_moe)
    return model


def run_eval(model: VLM, data: TrainData, state: TrainState, log: MetricsLogger, dtype: torch.dtype,
             device: str) -> dict:
    """Held-out losses, rounded as metrics.jsonl holds them (and fit returns them), logged."""
    result = evaluate(model, data.eval_batches, data.codec, dtype, device) if len(data.val) else {}  # all ranks or none
    result = {k: round(v, 5) for k, v in result.items()}
    if not all(map(math.isfinite, result.values())):  # the training loss was finite (checked just before)
        finite = lambda b: math.isfinite(evaluate(model, [b], data.codec, dtype, device)["eval_loss"])  # noqa: E731
        bad = next((b for b in data.eval_batches if not finite(b)), None)
        rows = data.val.describe_rows(bad["index"]) if bad else "rows on another rank"
        raise RunFailed(f"train: held-out loss not finite at step {state.step} although the training loss is; the "
                        f"held-out batch read {rows}; check the cache with "
                        f"`python stages/embed.py --config <this config> --verify` (re-embed with --overwrite if a "
                        f"shard is bad), then rerun")
    if result:
        log.log({"step": state.step, "epoch": state.epoch, **result})
    return result


def fit(cfg: RunConfig, dist: Dist) -> dict:
    """Train per `cfg`; returns the final metrics row. Resumes from the newest checkpoint when asked. A run
    directory has one writer: a second run on it is refused before it reads or writes anything there
    (under torchrun rank 0 holds the lock for every rank; the others never write to the run directory)."""
    with WriterLock(cfg.train.run_dir, other="another train.run_name") if dist.is_main else contextlib.nullcontext():
        return _fit(cfg, dist)


def _fit(cfg: RunConfig, dist: Dist) -> dict:
    tc, run_dir, device = cfg.train, cfg.train.run_dir, dist.device
    torch.manual_seed(tc.seed + dist.rank)
    ckpt = Checkpoints(cfg, dist)
    packing, backend = batch_layout(cfg, device)
    data = load_data(cfg, dist, *ckpt.image_shape, packing=packing)
    total = tc.max_steps or tc.epochs * data.sampler.steps_per_epoch
    raw, opt, scaler = build_model(cfg, data, device, init=ckpt.latest is None)
    state = ckpt.restore(raw, opt, scaler)
    metrics_path = run_dir / "metrics.jsonl"
    if state.step >= total and (run_dir / "model.safetensors").is_file():
        print0(dist, f"train: {run_dir} already finished {state.step} steps; nothing to do (raise train.max_steps "
                     f"or train.epochs to train further)")
        return last_metrics(metrics_path)
    if ckpt.latest:
        print0(dist, f"train: resumed {run_dir} from {ckpt.latest.name} (epoch {state.epoch}, sample {state.sample})")
    model, dtype = wrap(raw, cfg, dist), amp_dtype(tc, device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(to_tree(cfg)))
    log = MetricsLogger(metrics_path, dist.is_main, state.step if ckpt.latest else None, open_wandb(cfg, dist.is_main))
    meter, health = Throughput(dist.world_size, peak_flops(device), flop_counts(raw)), NonFinite(device)
    reduced = f" -> {data.fmt.image_tokens} image tokens" if data.fmt.image_tokens != data.index.tokens else ""
    print0(dist, f"train: {len(data.train)} train / {len(data.val)} val samples (skipped: {data.describe_skips()}), "
                 f"{num_params(raw) / 1e6:.2f}M params ({num_params(raw, True) / 1e6:.2f}M trainable), "
                 f"{total} steps, T={data.index.tokens} D={data.index.width}{reduced}, "
                 f"{f'packed batches, attention {backend}' if tc.packing else 'padded batches'}"
                 f"{meter.assumed_peak()}")
    meta = {"image_tokens": data.index.tokens, "image_width": data.index.width}
    batches = step_batches(Loader(data.train, data.sampler, tc.num_workers), data.sampler, state)
    bar = tqdm(total=total, initial=state.step, unit="step", disable=not dist.is_main or None, mininterval=1.0)
    last = last_metrics(metrics_path) if ckpt.latest else {}
    model.train()
    at_once = (f"train: stopped at once by a second signal; rerun the same command to resume from "
               f"{run_dir / checkpoint.CKPT_DIR} (the steps since its last checkpoint are lost)")
    with deterministic(tc.deterministic), stop_requests(at_once if dist.is_main else "") as stop:
        while state.step < total:
            t0 = time.time()
            host = next(batches)
            mbs = [to_device(b, device, data.codec) for b in host]
            wait = time.time() - t0
            lr = lr_at(state.step, total, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            stats = train_step(model, opt, mbs, tc, scaler, dtype, device)
            state.step, state.sample = state.step + 1, state.sample + data.sampler.global_batch
            health.update(state.step, stats, [b["index"] for b in host])
            meter.add(host, data.train, wait)
            bar.update(1)
            log_step = state.step % tc.log_interval == 0 or state.step == total
            if log_step:
                health.check(data.train, ckpt)
                last = {"step": state.step, "epoch": state.epoch, "loss": round(stats.loss.item(), 5), "lr": lr,
                        "grad_norm": round(stats.grad_norm.item(), 4), **meter.row(),
                        "peak_mem_mb": round(peak_memory_mb(device), 1)}
                log.log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{last['samples_per_s']:.0f}")
                if not sys.stdout.isatty():  # no bar there: a line per log step
                    print0(dist, f"train: step {state.step}/{total} epoch {state.epoch} loss {last['loss']:.4f} "
                                 f"lr {lr:.2e} {last['samples_per_s']:.0f} samples/s")
                meter.reset()
            if tc.eval_interval and state.step % tc.eval_interval == 0 and state.step < total:
                health.check(data.train, ckpt)
                run_eval(raw, data, state, log, dtype, device)
            stopping = stop.agreed(dist, log_step)
            if ckpt.due(state.step, total) or stopping:
                health.check(data.train, ckpt)
                ckpt.save(state, {**meta, "lr": lr_at(state.step, total, tc)})
            if stopping:  # a stop signal: saved at this step boundary, now stop (one line, from rank 0)
                why = signal_name(stop.signum) if stop.requested else "a stop signal to another rank"
                raise Interrupted(stop.signum or signal.SIGTERM, "" if not dist.is_main else
                                  f"train: stopped at step {state.step} by {why}; checkpoint {ckpt.latest.name} "
                                  f"saved; rerun the same command to resume")
        bar.close()
        health.check(data.train, ckpt)
        result = run_eval(raw, data, state, log, dtype, device)
        ckpt.save(state, {**meta, "lr": lr_at(state.step, total, tc)})
    if dist.is_main:  # model.safetensors last: its presence marks a finished run
        checkpoint.save_final(run_dir, raw, VLMConfig.of_run(cfg, data.manifest, data.fmt), data.tokenizer)
    log.close()
    print0(dist, f"train: done {state.step} steps -> {run_dir}" + (
        f"; final eval_loss {result['eval_loss']:.4f}, shuffled-image eval_loss {result['eval_loss_shuffled']:.4f}, "
        f"image gap {result['image_gap']:.3f} nats" if result else " (no held-out samples, no eval)"))
    return {**last, **result}
