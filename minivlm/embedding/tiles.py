"""Tiling policies (`encoder.tiles`): a decoded image -> its ordered tiles, each the tower's square input, and its
grid (rows, cols). `minivlm.embedding.encoder.tile_pixels` runs the tower's own processor on each tile, and each
tile becomes one cache row of the tower's (T, D): format 2's fixed row shape stays, the rows per image do not.

The policies (S: the tower's input side in pixels, `Tiling.size`):
- `none`: the image itself, one tile, grid (1, 1); the tower's processor resizes and crops it whole (the row a
  cache held before tiles).
- `split` (Idefics3 / SmolVLM, as nanoVLM): the longest side resized to `max_tiles` x S, the other keeping the
  aspect ratio (rounded up to even), then each side resized up to a multiple of S, and the result cut into a
  rows x cols grid of S x S tiles; the global image is that resized image squeezed to S x S. Order (Idefics3's):
  the grid's tiles row by row, then the global image. A 1 x 1 grid is its one tile, with no global image.
- `anyres` (LLaVA-NeXT): of `grid_pinpoints` (h, w), the one that keeps the most of the image's pixels (then the
  one that wastes the least); the image resized to fit inside it keeping the aspect ratio, centred on black,
  and cut into a rows x cols grid of S x S tiles; the base image is the whole image squeezed to S x S.
  Order (LLaVA-NeXT's): the base image, then the grid's tiles row by row.
So an image of n tiles with grid (rows, cols) has n - rows * cols global (or base) images: 0 or 1.

Design choices:
- Every resize is PIL's on 8-bit RGB with the tower processor's own filter (`resample`: bicubic for CLIP and
  SigLIP), as transformers' PIL image processors do: the tiles equal `LlavaNextImageProcessor`'s and
  `Idefics3ImageProcessor`'s when those are set to the tower's side, filter and normalisation
  (tests/test_tiles.py). Idefics3's default Lanczos is a setting of its processor, not of its tiling.
- `max_tiles` of `split` counts tiles along the longest side (Idefics3's size["longest_edge"] over
  max_image_size["longest_edge"]), a fixed processor setting rather than a cap chosen image by image, so that an
  Idefics3 processor computes the same tiles for every image. An image has at most max_tiles^2 + 1 tiles, and a
  small image is resized up, as Idefics3 does.
- `grid_pinpoints` are pixels, as transformers' `image_grid_pinpoints`, and must be multiples of S; empty (the
  default) is LLaVA-NeXT's set for its 336-px tower in units of the tower's side: 1x2, 2x1, 2x2, 3x1, 1x3 tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from minivlm.config import EncoderConfig

SETTINGS = {"none": (), "split": ("max_tiles",), "anyres": ("grid_pinpoints",)}  # the encoder.* each policy reads
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # LLaVA-NeXT's pinpoints / its 336-px side: (rows, cols)
IDEFICS3_MAX_SIDE = 4096  # Idefics3's processor scales any longer side down to this


@dataclass(frozen=True)
class Tiling:
    """A policy with the facts it needs about the tower: built once when the encoder loads (`tiling_of`)."""
    policy: str                                 # none | split | anyres
    size: int                                   # S: the tower's square input side, every tile's size
    resample: int                               # the tower processor's PIL filter
    max_tiles: int                              # split: tiles along the longest side
    pinpoints: tuple[tuple[int, int], ...]      # anyres: (h, w) in pixels, multiples of size


def tiling_of(cfg: EncoderConfig, size: int, resample: int) -> Tiling:
    """`cfg`'s policy for a tower whose input is `size` x `size`; settings that tower cannot take are one line."""
    pins = tuple(tuple(p) for p in cfg.grid_pinpoints) or tuple((r * size, c * size) for r, c in LLAVA_NEXT_GRIDS)
    if cfg.tiles == "anyres" and any(h % size or w % size for h, w in pins):
        raise ValueError(f"encoder.grid_pinpoints={[list(p) for p in pins]}: every height and width must be a "
                         f"multiple of the tower's {size}-px side")
    if cfg.tiles == "split" and cfg.max_tiles * size > IDEFICS3_MAX_SIDE:
        raise ValueError(f"encoder.max_tiles={cfg.max_tiles} makes a {cfg.max_tiles * size}-px side for this "
                         f"{size}-px tower, above Idefics3's {IDEFICS3_MAX_SIDE}; use at most "
                         f"{IDEFICS3_MAX_SIDE // size}")
    return Tiling(cfg.tiles, size, int(resample), cfg.max_tiles, pins)


def cut(image: Image.Image, t: Tiling) -> tuple[list[Image.Image], tuple[int, int]]:
    """One RGB image -> its tiles in the policy's order (S x S each, except `none`'s whole image) and its grid."""
    if t.policy == "none":
        return [image], (1, 1)
    return (_split if t.policy == "split" else _anyres)(image, t)


def _grid(image: Image.Image, size: int) -> list[Image.Image]:
    """An image whose sides are multiples of size, cut into size x size tiles row by row."""
    return [image.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
            for r in range(image.height // size) for c in range(image.width // size)]


def _split(image: Image.Image, t: Tiling):
    S = t.size
    h, w = _longest_side_to(image.height, image.width, t.max_tiles * S)
    resized = image.resize((w, h), t.resample)
    h, w = _up_to_multiples(h, w, S)
    resized = resized.resize((w, h), t.resample)  # two resizes, as Idefics3 makes them
    if (h, w) == (S, S):
        return [resized], (1, 1)
    return _grid(resized, S) + [resized.resize((S, S), t.resample)], (h // S, w // S)


def _longest_side_to(h: int, w: int, side: int) -> tuple[int, int]:
    """Idefics3's first resize: the longest side to `side`, the other by the aspect ratio, truncated, then even."""
    aspect = w / h
    if w >= h:
        w, h = side, int(side / aspect)
        h += h % 2
    else:
        h, w = side, int(side * aspect)
        w += w % 2
    return max(h, 1), max(w, 1)


def _up_to_multiples(h: int, w: int, S: int) -> tuple[int, int]:
    """Idefics3's second resize: the longest side up to a multiple of S, the other from it by the aspect ratio
    (truncated), then up to a multiple of S; at least S (where Idefics3 would make an empty side)."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / S) * S
        h = math.ceil(int(w / aspect) / S) * S
    else:
        h = math.ceil(h / S) * S
        w = math.ceil(int(h * aspect) / S) * S
    return max(h, S), max(w, S)


def _anyres(image: Image.Image, t: Tiling):
    S = t.size
    H, W = _best_fit(image.height, image.width, t.pinpoints)
    h, w = _fit_inside(image.height, image.width, H, W)
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    canvas.paste(image.resize((w, h), t.resample), ((W - w) // 2, (H - h) // 2))
    return [image.resize((S, S), t.resample)] + _grid(canvas, S), (H // S, W // S)


def _best_fit(h: int, w: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice: the (H, W) keeping the most pixels once the image is scaled to fit inside it (at most
    its own), then the one wasting the least area; the first listed on a tie."""
    best, best_score = pinpoints[0], (0, -math.inf)
    for H, W in pinpoints:
        scale = min(W / w, H / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        if (kept, kept - W * H) > best_score:
            best, best_score = (H, W), (kept, kept - W * H)
    return best


def _fit_inside(h: int, w: int, H: int, W: int) -> tuple[int, int]:
    """The image's size scaled to touch (H, W) on one side, the other side rounded up (at most the target's)."""
    scale_w, scale_h = W / w, H / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), H), W
    return H, min(math.ceil(w * scale_h), W)
