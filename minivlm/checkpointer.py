"""The run's checkpoint policy: when to save, what a checkpoint holds, and which one a run resumes from.

Design choices:
- The loop's position is one explicit `TrainState` (optimizer steps done, sampler epoch and batch),
  saved in every checkpoint's state.json, so a resumed run replays exactly the batches it would have seen.
- A checkpoint holds the unwrapped model's weights, the optimizer, the grad scaler, every rank's RNG
  state (rank 0 writes them all, each rank restores its own) and the train state; the files are
  written by `minivlm.checkpoint` (temp directory, fsync, one rename).
- Resume policy: `train.resume=auto` continues from the newest published checkpoint, refusing one
  written by another world size or under settings that change what the run computes.
- Saving a step that is already saved does nothing: the end of a run that was killed after its final
  checkpoint reruns without rewriting (and without a window where no checkpoint of that step exists).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minivlm import checkpoint
from minivlm.config import RunConfig, load_config, to_tree
from minivlm.dist import Dist


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the sampler's cursor (epoch, batch within it)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


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


class Checkpointer:
    """Finds the checkpoint to resume from (at construction, before the model exists), restores it, and
    saves every `train.save_interval` steps, on a stop request and at the end."""

    def __init__(self, cfg: RunConfig, dist: Dist):
        tc = cfg.train
        self.run_dir, self.dist, self.interval, self.keep = tc.run_dir, dist, tc.save_interval, tc.keep_checkpoints
        found = checkpoint.checkpoints(self.run_dir) if tc.resume == "auto" else []
        self.latest: Path | None = found[-1] if found else None
        self.saved = checkpoint.read_state(self.latest) if self.latest else None
        if self.saved and self.saved["world_size"] != dist.world_size:
            raise ValueError(f"{self.latest} was written by {self.saved['world_size']} rank(s), this run has "
                             f"{dist.world_size}; resume with the same --nproc_per_node or set train.resume=never")
        if self.saved:
            check_resumable(cfg, self.run_dir)
        self.parts = None  # (model, optimizer, scaler) once restore() has seen them

    @property
    def image_shape(self) -> tuple[int | None, int | None]:
        """(T, D) the resumed model was built for; (None, None) for a fresh run."""
        return (self.saved["image_tokens"], self.saved["image_width"]) if self.saved else (None, None)

    def restore(self, model: torch.nn.Module, opt, scaler) -> TrainState:
        """Load the newest checkpoint into model/optimizer/scaler and this rank's RNG; a fresh run starts at
        step 0 and rank 0 clears half-written checkpoints of an earlier attempt."""
        self.parts = (model, opt, scaler)
        if self.latest is None:
            if self.dist.is_main:
                checkpoint.remove_stale(self.run_dir)
            return TrainState()
        train_state, state = checkpoint.load_checkpoint(self.latest, model)
        opt.load_state_dict(train_state["optimizer"])
        scaler.load_state_dict(train_state["scaler"])
        torch.set_rng_state(train_state["rng"][self.dist.rank])
        if self.dist.device.startswith("cuda") and train_state.get("cuda_rng"):
            torch.cuda.set_rng_state(train_state["cuda_rng"][self.dist.rank])
        return TrainState(state["step"], state["epoch"], state["batch"])

    def due(self, step: int, total: int) -> bool:
        return bool(self.interval) and step % self.interval == 0 and step < total

    def save(self, state: TrainState, meta: dict) -> None:
        """A checkpoint of `state` (every rank calls this: the RNG states are gathered). `meta`: facts a
        resumed run needs before it builds the model (image T and D) and the LR, for the reader."""
        if self.saved and self.saved["step"] == state.step:
            return  # already on disk: the end of a run resumed from its final checkpoint
        model, opt, scaler = self.parts
        rng = _gather_rng(self.dist, torch.get_rng_state())
        cuda_rng = _gather_rng(self.dist, torch.cuda.get_rng_state()) if self.dist.device.startswith("cuda") else None
        self.saved = {**asdict(state), "world_size": self.dist.world_size, **meta}
        if self.dist.is_main:
            train_state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                           "cuda_rng": cuda_rng}
            checkpoint.save_checkpoint(self.run_dir, model, train_state, self.saved, self.keep)
        self.latest = Path(self.run_dir) / checkpoint.CKPT_DIR / f"step-{state.step:07d}"  # every rank: for messages


def _gather_rng(dist: Dist, state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's RNG state (rank 0 saves them all, each rank restores its own)."""
    if not dist.is_distributed:
        return [state]
    out = [torch.empty_like(state) for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(out, state)
    return out
