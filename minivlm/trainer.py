"""Stage 2: train the VLM from the cache. `train_step` is the whole optimisation step; `fit` only
decides when to step, evaluate, checkpoint and log.

Design choices:
- No vision forward and no image decoding: batches are cached rows + tokens (minivlm.data).
- AdamW (fused on CUDA), no decay on norms/biases/embeddings, linear warmup then cosine to min_lr.
- Gradient accumulation with DDP `no_sync` on every micro-step but the last; AMP bf16 on CUDA by
  default (fp16 with GradScaler as an option), fp32 on CPU.
- Exact resume: the checkpoint holds weights, optimizer, scaler, RNG states and the sampler cursor
  (epoch, batch); a resumed run replays the same batches with the same state and ends bitwise equal
  on CPU with deterministic settings.
- eval_loss_shuffled: the same eval batches with images rolled across the batch. The gap to
  eval_loss is how much the model uses the image (and proof that rows stay aligned with records).
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minivlm import checkpoint
from minivlm.config import RunConfig, TrainConfig, load_config, to_toml, to_tree
from minivlm.data import BatchSampler, CacheBatches, Loader, load_splits, open_cache, split_tokens
from minivlm.dist import Dist, print0
from minivlm.fileio import atomic_write_text
from minivlm.model import VLM, VLMConfig, freeze, num_params, param_groups
from minivlm.pretrained import init_from
from minivlm.text import IGNORE, load_tokenizer, text_format


@dataclass(frozen=True)
class StepStats:
    loss: float
    grad_norm: float
    samples: int
    tokens: int


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


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, opt, micro_batches: list[dict], cfg: TrainConfig, scaler, dtype: torch.dtype,
               device: str) -> StepStats:
    """One optimizer step over `micro_batches` (already on device): accumulate, clip, step, zero."""
    n = len(micro_batches)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast(dtype, device):
                out = model(mb["input_ids"], mb["images"], mb["labels"])
            scaler.scale(out.loss / n).backward()
        total += out.loss.detach()
    scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    samples = sum(len(mb["input_ids"]) for mb in micro_batches)
    tokens = sum(int(mb["input_ids"].numel()) for mb in micro_batches)
    return StepStats(float(total) / n, float(grad_norm), samples, tokens)


@torch.no_grad()
def evaluate(model: VLM, batches: list[dict], dtype: torch.dtype, device: str) -> dict:
    """Token-weighted eval loss with true images and with images rolled across the batch."""
    was_training = model.training
    model.eval()
    sums = {"eval_loss": 0.0, "eval_loss_shuffled": 0.0}
    count = 0
    for batch in batches:
        b = to_device(batch, device)
        rows = b["has_image"].nonzero().flatten()
        shuffled = b["images"].clone()
        shuffled[rows] = b["images"][rows.roll(1)]  # every image row gets another row's image
        for name, images in (("eval_loss", b["images"]), ("eval_loss_shuffled", shuffled)):
            with autocast(dtype, device):
                logits = model(b["input_ids"], images).logits
            sums[name] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                          ignore_index=IGNORE, reduction="sum").item()
        count += int((b["labels"][:, 1:] != IGNORE).sum())
    if torch.distributed.is_initialized():
        t = torch.tensor([sums["eval_loss"], sums["eval_loss_shuffled"], count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        sums["eval_loss"], sums["eval_loss_shuffled"], count = t[0].item(), t[1].item(), int(t[2].item())
    model.train(was_training)
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["image_gap"] = out["eval_loss_shuffled"] - out["eval_loss"]
    return out




def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_metrics(path: Path) -> dict:
    """The final train row merged with the final eval row, as fit returns them."""
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    return {**(train[-1] if train else {}), **(evals[-1] if evals else {})}


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        elif enabled and resume_step is None:
            path.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


@dataclass
class TrainData:
    manifest: dict
    index: object              # cache.CacheIndex
    tokenizer: object
    fmt: object                # text.TextFormat
    train: CacheBatches
    sampler: BatchSampler
    eval_batches: list[dict]   # held-out batches, read once and kept in memory
    n_val: int
    dropped: int               # records whose image is not in the cache


def load_data(cfg: RunConfig, dist: Dist, tokens: int | None = None, width: int | None = None) -> TrainData:
    """Validate the cache, join records with rows, tokenizer + format, the resumable sampler, eval batches."""
    tc = cfg.train
    manifest, index = open_cache(cfg, tokens, width)
    tok = load_tokenizer(cfg.tokenizer)
    fmt = text_format(tok, cfg.tokenizer, index.tokens)
    train_split, val_split = load_splits(cfg, index)
    if not train_split.records:
        raise ValueError(f"no training samples: none of {cfg.data.records}'s images are in cache {cfg.cache.dir}")
    pin, text_dir = dist.device.startswith("cuda"), Path(cfg.cache.dir) / "text"
    train_ds = CacheBatches(train_split, index, fmt, pin,
                            split_tokens(fmt, train_split, text_dir, save=dist.is_main, progress=dist.is_main))
    val_ds = CacheBatches(val_split, index, fmt, pin, split_tokens(fmt, val_split, text_dir, save=dist.is_main))
    sampler = BatchSampler(train_ds, tc.batch_size, tc.seed, dist.rank, dist.world_size)
    if len(sampler) < tc.grad_accum:
        raise ValueError(f"{len(train_ds)} training samples make no full step of train.batch_size={tc.batch_size} x "
                         f"train.grad_accum={tc.grad_accum} x {dist.world_size} ranks; lower the batch size")
    val_sampler = BatchSampler(val_ds, tc.batch_size, tc.seed, dist.rank, dist.world_size, shuffle=False)
    eval_batches = [val_ds[ix] for ix in val_sampler.batches(0)[:tc.eval_batches]] if len(val_sampler) else []
    val_ds.close()
    return TrainData(manifest, index, tok, fmt, train_ds, sampler, eval_batches, len(val_ds),
                     train_split.dropped + val_split.dropped)


def build_model(cfg: RunConfig, data: TrainData, device: str, init: bool):
    """The VLM (optionally initialised from an LM checkpoint), frozen per freeze_llm, its optimizer and scaler."""
    tc = cfg.train
    model = VLM(cfg.model, data.fmt.vocab_size, data.index.width, data.fmt.image_token_id)
    if init and tc.init_from:
        init_from(model, tc.init_from, tc.allow_partial_init, data.manifest)
    freeze(model, tc.freeze_llm)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            **({"fused": True} if device.startswith("cuda") else {}))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype(tc, device) == torch.float16)
    return model, opt, scaler


def restore(path: Path, model, opt, scaler, dist: Dist) -> dict:
    """Load a checkpoint into model/optimizer/scaler and this rank's RNG; returns its state.json."""
    train_state, state = checkpoint.load_checkpoint(path, model)
    opt.load_state_dict(train_state["optimizer"])
    scaler.load_state_dict(train_state["scaler"])
    torch.set_rng_state(train_state["rng"][dist.rank])
    if dist.device.startswith("cuda") and train_state.get("cuda_rng"):
        torch.cuda.set_rng_state(train_state["cuda_rng"][dist.rank])
    return state


# Keys a resumed run may change: how long it runs and how it reports, not what it computes.
RESUME_MAY_CHANGE = {"train": {"max_steps", "epochs", "num_workers", "eval_interval", "eval_batches", "save_interval",
                               "keep_checkpoints", "log_interval", "wandb", "wandb_project", "resume", "compile"},
                     "encoder": {"batch_size", "num_workers", "dtype", "local_files_only", "max_image_pixels"},
                     "cache": {"dir", "shard_size", "max_failure_frac"}, "data": {"records", "image_root", "val_records"},
                     "tokenizer": {"name_or_path"}}


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to continue a run under settings that change what it computes (a silent mix of two runs)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return
    old, new = to_tree(load_config(path)), to_tree(cfg)
    changed = [f"{sec}.{k}: {old[sec][k]!r} -> {v!r}" for sec, values in new.items() for k, v in values.items()
               if old[sec][k] != v and k not in RESUME_MAY_CHANGE.get(sec, ())]
    if changed:
        raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(changed[:3])}); use a new "
                         f"train.run_name, or train.resume=never to start it over")


def fit(cfg: RunConfig, dist: Dist) -> dict:
    """Train per `cfg`; returns the final metrics row. Resumes from the newest checkpoint when asked."""
    tc, run_dir, device = cfg.train, cfg.train.run_dir, dist.device
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    ckpts = checkpoint.checkpoints(run_dir) if tc.resume == "auto" else []
    saved = json.loads((ckpts[-1] / "state.json").read_text()) if ckpts else None
    if saved and saved["world_size"] != dist.world_size:
        raise ValueError(f"{ckpts[-1]} was written by {saved['world_size']} rank(s), this run has "
                         f"{dist.world_size}; resume with the same --nproc_per_node or set train.resume=never")
    if saved:
        check_resumable(cfg, run_dir)
    data = load_data(cfg, dist, *((saved["image_tokens"], saved["image_width"]) if saved else (None, None)))
    sampler, index = data.sampler, data.index
    total_steps = tc.max_steps or tc.epochs * (len(sampler) // tc.grad_accum)
    raw, opt, scaler = build_model(cfg, data, device, init=not ckpts)
    dtype = amp_dtype(tc, device)

    step, epoch, batch_pos = 0, 0, 0
    if ckpts:
        state = restore(ckpts[-1], raw, opt, scaler, dist)
        step, epoch, batch_pos = state["step"], state["epoch"], state["batch"]
        if step >= total_steps and (run_dir / "model.safetensors").is_file():
            print0(dist, f"train: {run_dir} already finished {step} steps; nothing to do (raise train.max_steps or "
                         f"train.epochs to train further)")
            return last_metrics(run_dir / "metrics.jsonl")
        print0(dist, f"train: resumed {run_dir} from {ckpts[-1].name} (epoch {epoch}, batch {batch_pos})")
    elif dist.is_main:
        checkpoint.remove_stale(run_dir)
    model = torch.compile(raw) if tc.compile else raw
    if dist.is_distributed:
        model = DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None,
                    find_unused_parameters=cfg.model.use_moe)

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(to_tree(cfg)))
    log = MetricsLog(run_dir / "metrics.jsonl", dist.is_main, step if ckpts else None)
    wandb = _wandb(cfg, dist)
    print0(dist, f"train: {len(data.train)} train / {data.n_val} val samples ({data.dropped} dropped: image not "
                 f"in cache), {num_params(raw) / 1e6:.2f}M params ({num_params(raw, True) / 1e6:.2f}M trainable), "
                 f"{total_steps} steps, T={index.tokens} D={index.width}")
    loader = Loader(data.train, sampler, tc.num_workers)

    def save(final: bool = False):
        state = {"step": step, "epoch": epoch, "batch": batch_pos, "world_size": dist.world_size,
                 "image_tokens": index.tokens, "image_width": index.width, "lr": lr_at(step, total_steps, tc)}
        rng, cuda_rng = _gather_rng(dist, torch.get_rng_state()), None
        if device.startswith("cuda"):
            cuda_rng = _gather_rng(dist, torch.cuda.get_rng_state())
        if dist.is_main:
            train_state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                           "cuda_rng": cuda_rng}
            checkpoint.save_checkpoint(run_dir, raw, train_state, state, tc.keep_checkpoints)
            if final:
                checkpoint.save_final(run_dir, raw, VLMConfig.of_run(cfg, data.manifest, data.fmt), data.tokenizer)

    def run_eval() -> dict:
        result = evaluate(raw, data.eval_batches, dtype, device) if data.eval_batches else {}
        result = {k: round(v, 5) for k, v in result.items()}  # what metrics.jsonl holds, fit returns
        if result:
            row = {"step": step, "epoch": epoch, **result}
            log.write(row)
            wandb and wandb.log(row, step=step)
        return result

    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not dist.is_main or None, mininterval=1.0)
    last: dict = {}
    model.train()
    t_log, wait, samples, tokens = time.time(), 0.0, 0, 0
    with stop_requests() as stop:
        while step < total_steps:
            sampler.set_position(epoch, batch_pos)
            it = iter(loader)
            while step < total_steps and batch_pos + tc.grad_accum <= len(sampler):
                t0 = time.time()
                mbs = [to_device(next(it), device) for _ in range(tc.grad_accum)]
                wait += time.time() - t0
                lr = lr_at(step, total_steps, tc)
                for g in opt.param_groups:
                    g["lr"] = lr
                stats = train_step(model, opt, mbs, tc, scaler, dtype, device)
                step, batch_pos = step + 1, batch_pos + tc.grad_accum
                samples, tokens = samples + stats.samples, tokens + stats.tokens
                bar.update(1)
                if step % tc.log_interval == 0 or step == total_steps:
                    dt = time.time() - t_log
                    last = {"step": step, "epoch": epoch, "loss": round(stats.loss, 5), "lr": lr,
                            "grad_norm": round(stats.grad_norm, 4), "samples_per_s": round(samples * dist.world_size / dt, 2),
                            "tokens_per_s": round(tokens * dist.world_size / dt, 1), "data_wait": round(wait / dt, 4),
                            "peak_mem_mb": round(peak_memory_mb(device), 1)}
                    log.write(last)
                    wandb and wandb.log(last, step=step)
                    bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lr:.2e}", sps=f"{last['samples_per_s']:.0f}")
                    t_log, wait, samples, tokens = time.time(), 0.0, 0, 0
                if tc.eval_interval and step % tc.eval_interval == 0 and step < total_steps:
                    run_eval()
                if tc.save_interval and step % tc.save_interval == 0 and step < total_steps:
                    save()
                if stop.agreed(dist):  # Ctrl-C / SIGTERM: save at this step boundary, then stop
                    save()
                    print0(dist, f"\ntrain: stopped at step {step}; checkpoint saved; rerun the same command to resume")
                    raise KeyboardInterrupt
            if step < total_steps:
                epoch, batch_pos = epoch + 1, 0
    bar.close()
    result = run_eval()
    save(final=True)
    if wandb:
        wandb.finish()
    final = {**last, **result}
    if result:
        print0(dist, f"train: done {step} steps -> {run_dir}; final eval_loss {result['eval_loss']:.4f}, "
                     f"shuffled-image eval_loss {result['eval_loss_shuffled']:.4f}, image gap "
                     f"{result['image_gap']:.3f} nats")
    else:
        print0(dist, f"train: done {step} steps -> {run_dir} (no held-out samples, no eval)")
    return final


class stop_requests(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM during training ask for a stop at the next step boundary, so the checkpoint written
    then is consistent. A second Ctrl-C interrupts at once. Ranks agree on the step to stop at."""

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, dist: Dist) -> bool:
        if not dist.is_distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _gather_rng(dist: Dist, state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's RNG state (rank 0 saves them all, each rank restores its own)."""
    if not dist.is_distributed:
        return [state]
    out = [torch.empty_like(state) for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(out, state)
    return out


def _wandb(cfg: RunConfig, dist: Dist):
    if not (cfg.train.wandb and dist.is_main):
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb=true needs wandb: pip install -e '.[wandb]'") from None
    return wandb.init(project=cfg.train.wandb_project, name=cfg.train.run_name, config=to_tree(cfg))
