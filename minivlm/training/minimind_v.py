"""MiniMind-V's VLM checkpoints (`pretrain_vlm_*.pth`, `sft_vlm_*.pth`) as `train.init_from`: their LM goes
through `minivlm.training.pretrained` like any MiniMind state dict; this module takes what is not LM.

Design choices:
- Upstream saves the VLM's `state_dict()` without `vision_encoder.*`, in fp16 (trainer/train_pretrain_vlm.py);
  its resume files (`checkpoints/*_resume.pth`, read through their `model` entry) keep the tower. The tower is
  not part of minivlm's model (stage 1 ran it; the cache holds its features): its tensors are skipped with a
  note, never loaded into anything.
- The projector is told by its tensor names (model/model_vlm.py of each generation):
  `vision_proj.vision_proj.0` is `VisionProj`, one Linear with bias (v1 of 2024 on CLIP ViT-B/32 with CLS;
  MiniMind2-V of 2025 on ViT-B/16 without): our `linear`. `vision_proj.mlp.{0,1,3}` is `MMVisionProjector`,
  LayerNorm -> Linear -> GELU -> Linear (minimind-3v, on SigLIP2's `last_hidden_state`): our `mlp`, the same
  layers at the same indices. It is loaded only into the same kind of projector with the same shapes; any
  other projector (another kind, other widths, a layout we do not know, such as the token-merging
  `MMVisionProjector` that concatenates four rows before its first Linear) is skipped with a note saying why,
  and ours keeps its initialisation.
- A projector is a function of the features it was trained on, which the file does not record: the configs
  (`minimind_v1.toml`, `minimind_v.toml`) embed what each generation fed it.
"""
from __future__ import annotations

import torch

from minivlm.training.model import VLM

TOWER, PROJECTOR = "vision_encoder.", "vision_proj."
# MiniMind-V's projector tensors -> ours, by our model.projector
LAYOUTS = {"linear": {f"vision_proj.vision_proj.0.{p}": f"projector.0.{p}" for p in ("weight", "bias")},
           "mlp": {f"vision_proj.mlp.{i}.{p}": f"projector.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}}
NAMES = {"linear": "VisionProj: one Linear", "mlp": "MMVisionProjector: LayerNorm -> Linear -> GELU -> Linear"}


def split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """An unprefixed state dict -> (LM tensors, projector tensors, vision tower tensors)."""
    parts: tuple[dict, dict, dict] = ({}, {}, {})
    for key, t in state.items():
        parts[1 if key.startswith(PROJECTOR) else 2 if key.startswith(TOWER) else 0][key] = t
    return parts


def _load_projector(model: VLM, projector: dict[str, torch.Tensor]) -> str:
    """Copy MiniMind-V's projector into ours if it is the same function; the note says what happened."""
    ours = model.cfg.projector
    kind = next((k for k, names in LAYOUTS.items() if set(names) == set(projector)), None)
    if kind is None:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in list(projector.items())[:4])
        return (f"projector not loaded: {shapes}{', ...' if len(projector) > 4 else ''} is no MiniMind-V projector "
                f"minivlm can compute; model.projector={ours} starts from its initialisation")
    if kind != ours:
        return (f"projector not loaded: the checkpoint's is {NAMES[kind]}, model.projector={ours} here; set "
                f"model.projector={kind} to load it")
    own = model.state_dict()
    wrong = [f"{theirs} {tuple(projector[theirs].shape)} vs {mine} {tuple(own[mine].shape)} here"
             for theirs, mine in LAYOUTS[kind].items() if projector[theirs].shape != own[mine].shape]
    if wrong:
        return (f"projector not loaded: shapes differ ({'; '.join(wrong[:2])}: the image row width D or model.dim "
                f"is another); it starts from its initialisation")
    with torch.no_grad():
        for theirs, mine in LAYOUTS[kind].items():
            own[mine].copy_(projector[theirs])
    return f"projector {kind} from {PROJECTOR}* ({NAMES[kind]}, {len(projector)} tensors)"


def load_parts(model: VLM, projector: dict[str, torch.Tensor], tower: dict[str, torch.Tensor]) -> list[str]:
    """The notes on a MiniMind-V checkpoint's non-LM tensors, after loading its projector where it fits."""
    notes = [_load_projector(model, projector)] if projector else []
    if tower:
        notes.append(f"skipped {len(tower)} vision tower tensors ({TOWER}*: stage 1's encoder, not part of this "
                     f"model)")
    return notes
