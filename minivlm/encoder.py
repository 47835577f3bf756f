"""The frozen vision tower: image decoding, preprocessing, feature selection and the fingerprint.

Design choices:
- `load_image` + `preprocess` + `encode` are the only path from an image file to features. Stage 1 runs
  them in bulk and captioning runs them live, so a cached row and a live row are the same numbers.
- Any CLIP-family vision tower (`CLIPVisionModel`, `SiglipVisionModel`) by hub id or directory, through
  `from_pretrained` (never `trust_remote_code`). Layers after `select_layer` are dropped at load: they
  would be computed and thrown away.
- Features are `hidden_states[select_layer]`, CLS dropped unless `keep_cls`, then k x k average pooling
  of the patch grid; stored as float16.
- The fingerprint hashes everything that changes the numbers: the weights (tensor bytes, so the same
  path with other weights differs), the processor config and class (transformers picks a torchvision-
  based processor where torchvision is installed and a PIL one elsewhere; their resampling differs),
  the compute dtype (fp16 on CUDA, fp32 on CPU by default), select_layer, keep_cls, pool and storage
  dtype. Its components are kept so a mismatch names the field that differs.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from minivlm.config import EncoderConfig

STORAGE_DTYPE = "float16"
SPEC_FIELDS = ("select_layer", "keep_cls", "pool")


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


@dataclass
class Encoder:
    model: torch.nn.Module
    processor: object
    cfg: EncoderConfig
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict            # components; `fingerprint_id(fingerprint)` is the short hash
    tokens: int                  # T: rows per image after CLS handling and pooling
    width: int                   # D


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


def spec_of(cfg: EncoderConfig) -> dict:
    """The part of the fingerprint that the config alone determines (checked without loading weights)."""
    return {"select_layer": cfg.select_layer, "keep_cls": cfg.keep_cls, "pool": cfg.pool, "storage_dtype": STORAGE_DTYPE}




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
    def of_config(cls, cfg: EncoderConfig) -> EncoderSpec:
        return cls(cfg.name_or_path, cfg.select_layer, cfg.keep_cls, cfg.pool, cfg.dtype, spec_of(cfg))

    @classmethod
    def of_encoder(cls, enc: Encoder) -> EncoderSpec:
        return replace(cls.of_config(enc.cfg), compute_dtype=str(enc.dtype).removeprefix("torch."),
                       fingerprint=dict(enc.fingerprint))

    @classmethod
    def of_manifest(cls, manifest: dict) -> EncoderSpec:
        return cls(**manifest["encoder"], fingerprint=manifest["fingerprint_fields"])

    def as_json(self) -> dict:
        """The manifest's `encoder` entry (the fingerprint is stored beside it, as `fingerprint_fields`)."""
        return {k: v for k, v in asdict(self).items() if k != "fingerprint"}

    def encoder_config(self, **kw) -> EncoderConfig:
        """An EncoderConfig that loads this encoder again (kw: batch size, workers, ...)."""
        return EncoderConfig(name_or_path=self.name_or_path, select_layer=self.select_layer, keep_cls=self.keep_cls,
                             pool=self.pool, dtype=self.compute_dtype, **kw)

    def differs(self, other: EncoderSpec) -> list[str]:
        """Fields that differ: every fingerprint field both sides know. Until both are loaded (a config
        against a config) the weights are known only by their path, so the path counts too."""
        a, b = self.fingerprint, other.fingerprint
        wrong = [k for k in a if k in b and a[k] != b[k]]
        if not wrong and "weights" in a and "weights" in b and a != b:  # a field only one side has
            wrong = ["fingerprint"]
        if "weights" not in a and "weights" not in b and self.name_or_path != other.name_or_path:
            wrong.insert(0, "name_or_path")
        return wrong

    def value(self, name: str):
        special = {"name_or_path": self.name_or_path, "fingerprint": fingerprint_id(self.fingerprint)}
        return special[name] if name in special else self.fingerprint.get(name)

    def check(self, other: EncoderSpec, subject: str, reference: str, fix: str) -> None:
        """Raise one line naming each field where `other` (the subject's spec) differs from this one."""
        wrong = self.differs(other)
        if wrong:
            theirs = ", ".join(f"encoder.{k}={other.value(k)!r}" for k in wrong)
            ours = ", ".join(f"encoder.{k}={self.value(k)!r}" for k in wrong)
            raise ValueError(f"{subject} has {theirs} where {reference} has {ours}; {fix}")


def _vision_parts(model):
    tower = getattr(model, "vision_model", model)
    return tower, tower.encoder.layers, tower.config


def load_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu") -> Encoder:
    """Load tower + processor by hub id or directory, frozen, truncated after select_layer."""
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(cfg.name_or_path, **kw)
    dtype = compute_dtype(cfg.dtype, device)
    fp = {"arch": cls.__name__, "weights": weights_hash(model), "processor": processor_hash(processor),
          "processor_class": type(processor).__name__, "compute_dtype": str(dtype).removeprefix("torch."),
          **spec_of(cfg)}

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
    return Encoder(model, processor, cfg, device, dtype, fp, tokens, vcfg.hidden_size)


@torch.inference_mode()
def encode(enc: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, T, D) float16 features on enc.device (what the cache stores)."""
    return features(enc, pixels).to(torch.float16)


@torch.inference_mode()
def features(enc: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, T, D) features in the compute dtype, before the storage rounding."""
    pixels = pixels.to(enc.device, enc.dtype, non_blocking=True)
    hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # (B, 1+N or N, D)
    cls_tok, patches = (hidden[:, :1], hidden[:, 1:]) if enc.fingerprint["arch"] == "CLIPVisionModel" else (None, hidden)
    k = enc.cfg.pool
    if k > 1:
        B, N, D = patches.shape
        g = int(round(N ** 0.5))
        grid = patches.transpose(1, 2).reshape(B, D, g, g)                        # (B, D, g, g)
        patches = F.avg_pool2d(grid.float(), k).flatten(2).transpose(1, 2).to(hidden.dtype)  # (B, N/k², D)
    return torch.cat([cls_tok, patches], 1) if cls_tok is not None and enc.cfg.keep_cls else patches
