"""minivlm.training.layout: an image's tiles laid out as the convention's own code lays them out (transformers'
LlavaNextModel.pack_image_features for anyres, the Idefics3 / SmolVLM processor's prompt for split)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, get_anyres_image_grid_shape
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from minivlm.training.layout import FAKE, GLOBAL, image_index, place

S, PATCH, D = 64, 8, 6                                            # the demo tower: a g x g = 8 x 8 grid a tile
PINS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]   # LLaVA-NeXT's set at a 64-px side
SIZES = [(37, 300), (300, 37), (64, 64), (100, 170), (170, 100), (500, 499), (33, 65)]  # (height, width)


def anyres_layout(h: int, w: int) -> tuple:
    rows, cols = get_anyres_image_grid_shape((h, w), PINS, S)  # the reference's own grid choice
    return (rows * cols + 1, rows, cols, h, w)


@pytest.mark.parametrize("h, w", SIZES)
def test_anyres_places_base_grid_unpadded_and_newlines_as_llava_next_packs_them(h, w):
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=S, patch_size=PATCH),
                             text_config=LlamaConfig(hidden_size=D, num_attention_heads=2, num_key_value_heads=2),
                             image_grid_pinpoints=PINS)
    layout = anyres_layout(h, w)
    g = S // PATCH
    feats, newline = torch.randn(layout[0], g * g, D), torch.randn(D)  # projected rows of the base image and tiles
    (theirs,), lens = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [feats],
                                                         torch.tensor([[h, w]]), "default", newline)
    p = place("anyres", layout, g * g, "<image>")
    ours = torch.cat((feats.flatten(0, 1), newline[None]))[torch.from_numpy(p.rows)]
    assert p.runs == (len(theirs),) == (int(lens[0]),) and torch.equal(ours, theirs)


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)])
def test_split_prompts_each_tile_after_its_marker_and_the_global_image_as_idefics3(grid):
    rows, cols = grid
    n = rows * cols + (rows * cols > 1)  # a 1x1 grid is its one tile, with no global image
    p = place("split", (n, rows, cols, 100, 100), 4, "<image>")
    expanded = "".join(part + "<image>" * run for part, run in zip(p.text.split("<image>"), p.runs)) + \
        p.text.split("<image>")[-1]
    theirs = get_image_prompt_string(*((rows, cols) if n > 1 else (0, 0)), 4, FAKE, "<image>", GLOBAL)
    assert expanded == theirs and p.runs == (4,) * n and np.array_equal(p.rows, np.arange(4 * n))


def test_the_index_of_several_images_counts_each_ones_rows_and_keeps_the_newline():
    layouts = [anyres_layout(37, 300), anyres_layout(64, 64)]
    first = place("anyres", layouts[0], 4, "<image>").rows
    got = image_index("anyres", layouts, 4, "<image>")
    assert np.array_equal(got[:len(first)], first)
    second = got[len(first):]
    assert second.min() == -1 and (second[second >= 0] >= layouts[0][0] * 4).all()
    assert len(image_index("none", [(1, 1, 1, 0, 0)] * 3, 4, "<image>")) == 12


def test_anyres_with_a_cls_row_is_one_line_naming_the_setting():
    with pytest.raises(ValueError, match="encoder.keep_cls=true with encoder.tiles=anyres"):
        place("anyres", anyres_layout(64, 64), 65, "<image>")
