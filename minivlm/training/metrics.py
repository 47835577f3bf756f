"""What a training run reports: metrics.jsonl (plus wandb when asked), throughput and MFU.

Design choices:
- One logger for every rank: rank 0 writes, the other ranks hold a no-op, so the loop never asks who
  it is before logging.
- metrics.jsonl is written row by row and made to agree with the checkpoint a run resumes from: rows
  past its step are dropped, so a resumed run logs every step exactly once. A row for a step and kind
  (train or eval) that the file already holds is not written again: the end of a run may be rerun
  after a kill (minivlm.training.trainer) and must not log its final eval twice. A line cut short by a kill is dropped.
- Throughput counts what a reader can compare across runs: samples, real text tokens (no padding, no
  image placeholders) and image rows, per second. MFU (CUDA only) is model FLOPs per second over the
  device's peak dense bf16 FLOPs, from a table of known devices (MINIVLM_PEAK_TFLOPS overrides it).
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from minivlm.config import RunConfig, to_tree
from minivlm.fileio import append_text, atomic_write_text

# Peak dense bf16 FLOP/s by device-name substring (datasheet figures, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: str) -> float | None:
    """The assumed peak bf16 FLOP/s of a CUDA device (None on CPU or for a device not in the table)."""
    if not device.startswith("cuda"):
        return None
    env = os.environ.get("MINIVLM_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flop_counts(model) -> tuple[float, float]:
    """Train-step FLOPs per sequence position as (a, b): a + b * L for sequences of length L. Matmuls:
    forward 2P, input-gradient backward 2P (gradients reach the projector through every layer), weight-
    gradient backward 2P_trainable, the tied embedding counted once as the LM head; attention scores and
    values 12 * n_layer * dim per position of context. All trainable, this is nanoGPT's 6P + 12 L d T."""
    emb = model.model.embed_tokens.weight
    params = [p for p in model.parameters() if p is not emb]
    P = sum(p.numel() for p in params) + emb.numel()
    Pt = sum(p.numel() for p in params if p.requires_grad) + (emb.numel() if emb.requires_grad else 0)
    return 4 * P + 2 * Pt, 12 * model.cfg.n_layer * model.cfg.dim


def flops_per_token(model, seq_len: int) -> float:
    a, b = flop_counts(model)
    return a + b * seq_len


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Counts since the last log row, from the host side of each batch (no device read): samples, real text
    tokens, image rows, positions computed and how many of them were padding, model FLOPs (`flops`:
    `flop_counts` of the model), time spent waiting for data."""

    def __init__(self, world_size: int, peak: float | None, flops: tuple[float, float]):
        self.world_size, self.peak, self.flop_counts = world_size, peak, flops
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.samples, self.tokens, self.images, self.flops = time.time(), 0.0, 0, 0, 0, 0.0
        self.positions = self.padding = 0

    def add(self, batches: list[dict], dataset, wait: float) -> None:
        """One step's host batches (`index` and input_ids' shape) of `dataset` (minivlm.training.data.Samples)."""
        a, b = self.flop_counts
        for batch in batches:
            R, L = batch["input_ids"].shape  # rows: samples, or packed rows of several
            self.samples += len(batch["index"])
            self.tokens += dataset.text_tokens(batch["index"])
            self.images += dataset.image_rows(batch["index"])
            self.positions += R * L
            self.padding += R * L - dataset.positions(batch["index"])
            self.flops += R * L * (a + b * L)
        self.wait += wait

    def assumed_peak(self) -> str:
        return f"; mfu against an assumed {self.peak / 1e12:.0f} TFLOP/s bf16 peak" if self.peak else ""

    def row(self) -> dict:
        """Rates over every rank since the last reset (ranks run the same shapes in lockstep)."""
        dt, n = max(time.time() - self.t0, 1e-9), self.world_size
        out = {"samples_per_s": round(self.samples * n / dt, 2), "tokens_per_s": round(self.tokens * n / dt, 1),
               "image_rows_per_s": round(self.images * n / dt, 2), "data_wait": round(self.wait / dt, 4),
               "pad_frac": round(self.padding / max(self.positions, 1), 4)}
        if self.peak:
            out["mfu"] = round(self.flops / dt / self.peak, 4)  # per rank: each rank's own device
        return out


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_metrics(path: Path) -> dict:
    """The final train row merged with the final eval row, as fit returns them."""
    rows = read_rows(path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    return {**(train[-1] if train else {}), **(evals[-1] if evals else {})}


def _kind(row: dict) -> tuple[int, str]:
    return row["step"], "eval" if "eval_loss" in row else "train"


class MetricsLogger:
    """metrics.jsonl (and wandb) on rank 0, nothing elsewhere. `resume_step`: the checkpoint's step (rows
    past it are dropped), or None for a fresh run (the file starts empty)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, wandb=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb
        self.logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
            return
        kept = [r for r in read_rows(path) if r["step"] <= resume_step]
        if path.exists():
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.logged = {_kind(r) for r in kept}

    def log(self, row: dict) -> None:
        if not self.enabled or _kind(row) in self.logged:
            return
        append_text(self.path, json.dumps(row) + "\n")
        self.logged.add(_kind(row))
        if self.wandb:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()


def open_wandb(cfg: RunConfig, enabled: bool):
    """A wandb run when train.wandb is set (rank 0 only), else None."""
    if not (cfg.train.wandb and enabled):
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb=true needs wandb: pip install -e '.[wandb]'") from None
    return wandb.init(project=cfg.train.wandb_project, name=cfg.train.run_name, config=to_tree(cfg))
