"""The detail demo (`stages/demo_data.py --detail`): wide and tall scenes whose caption names a tiny detail that
one square view of the image loses, so that tiles (`encoder.tiles`) have something to win on the demo itself.

Design choices:
- A scene is 256 x 96 (wide) or 96 x 256 (tall): one large shape in the middle and, near one end, a tiny shape
  (radius 6 px) of another colour and shape. The caption names both; the tiny shape's colour, shape and end
  are the detail. The tiny shape is never a ring: at that size a ring is a 1-px line whose colour JPEG's
  chroma subsampling washes out.
- What each policy keeps of the detail with the demo tower's 64-px side: `none` resizes the short side to 64
  and crops the centre square, cutting both ends off, the detail with them; anyres's base image squeezes the
  long side 4x (the detail ~3 x 8 px, its shape gone), while its 1 x 3 grid keeps it at 2/3 scale; split
  (max_tiles 4) cuts a 2 x 4 grid at full scale, plus the global image.
- Everything else is the shape demo's (minivlm.demo.folder.make_demo with this module's `detail_scene`): the
  same tower (same seed, same weights), a tokenizer trained on these captions, deterministic to the byte.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivlm.demo.folder import (
    COLORS,
    PROMPTS,
    SHAPES,
    SIZE_WORDS,
    _article,
    _jittered,
    _pick,
    draw_shape,
    make_demo,
)

LONG, SHORT = 256, 96                  # a scene's sides in pixels
MAIN_RADIUS = 0.32 * SHORT             # the large shape in the middle
DETAIL_RADIUS = 6                      # the tiny shape, px
DETAIL_SHAPES = tuple(s for s in SHAPES if s != "ring")
DETAIL_FROM_END = (10, 22)             # its centre's distance from the end, px
ENDS = {"wide": ("left", "right"), "tall": ("top", "bottom")}
DETAIL_PROMPTS = PROMPTS + ("What is at the ends of the picture?", "Is there anything small in the picture?")
TEMPLATES = ("{A} in the middle, and a tiny {d} at the {end}.",
             "A {orientation} picture: {a} in the middle and a tiny {d} at the {end}.",
             "At the {end} there is a tiny {d}; {a} fills the middle.",
             "{A} with a tiny {d} at the {end} end.")


def sample_detail_scene(rng: np.random.Generator) -> dict:
    """The meta of one scene: orientation, the main shape, and the detail of another colour and shape."""
    color, shape, orientation = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES), _pick(rng, tuple(ENDS))
    return {"orientation": orientation, "color": color, "shape": shape, "size": "large",
            "detail": {"color": _pick(rng, tuple(c for c in COLORS if c != color)),
                       "shape": _pick(rng, tuple(s for s in DETAIL_SHAPES if s != shape)),
                       "end": _pick(rng, ENDS[orientation])}}


def render_detail(meta: dict, rng: np.random.Generator) -> Image.Image:
    """Draw the scene wide (LONG x SHORT) at 2x and box-downsample, then turn it for a tall one."""
    s = 2  # drawing scale
    base = int(rng.integers(215, 251))
    im = Image.new("RGB", (s * LONG, s * SHORT), _jittered(rng, (base, base, base), 8))
    draw = ImageDraw.Draw(im)
    detail = meta["detail"]
    from_end = rng.uniform(*DETAIL_FROM_END)
    x = from_end if detail["end"] in ("left", "top") else LONG - from_end
    y = rng.uniform(2 * DETAIL_RADIUS, SHORT - 2 * DETAIL_RADIUS)
    draw_shape(draw, detail["shape"], s * x, s * y, s * DETAIL_RADIUS, _jittered(rng, COLORS[detail["color"]], 12),
               float(rng.uniform(-12, 12)))
    cx, cy = LONG / 2 + rng.uniform(-8, 8), SHORT / 2 + rng.uniform(-4, 4)
    draw_shape(draw, meta["shape"], s * cx, s * cy, s * MAIN_RADIUS, _jittered(rng, COLORS[meta["color"]], 12),
               float(rng.uniform(-12, 12)))
    im = im.reduce(s)
    return im if meta["orientation"] == "wide" else im.transpose(Image.Transpose.ROTATE_270)  # left end -> top


def detail_caption(meta: dict, rng: np.random.Generator) -> str:
    """One sentence from a random template naming the main shape and the detail (colour, shape, end)."""
    a = _article(f"{_pick(rng, SIZE_WORDS['large'])} {meta['color']} {meta['shape']}")
    d, end = f"{meta['detail']['color']} {meta['detail']['shape']}", meta["detail"]["end"]
    text = _pick(rng, TEMPLATES).format(a=a, A=a.capitalize(), d=d, end=end, orientation=meta["orientation"])
    return text[0].upper() + text[1:]


def detail_scene(rng: np.random.Generator) -> tuple[Image.Image, str, str, dict]:
    """One image of the detail demo and what is said about it: (image, prompt, caption, meta)."""
    meta = sample_detail_scene(rng)
    im = render_detail(meta, rng)
    return im, _pick(rng, DETAIL_PROMPTS), detail_caption(meta, rng), meta


def make_detail_demo(out_dir: Path, n_train: int = 4000, n_val: int = 256, seed: int = 0) -> dict:
    """The detail demo's images, records, encoder and tokenizer under out_dir (skipped when built alike)."""
    return make_demo(out_dir, n_train, n_val, seed, scene=detail_scene)
