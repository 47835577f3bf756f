"""How an image's tiles become placeholder positions in a sample: the convention of its tiling policy.

An image is its tiles (`encoder.tiles`, minivlm.embedding.tiles), each one cache row that the model reduces
to T' rows of a g x g grid (`model.pool`, `model.pixel_shuffle`). Where the image's tag stands, the prompt
gets `Placement.text` (placeholder tokens, and text markers between them) and each placeholder token becomes a
run of positions (`Placement.runs`); `Placement.rows` says which projected row of the image each position of
those runs takes, in order (tile t's row i is t T' + i; NEWLINE is the learned newline row):
- `none`: one tile, one run of T', its rows in order.
- `split` (Idefics3 / SmolVLM): each tile its own run of T', after a marker naming its place in the grid,
  a newline after each grid row, then the global image; the markers are Idefics3Processor's prompt
  (`<fake_token_around_image>`, `<row_r_col_c>`, `<global-img>`), so the LM reads where each tile sits. As in
  Idefics3's tokenizer, each marker is one special token (`markers`, added to the run's tokenizer), not the
  ~20-30 tokens a BPE makes of its text.
- `anyres` (LLaVA-NeXT): one run of T' + H'(W' + 1): the base image's T' rows, then the grid tiles' rows laid
  out as the image (tile (r, c)'s row (i, j) at (r g + i, c g + j)), cut back to the image's own aspect ratio
  (LLaVA-NeXT's `unpad_image`), with the newline row after each grid row: `LlavaNextModel.pack_image_features`'
  order, so an exported run computes what LlavaNextForConditionalGeneration computes.
Placements are a function of the image's layout alone (tile count, grid, height, width: the cache's
`image_tiles`), computed on the host: the model only gathers rows (`VLM.embed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from minivlm.config import patch_grid

NEWLINE = -1  # in Placement.rows: the learned newline row (anyres)
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"  # Idefics3's markers


@dataclass(frozen=True)
class Placement:
    text: str            # what the image's tag becomes: placeholder tokens, and markers between them
    runs: tuple          # positions each placeholder token of `text` becomes, in order
    rows: np.ndarray     # (sum(runs),) int64: the image's projected row each position takes; NEWLINE


def markers(policy: str, max_tiles: int) -> list[str]:
    """The marker tokens a policy's prompts use (split: Idefics3's, for grids of up to max_tiles a side)."""
    if policy != "split":
        return []
    return [FAKE, GLOBAL] + [f"<row_{r}_col_{c}>" for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)]


@lru_cache(maxsize=4096)  # images share layouts: a few grids and sizes
def place(policy: str, layout: tuple, tokens: int, placeholder: str) -> Placement:
    """The placement of one image of `layout` (tile count, grid rows, grid cols, height, width) whose tiles
    become `tokens` (T') rows each, `placeholder` the image token."""
    n, rows, cols, height, width = layout
    if policy == "anyres":
        return _anyres(n, rows, cols, height, width, tokens, placeholder)
    if policy == "split" and n > 1:
        text = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{placeholder}" for c in range(cols)) + "\n"
                       for r in range(rows)) + f"\n{FAKE}{GLOBAL}{placeholder}{FAKE}"
        return Placement(text, (tokens,) * n, np.arange(n * tokens, dtype=np.int64))
    text = f"{FAKE}{GLOBAL}{placeholder}{FAKE}" if policy == "split" else placeholder
    return Placement(text, (tokens,), np.arange(tokens, dtype=np.int64))


def _anyres(n: int, rows: int, cols: int, height: int, width: int, tokens: int, placeholder: str) -> Placement:
    g, cls = patch_grid(tokens)
    if cls:
        raise ValueError("encoder.keep_cls=true with encoder.tiles=anyres: LLaVA-NeXT lays out the tiles' patch "
                         "grids, which a CLS row is not part of; embed with encoder.keep_cls=false")
    if n != rows * cols + 1:
        raise ValueError(f"an anyres image of {n} tiles has grid {rows}x{cols}: the cache is not LLaVA-NeXT's "
                         f"base image and grid; re-embed it")
    top, bottom, left, right = unpadded(rows * g, cols * g, height, width)
    y, x = np.meshgrid(np.arange(top, bottom), np.arange(left, right), indexing="ij")   # (H', W')
    tile = 1 + (y // g) * cols + x // g                                                 # the base image is tile 0
    grid_rows = tile * tokens + (y % g) * g + x % g                                     # (H', W')
    with_newline = np.concatenate([grid_rows, np.full((len(grid_rows), 1), NEWLINE)], axis=1)  # (H', W' + 1)
    rows_of = np.concatenate([np.arange(tokens), with_newline.ravel()]).astype(np.int64)
    return Placement(placeholder, (len(rows_of),), rows_of)


def unpadded(H: int, W: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of an H x W feature grid that hold the image of `height` x `width` fitted into
    it and centred (what LLaVA-NeXT's unpad_image keeps)."""
    if width / height > W / H:  # wider than the grid: bands above and below
        pad = (H - int(round(height * (W / width), 7))) // 2
        return pad, H - pad, 0, W
    pad = (W - int(round(width * (H / height), 7))) // 2
    return 0, H, pad, W - pad


def image_index(policy: str, layouts, tokens: int, placeholder: str) -> np.ndarray:
    """(positions,) int64: for each image position of images of `layouts`, in order, the projected row it takes
    among theirs (each image's tiles x `tokens` rows, one image after another); NEWLINE the newline row: what
    `VLM.embed` gathers."""
    out, base = [], 0
    for lay in layouts:
        rows = place(policy, tuple(int(x) for x in lay), tokens, placeholder).rows
        out.append(np.where(rows == NEWLINE, NEWLINE, rows + base))
        base += int(lay[0]) * tokens
    return np.concatenate(out) if out else np.zeros(0, np.int64)
