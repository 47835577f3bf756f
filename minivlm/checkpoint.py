"""Checkpoints and final weights: complete, self-describing, written atomically, loaded without pickle.

Layout of a run (`runs/<name>/`):
- `checkpoints/step-0000200/`: `model.safetensors` (unwrapped module), `train_state.pt` (optimizer,
  scaler, RNG states: tensors and plain containers only, loaded with `weights_only=True`) and
  `state.json` (step, epoch, batch cursor, world size, scheduler position). A checkpoint is built in
  `step-N.tmp/` and published with one directory rename, so a kill mid-write leaves the previous one.
- `model.safetensors` + `model_config.json` (VLM.save_pretrained) + `tokenizer/`: everything captioning needs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minivlm.fileio import atomic_write, fsync_dir, fsync_file

CKPT_DIR = "checkpoints"


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied embeddings share storage and safetensors refuses shared tensors: store clones (re-tied at load).
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_weights(path: Path, model: torch.nn.Module) -> None:
    state = cpu_state(model)
    atomic_write(path, lambda p: save_file(state, str(p)))


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
    tmp = d / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(cpu_state(model), str(tmp / "model.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. the end of a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(d)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    load_weights(path / "model.safetensors", model)
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return train_state, json.loads((path / "state.json").read_text())


def remove_stale(run_dir: Path) -> None:
    for tmp in (Path(run_dir) / CKPT_DIR).glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_final(run_dir: Path, model: torch.nn.Module, config, tokenizer) -> None:
    """The finished run: the tokenizer, then the model (VLM.save_pretrained; its config is written last)."""
    tokenizer.save_pretrained(str(Path(run_dir) / "tokenizer"))
    model.save_pretrained(run_dir, config)
