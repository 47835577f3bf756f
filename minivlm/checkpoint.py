"""Checkpoints and final weights: complete, self-describing, written atomically, loaded without pickle.

Layout of a run (`runs/<name>/`):
- `checkpoints/step-0000200/`: `model.safetensors` (unwrapped module), `train_state.pt` (optimizer,
  scaler, RNG states: tensors and plain containers only, loaded with `weights_only=True`) and
  `state.json` (step, epoch, batch cursor, world size, scheduler position). A checkpoint is built in
  `step-N.tmp/` and published with one directory rename, so a kill mid-write leaves the previous one; a
  full disk is refused up front (the tensors' size is known) or caught mid-write, naming the file.
- `model.safetensors` + `model_config.json` (VLM.save_pretrained) + `tokenizer/`: everything captioning
  needs; the weights are written last and mark a finished run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    """A checkpoint's state.json (step, epoch, batch, world size, T, D)."""
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
