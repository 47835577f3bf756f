"""A run's checkpoints: the files (complete, self-describing, written atomically, loaded without pickle)
and the policy deciding when to write them and which one a run resumes from (`Checkpoints`).

Layout of a run (`runs/<name>/`):
- `checkpoints/step-0000200/`: `model.safetensors` (unwrapped module), `train_state.pt` (optimizer,
  scaler, RNG states: tensors and plain containers only, loaded with `weights_only=True`) and
  `state.json` (step, epoch, sample cursor, global batch and its split, scheduler position). A checkpoint
  is built in `step-N.tmp/` and published with one directory rename, so a kill mid-write leaves the
  previous one; a full disk is refused up front (the tensors' size is known) or caught mid-write, naming
  the file.
- `model.safetensors` + `model_config.json` (VLM.save_pretrained) + `tokenizer/`: everything captioning
  needs; the weights are written last and mark a finished run.

Design choices:
- The loop's position is one explicit `TrainState` (optimizer steps done, the epoch, samples of its
  order consumed), saved in every checkpoint's state.json, so a resumed run replays exactly the samples
  it would have seen, on any number of ranks whose global batch (batch_size x grad_accum x ranks) is the
  same; another global batch is refused, naming a setting that keeps it. A checkpoint of an earlier
  minivlm (a per-rank batch cursor) is read through its run's config.toml.
- A checkpoint holds the unwrapped model's weights, the optimizer, the grad scaler, every rank's RNG
  state (rank 0 writes them all, each rank restores its own) and the train state.
- Resume policy: `train.resume=auto` continues from the newest published checkpoint, refusing one
  written with another global batch or under settings that change what the run computes.
- Saving a step that is already saved does nothing: the end of a run that was killed after its final
  checkpoint reruns without rewriting (and without a window where no checkpoint of that step exists).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minivlm.config import RunConfig, load_config, to_tree
from minivlm.dist import Dist
from minivlm.fileio import atomic_dir, atomic_write, fsync_dir, reading, writing

CKPT_DIR = "checkpoints"


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied embeddings share storage and safetensors refuses shared tensors: store clones (re-tied at load).
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint file needs, give or take its headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def save_weights(path: Path, model: torch.nn.Module) -> None:
    state = cpu_state(model)
    atomic_write(path, lambda p: save_file(state, str(p)), needed=nbytes(state))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         f"was it written by another model config?")


def checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    found = [p for p in d.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, model: torch.nn.Module, train_state: dict, state: dict, keep: int) -> Path:
    d = Path(run_dir) / CKPT_DIR
    final = d / f"step-{state['step']:07d}"
    weights = cpu_state(model)

    def write(tmp: Path):
        with writing(tmp / "model.safetensors"):
            save_file(weights, str(tmp / "model.safetensors"))
        with writing(tmp / "train_state.pt"):  # torch's writer loses the errno: `writing` probes the disk
            torch.save(train_state, tmp / "train_state.pt")
        with writing(tmp / "state.json"):
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

    atomic_dir(final, write, needed=nbytes(weights) + nbytes(train_state))
    fsync_dir(d)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _damaged(path: Path) -> str:
    return f"delete {path} to resume from the checkpoint before it"


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, epoch, sample, the global batch and its split, T, D)."""
    with reading(path / "state.json", _damaged(path)):
        return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    with reading(path / "model.safetensors", _damaged(path)):
        load_weights(path / "model.safetensors", model)
    with reading(path / "train_state.pt", _damaged(path)):
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return train_state, read_state(path)


def remove_stale(run_dir: Path) -> None:
    for tmp in [*(Path(run_dir) / CKPT_DIR).glob("step-*.tmp"), Path(run_dir) / "tokenizer.tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)


def save_final(run_dir: Path, model: torch.nn.Module, config, tokenizer) -> None:
    """The finished run: the tokenizer, then the model (VLM.save_pretrained writes its weights last, so
    model.safetensors marks a finished run)."""
    atomic_dir(Path(run_dir) / "tokenizer", lambda tmp: tokenizer.save_pretrained(str(tmp)))
    model.save_pretrained(run_dir, config)


# --- the policy: when to save, what to restore ---------------------------------------------------

@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the sampler's cursor (epoch, samples of its order consumed)."""
    step: int = 0
    epoch: int = 0
    sample: int = 0


# Keys a resumed run may change: how long it runs and how it reports, not what it computes.
# batch_size and grad_accum may change with the number of ranks as long as the global batch does not
# (Checkpoints checks that); out_dir and run_name when the run directory was moved or copied.
RESUME_MAY_CHANGE = {"train": {"max_steps", "epochs", "num_workers", "eval_interval", "eval_batches", "save_interval",
                               "keep_checkpoints", "log_interval", "wandb", "wandb_project", "resume", "compile",
                               "batch_size", "grad_accum", "out_dir", "run_name"},
                     "encoder": {"batch_size", "num_workers", "dtype", "local_files_only", "max_image_pixels"},
                     "cache": {"dir", "shard_size", "max_failure_frac"}, "data": {"records", "image_root", "val_records",
                                                                                        "storage_options"},
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


def with_sample_cursor(state: dict, run_dir: Path) -> dict:
    """state.json with the global cursor. An earlier minivlm saved `batch`, the micro-batches each rank had
    read: rank r had read order[r::world] up to it, i.e. the first batch x batch_size x world samples. Its
    batch size and accumulation are the run's config.toml's (a resumed run could change neither then)."""
    if "sample" in state:
        return state
    path = Path(run_dir) / "config.toml"
    if "batch" not in state or not path.is_file():
        raise ValueError(f"{run_dir}: its newest checkpoint has no sample cursor and the run no config.toml; "
                         f"set train.resume=never to start it over")
    old = load_config(path).train
    return {**state, "sample": state["batch"] * old.batch_size * state["world_size"], "batch_size": old.batch_size,
            "grad_accum": old.grad_accum, "global_batch": old.batch_size * old.grad_accum * state["world_size"]}


def check_global_batch(saved: dict, now: dict, path: Path) -> None:
    """Refuse to resume with another global batch: the cursor and every later step would mean other samples."""
    if saved["global_batch"] == now["global_batch"]:
        return
    g, bs, accum, world = saved["global_batch"], now["batch_size"], now["grad_accum"], now["world_size"]
    if g % (bs * world) == 0:
        keep = f"set train.grad_accum={g // (bs * world)}"
    elif g % (accum * world) == 0:
        keep = f"set train.batch_size={g // (accum * world)}"
    else:
        keep = f"run on {saved['world_size']} rank(s) as it was"
    raise ValueError(f"{path} was trained with a global batch of {g} (train.batch_size={saved['batch_size']} x "
                     f"train.grad_accum={saved['grad_accum']} x {saved['world_size']} rank(s)), this run's is "
                     f"{now['global_batch']} ({bs} x {accum} x {world}); {keep} to keep {g}, or set "
                     f"train.resume=never to start over")


class Checkpoints:
    """Finds the checkpoint to resume from (at construction, before the model exists), restores it, and
    saves every `train.save_interval` steps, on a stop request and at the end."""

    def __init__(self, cfg: RunConfig, dist: Dist):
        tc = cfg.train
        self.run_dir, self.dist, self.interval, self.keep = tc.run_dir, dist, tc.save_interval, tc.keep_checkpoints
        self.split = {"batch_size": tc.batch_size, "grad_accum": tc.grad_accum, "world_size": dist.world_size,
                      "global_batch": tc.batch_size * tc.grad_accum * dist.world_size}
        found = checkpoints(self.run_dir) if tc.resume == "auto" else []
        self.latest: Path | None = found[-1] if found else None
        self.saved = with_sample_cursor(read_state(self.latest), self.run_dir) if self.latest else None
        if self.saved:
            check_global_batch(self.saved, self.split, self.latest)
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
                remove_stale(self.run_dir)
            return TrainState()
        train_state, _ = load_checkpoint(self.latest, model)
        opt.load_state_dict(train_state["optimizer"])
        scaler.load_state_dict(train_state["scaler"])
        rank = self.dist.rank
        if rank < len(train_state["rng"]):  # a rank the checkpoint had (on more ranks now, the others keep their seed)
            torch.set_rng_state(train_state["rng"][rank])
            if self.dist.device.startswith("cuda") and train_state.get("cuda_rng"):
                torch.cuda.set_rng_state(train_state["cuda_rng"][rank])
        return TrainState(self.saved["step"], self.saved["epoch"], self.saved["sample"])

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
        self.saved = {**asdict(state), **self.split, **meta}
        if self.dist.is_main:
            train_state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                           "cuda_rng": cuda_rng}
            save_checkpoint(self.run_dir, model, train_state, self.saved, self.keep)
        self.latest = Path(self.run_dir) / CKPT_DIR / f"step-{state.step:07d}"  # every rank: for messages


def _gather_rng(dist: Dist, state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's RNG state (rank 0 saves them all, each rank restores its own)."""
    if not dist.is_distributed:
        return [state]
    out = [torch.empty_like(state) for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(out, state)
    return out
