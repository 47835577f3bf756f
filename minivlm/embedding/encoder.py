"""The frozen vision tower: image decoding, preprocessing, feature selection and the fingerprint.

Design choices:
- `load_image` + `tile_pixels` + `features` are the only path from an image file to features. Stage 1 runs
  them in bulk and captioning runs them live, so a cached row and a live row are the same numbers.
- `tile_pixels` cuts a decoded image into its tiles (`encoder.tiles`, minivlm.embedding.tiles) and runs the
  tower's own processor on each one, so each tile is one row of the tower's (T, D); with `none` the one tile is
  the whole image, preprocessed as it was before tiles (the same pixels, the same rows).
- Any CLIP-family vision tower (`CLIPVisionModel`, `SiglipVisionModel`) by hub id or directory, through
  `from_pretrained` (never `trust_remote_code`). Layers after `select_layer` are dropped at load: they
  would be computed and thrown away.
- Features are `hidden_states[select_layer]`, with `post_layernorm` the tower's own post_layernorm applied
  to it (at -1 SigLIP's `last_hidden_state`, which MiniMind-V feeds its projector; CLIP normalises only its
  pooled CLS, so it refuses the option), CLS dropped unless `keep_cls`, then k x k average pooling of the
  patch grid; stored by the cache's codec (`cache.dtype`, minivlm.embedding.shard: float16 by default).
- The fingerprint hashes everything that changes the numbers: the weights (tensor bytes, so the same
  path with other weights differs), the processor config and class (transformers picks a torchvision-
  based processor where torchvision is installed and a PIL one elsewhere; their resampling differs),
  the compute dtype (fp16 on CUDA, fp32 on CPU by default), select_layer, keep_cls, pool, post_layernorm,
  the tiling policy with the one setting it reads (split: max_tiles, anyres: grid_pinpoints) and storage
  dtype. Fields added after caches existed are written only where they differ from their default (an
  untiled cache keeps its fingerprint id). `fingerprint` is always that dict of components (a mismatch
  names the field that differs); `fingerprint_id` its short hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from minivlm.config import EncoderConfig
from minivlm.embedding import tiles

SPEC_FIELDS = ("select_layer", "keep_cls", "pool")
CONFIG_NAMES = {"storage_dtype": "cache.dtype"}  # fingerprint fields set outside [encoder]
# Fingerprint fields added after caches were built: listed only when not their default, so older caches keep
# their fingerprint, and read back as the default where absent.
ADDED_FIELDS = {"post_layernorm": False, "tiles": "none", "max_tiles": 4, "grid_pinpoints": []}


class ImageError(Exception):
    """An image that cannot be embedded; the message is the reason written to failures.jsonl."""


def load_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Decode any image file to RGB (EXIF orientation, alpha on white, CMYK, 16-bit), or raise ImageError."""
    path = Path(path)
    if not path.is_file():
        raise ImageError("missing")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    return _decode(path, max_pixels)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """`load_image` for image bytes stored inside a file (Parquet, tar): the same decoding, so a row is the
    same numbers whichever layout held the image."""
    if not data:
        raise ImageError("empty image bytes (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(fp, max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = None  # we apply our own bound below, as an error, not a warning
    try:
        with Image.open(fp) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"too large ({w}x{h} > encoder.max_image_pixels={max_pixels}; decompression bomb?)")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"unreadable ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits instead of clipping
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(processor, image: Image.Image) -> torch.Tensor:
    """One RGB image -> pixel tensor (3, H, W) with the encoder's own processor."""
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def tile_pixels(processor, tiling: tiles.Tiling, image: Image.Image) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One decoded image -> its tiles' pixels (n, 3, S, S) in the policy's order, each through the tower's own
    processor, and its layout (grid rows, grid cols, height, width): what stage 1 caches as n rows, and captioning
    computes live. Stage 2 lays the tiles out by it (LLaVA-NeXT's unpad needs the image's own size)."""
    parts, grid = tiles.cut(image, tiling)
    return torch.stack([preprocess(processor, part) for part in parts]), (*grid, image.height, image.width)


@dataclass
class Encoder:
    model: torch.nn.Module
    processor: object
    cfg: EncoderConfig
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict            # components; `fingerprint_id(fingerprint)` is the short hash
    tokens: int                  # T: rows per tile after CLS handling and pooling
    width: int                   # D
    tiling: tiles.Tiling         # how an image becomes tiles (`tile_pixels`)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def processor_hash(processor) -> str:
    d = {k: v for k, v in processor.to_dict().items() if not k.startswith("_") and k != "image_processor_type"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_id(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]


def spec_of(cfg: EncoderConfig, storage_dtype: str = "float16") -> dict:
    """The part of the fingerprint that the config alone determines (checked without loading weights)."""
    spec = {"select_layer": cfg.select_layer, "keep_cls": cfg.keep_cls, "pool": cfg.pool, "storage_dtype": storage_dtype}
    unread = {k for ks in tiles.SETTINGS.values() for k in ks} - set(tiles.SETTINGS[cfg.tiles])
    return {**spec, **{k: getattr(cfg, k) for k, default in ADDED_FIELDS.items()
                       if k not in unread and getattr(cfg, k) != default}}


@dataclass(frozen=True)
class EncoderSpec:
    """Which features a cache holds: the encoder, how its features are selected, and, once the encoder
    has been loaded, its fingerprint components. Stored in the manifest and in every run; `check` is the
    one comparison every stage makes (embed, train, caption, evaluate, sweep, export)."""
    name_or_path: str
    select_layer: int
    keep_cls: bool
    pool: int
    compute_dtype: str = "auto"
    fingerprint: dict = field(default_factory=dict)  # fingerprint components; spec_of(cfg) alone from a config

    @classmethod
    def of_config(cls, cfg: EncoderConfig, storage_dtype: str = "float16") -> EncoderSpec:
        return cls(cfg.name_or_path, cfg.select_layer, cfg.keep_cls, cfg.pool, cfg.dtype, spec_of(cfg, storage_dtype))

    @classmethod
    def of_encoder(cls, enc: Encoder) -> EncoderSpec:
        return cls(enc.cfg.name_or_path, enc.cfg.select_layer, enc.cfg.keep_cls, enc.cfg.pool,
                   str(enc.dtype).removeprefix("torch."), dict(enc.fingerprint))

    @classmethod
    def of_manifest(cls, manifest: dict) -> EncoderSpec:
        return cls(**manifest["encoder"])

    def as_json(self) -> dict:
        """The manifest's and model_config.json's `encoder` entry (fingerprint fields included)."""
        return asdict(self)

    @property
    def storage_dtype(self) -> str:
        """How the cache stores rows (`cache.dtype`): live features go through the same codec."""
        return self.fingerprint.get("storage_dtype", "float16")

    @property
    def post_layernorm(self) -> bool:
        return self.complete_fingerprint["post_layernorm"]

    @property
    def tiles(self) -> str:
        """The tiling policy (`encoder.tiles`): `none` for a cache of one row an image."""
        return self.complete_fingerprint["tiles"]

    @property
    def complete_fingerprint(self) -> dict:
        """The fingerprint with the fields it predates at their defaults."""
        return {**ADDED_FIELDS, **self.fingerprint}

    def encoder_config(self, **kw) -> EncoderConfig:
        """An EncoderConfig that loads this encoder again (kw: batch size, workers, ...)."""
        fp = self.complete_fingerprint
        return EncoderConfig(name_or_path=self.name_or_path, select_layer=self.select_layer, keep_cls=self.keep_cls,
                             pool=self.pool, post_layernorm=self.post_layernorm, dtype=self.compute_dtype,
                             tiles=fp["tiles"], max_tiles=fp["max_tiles"], grid_pinpoints=fp["grid_pinpoints"], **kw)

    def differs(self, other: EncoderSpec) -> list[str]:
        """Fields that differ: every fingerprint field both sides know. Until both are loaded (a config
        against a config) the weights are known only by their path, so the path counts too."""
        a, b = self.complete_fingerprint, other.complete_fingerprint
        wrong = [k for k in a if k in b and a[k] != b[k]]
        if not wrong and "weights" in a and "weights" in b and a != b:  # a field only one side has
            wrong = ["fingerprint"]
        if "weights" not in a and "weights" not in b and self.name_or_path != other.name_or_path:
            wrong.insert(0, "name_or_path")
        return wrong

    def value(self, name: str):
        special = {"name_or_path": self.name_or_path, "fingerprint": fingerprint_id(self.fingerprint)}
        return special[name] if name in special else self.complete_fingerprint.get(name)

    def check(self, other: EncoderSpec, subject: str, reference: str, fix: str) -> None:
        """Raise one line naming each field where `other` (the subject's spec) differs from this one."""
        wrong = self.differs(other)
        if wrong:
            name = lambda k: CONFIG_NAMES.get(k, f"encoder.{k}")  # noqa: E731
            theirs = ", ".join(f"{name(k)}={other.value(k)!r}" for k in wrong)
            ours = ", ".join(f"{name(k)}={self.value(k)!r}" for k in wrong)
            raise ValueError(f"{subject} has {theirs} where {reference} has {ours}; {fix}")


def _vision_parts(model):
    tower = getattr(model, "vision_model", model)
    return tower, tower.encoder.layers, tower.config


def load_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu", storage_dtype: str = "float16") -> Encoder:
    """Load tower + processor by hub id or directory, frozen, truncated after select_layer. `storage_dtype`:
    the cache's codec (`cache.dtype`), part of the fingerprint."""
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = dict(local_files_only=cfg.local_files_only)
    try:
        hf_cfg = AutoConfig.from_pretrained(cfg.name_or_path, **kw)
        processor = AutoImageProcessor.from_pretrained(cfg.name_or_path, **kw)
    except OSError as e:
        raise FileNotFoundError(f"encoder.name_or_path={cfg.name_or_path!r}: cannot load a vision encoder "
                                f"({str(e).splitlines()[0]}); point it at a hub id or a directory with "
                                f"config.json, weights and preprocessor_config.json") from None
    family = hf_cfg.model_type
    cls = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
           "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}.get(family)
    if cls is None:
        raise ValueError(f"encoder.name_or_path={cfg.name_or_path!r} is a {family!r} model; "
                         "expected a CLIP or SigLIP vision tower")
    if cfg.post_layernorm and cls is CLIPVisionModel:
        raise ValueError(f"encoder.post_layernorm=true, but {cfg.name_or_path!r} is CLIP, whose last_hidden_state "
                         f"has no post_layernorm (CLIP normalises only its pooled CLS); set it to false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(cfg.name_or_path, **kw)
    dtype = compute_dtype(cfg.dtype, device)
    fp = {"arch": cls.__name__, "weights": weights_hash(model), "processor": processor_hash(processor),
          "processor_class": type(processor).__name__, "compute_dtype": str(dtype).removeprefix("torch."),
          **spec_of(cfg, storage_dtype)}

    tower, layers, vcfg = _vision_parts(model)
    n = len(layers)
    keep = n + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer
    if not 1 <= keep <= n:
        raise ValueError(f"encoder.select_layer={cfg.select_layer} is out of range for a {n}-layer encoder "
                         f"(use -1..-{n} or 1..{n})")
    tower.encoder.layers = layers[:keep]  # hidden_states[-1] of the truncated tower = hidden_states[select_layer]

    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    grid = vcfg.image_size // vcfg.patch_size
    if grid % cfg.pool:
        raise ValueError(f"encoder.pool={cfg.pool} does not divide the {grid}x{grid} patch grid")
    has_cls = cls is CLIPVisionModel
    tokens = (grid // cfg.pool) ** 2 + (1 if has_cls and cfg.keep_cls else 0)
    tiling = tiles.tiling_of(cfg, vcfg.image_size, processor.resample)
    return Encoder(model, processor, cfg, device, dtype, fp, tokens, vcfg.hidden_size, tiling)


@torch.inference_mode()
def features(enc: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, T, D) features in the compute dtype on enc.device, before the cache's
    codec stores them (minivlm.embedding.shard.Codec)."""
    pixels = pixels.to(enc.device, enc.dtype, non_blocking=True)
    out = enc.model(pixel_values=pixels, output_hidden_states=not enc.cfg.post_layernorm)
    hidden = out.last_hidden_state if enc.cfg.post_layernorm else out.hidden_states[-1]  # (B, 1+N or N, D)
    cls_tok, patches = (hidden[:, :1], hidden[:, 1:]) if enc.fingerprint["arch"] == "CLIPVisionModel" else (None, hidden)
    k = enc.cfg.pool
    if k > 1:
        B, N, D = patches.shape
        g = int(round(N ** 0.5))
        grid = patches.transpose(1, 2).reshape(B, D, g, g)                        # (B, D, g, g)
        patches = F.avg_pool2d(grid.float(), k).flatten(2).transpose(1, 2).to(hidden.dtype)  # (B, N/k², D)
    return torch.cat([cls_tok, patches], 1) if cls_tok is not None and enc.cfg.keep_cls else patches
