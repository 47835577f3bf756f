"""A trained run, loaded for captioning: weights, tokenizer and the live encoder it was trained against.

Design choices:
- Everything comes from the run directory (`VLM.from_pretrained`, `tokenizer/`); the encoder is reloaded
  from the stored spec and its fingerprint must equal the one stage 1 recorded (other weights at the same
  path are refused, naming the field).
- Live features go through the same `load_image` / `tile_pixels` / `features` and the cache's codec
  (`Codec.encode`, then `decode` as training does) as stage 1, so a live row is the cached row, tile by tile.
- An image that cannot be read is reported for that image; the others are still captioned.
- A prompt with k `<image>` tags takes k images, in order, and gives one caption (each image where its tag
  stands, as training placed them); a prompt without tags captions each image on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minivlm.config import SEED
from minivlm.embedding.encoder import Encoder, EncoderSpec, ImageError, features, load_encoder, load_image, tile_pixels
from minivlm.embedding.shard import Codec
from minivlm.formats.records import IMAGE_TAG
from minivlm.training.layout import image_index
from minivlm.training.model import VLM, VLMConfig
from minivlm.training.text import TextFormat, decode, load_tokenizer, prompt_ids, text_format
from minivlm.use.generate import generate


# the sampling options' ranges, for stages/caption.py's options and the view page's fields alike
SAMPLING_RANGES = dict(max_new_tokens=">= 1", temperature=">= 0", top_k=">= 0", top_p="(0, 1]", seed=SEED)


@dataclass
class Captioner:
    model: VLM            # .config: the run's VLMConfig
    fmt: TextFormat
    device: str
    encoder: Encoder | None = None


def load_run(run_dir: str | Path, device: str = "cpu", with_encoder: bool = True) -> Captioner:
    run_dir = Path(run_dir)
    model = VLM.from_pretrained(run_dir)
    vc = model.config
    tcfg = replace(vc.tokenizer, name_or_path=str(run_dir / "tokenizer"))
    fmt = text_format(load_tokenizer(tcfg), tcfg, vc.image_tokens, vc.encoder.tiles)
    cap = Captioner(model.to(device), fmt, device)
    if with_encoder:
        cap.encoder = load_run_encoder(run_dir, vc, device)
    return cap


def load_run_encoder(run_dir: Path, vc: VLMConfig, device: str) -> Encoder:
    """The encoder from the run's stored spec, refused if its fingerprint differs from stage 1's."""
    enc = load_encoder(vc.encoder.encoder_config(), device, vc.encoder.storage_dtype)
    vc.encoder.check(EncoderSpec.of_encoder(enc), f"encoder {vc.encoder.name_or_path}",
                     f"the fingerprint run {run_dir} was trained with",
                     "restore the original encoder files, or re-embed and retrain")
    return enc


def live_features(cap: Captioner, paths: list[str | Path]) -> tuple[torch.Tensor | None, list, list[str | None]]:
    """(rows, T, D) features of the readable images' tiles, each image's in its policy's order (one tile an image
    with encoder.tiles = none), each readable image's layout (tile count, grid rows, grid cols, height, width),
    and a per-image error (None where it worked)."""
    enc = cap.encoder
    pixels, layouts, errors = [], [], []
    for p in paths:
        try:
            tiles, lay = tile_pixels(enc.processor, enc.tiling, load_image(p, enc.cfg.max_image_pixels))
            pixels.append(tiles)
            layouts.append((len(tiles), *lay))
            errors.append(None)
        except ImageError as e:
            errors.append(f"{p}: {e}")
    if not pixels:
        return None, layouts, errors
    codec = Codec(enc.fingerprint["storage_dtype"], enc.tokens, enc.width)
    return codec.decode(codec.encode(features(enc, torch.cat(pixels)))), layouts, errors


def caption_features(cap: Captioner, images: torch.Tensor, prompt: str = "", per_prompt: int = 1, layouts=None,
                     max_new_tokens: int = 48, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, on_token=None) -> list[str]:
    """Captions for (K, T, D) image rows, `per_prompt` images to a prompt (each the same prompt), in order;
    `layouts`: each image's (its rows: its tiles), None for one row an image. Prompts of untiled images are
    one batch; tiled images give prompts of other lengths (their grids), captioned one by one. `on_token(first,
    tokens)`: each step's new tokens of the prompts first, first + 1, ... as they are generated."""
    fmt, gen = cap.fmt, torch.Generator(device=cap.device).manual_seed(seed)
    layouts = [(1, 1, 1, 0, 0)] * len(images) if layouts is None else [tuple(x) for x in layouts]
    groups = [layouts[i:i + per_prompt] for i in range(0, len(layouts), per_prompt)]
    if fmt.tiling == "none":  # every prompt the same: one batch
        groups = [sum(groups, [])]
    out, at = [], 0
    for group in groups:
        step = None if on_token is None else (lambda tokens, first=len(out): on_token(first, tokens))
        n = len(group) // per_prompt  # prompts in this batch
        ids = torch.tensor([prompt_ids(fmt, prompt, per_prompt, group[:per_prompt])] * n, device=cap.device)
        rows = sum(lay[0] for lay in group)
        index = image_index(fmt.tiling, group, fmt.image_tokens, fmt.image_token) if fmt.tiling == "anyres" else None
        max_new = min(max_new_tokens, cap.model.cfg.max_seq_len - ids.size(1))
        out += generate(cap.model, ids, images[at:at + rows].to(cap.device), max_new, fmt.eos_id, temperature,
                        top_k, top_p, gen, image_index=None if index is None else torch.from_numpy(index).to(cap.device),
                        on_token=step)
        at += rows
    return [decode(fmt, row) for row in out]


def caption_files(cap: Captioner, paths: list[str | Path], prompt: str = "",
                  **kw) -> list[tuple[str, str | None, str | None]]:
    """(path, caption, error) per image: unreadable images get an error, the rest a caption. A prompt with k
    <image> tags takes the k images together: one caption, given as the first path's (None if one is unreadable)."""
    tags = prompt.count(IMAGE_TAG)
    if tags and tags != len(paths):
        raise ValueError(f"the prompt has {tags} {IMAGE_TAG} tag(s) but {len(paths)} image(s) were given; give one "
                         f"image per tag, in order")
    feats, layouts, errors = live_features(cap, paths)
    if tags:
        caption = caption_features(cap, feats, prompt, tags, layouts, **kw)[0] if not any(errors) else None
        return [(" + ".join(map(str, paths)), caption, "; ".join(filter(None, errors)) or None)]
    captions = iter(caption_features(cap, feats, prompt, 1, layouts, **kw) if feats is not None else [])
    return [(str(p), None if err else next(captions), err) for p, err in zip(paths, errors)]
