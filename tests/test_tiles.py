"""minivlm.embedding.tiles through `encoder.tile_pixels`: each policy's grid and tiles are the ones transformers'
own image processors make (LlavaNextImageProcessor for anyres, Idefics3ImageProcessor for split, the tower's
for none), set to the tower's side, filter and normalisation; the settings are checked in one line and are in
the fingerprint only where they change the numbers."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from minivlm.config import EncoderConfig, load_config
from minivlm.demo.folder import build_tiny_clip
from minivlm.embedding.encoder import EncoderSpec, fingerprint_id, load_encoder, spec_of, tile_pixels

S = 64  # the demo tower's side
# (height, width): tiny, the tower's own square, a larger square, very wide, very tall, larger than every grid,
# an odd aspect, one pixel tall
SIZES = [(5, 7), (64, 64), (100, 100), (40, 400), (400, 40), (1000, 700), (123, 77), (1, 300)]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    d = tmp_path_factory.mktemp("tower")
    build_tiny_clip(d)  # the demo's: CLIP 64 px, patches of 8, bicubic, CLIP mean and std
    return d


def encoder(tower, **kw):
    return load_encoder(EncoderConfig(name_or_path=str(tower), dtype="float32", **kw))


def image(h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng([h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8))


def pil_processor(name: str):
    """transformers' PIL image processor of that model (torchvision's where the PIL one is not separate)."""
    return getattr(transformers, f"{name}ImageProcessorPil", None) or getattr(transformers, f"{name}ImageProcessor")


def as_tower(enc) -> dict:
    """The settings that make a LLaVA-NeXT or Idefics3 processor resample and normalise as the tower does."""
    p = enc.processor
    return dict(resample=p.resample, image_mean=list(p.image_mean), image_std=list(p.image_std))


@pytest.mark.parametrize("pinpoints", [[], [[128, 192], [192, 128], [64, 64], [256, 64]]])
@pytest.mark.parametrize("h, w", SIZES)
def test_anyres_is_llava_nexts_grid_and_tiles_base_image_first(tower, h, w, pinpoints):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    enc = encoder(tower, tiles="anyres", grid_pinpoints=pinpoints)
    llava_next = pil_processor("LlavaNext")  # the default: its pinpoints for a 336-px tower, scaled to ours
    grid_pinpoints = pinpoints or [[h * S // 336, w * S // 336] for h, w in llava_next.image_grid_pinpoints]
    ref = llava_next(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                     image_grid_pinpoints=grid_pinpoints, **as_tower(enc))
    theirs = ref(images=image(h, w), return_tensors="pt")["pixel_values"][0]  # (1 + rows * cols, 3, S, S)
    ours, (*grid, height, width) = tile_pixels(enc.processor, enc.tiling, image(h, w))
    grid = tuple(grid)
    assert (height, width) == (h, w)
    assert grid == tuple(get_anyres_image_grid_shape((h, w), grid_pinpoints, S))
    assert ours.shape == theirs.shape == (1 + grid[0] * grid[1], 3, S, S)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_tiles", [1, 2, 4])
@pytest.mark.parametrize("h, w", SIZES)
def test_split_is_idefics3s_grid_and_tiles_global_image_last(tower, h, w, max_tiles):
    enc = encoder(tower, tiles="split", max_tiles=max_tiles)
    ref = pil_processor("Idefics3")(size={"longest_edge": max_tiles * S}, max_image_size={"longest_edge": S},
                                    return_row_col_info=True, **as_tower(enc))
    out = ref(images=image(h, w), return_tensors="pt")
    theirs = out["pixel_values"][0]  # (rows * cols + 1, 3, S, S), or (1, 3, S, S) unsplit
    ours, (*grid, height, width) = tile_pixels(enc.processor, enc.tiling, image(h, w))
    grid = tuple(grid)
    assert (height, width) == (h, w)
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    assert grid == ((rows, cols) if rows else (1, 1))  # Idefics3 says (0, 0) for an image it did not split
    assert ours.shape == theirs.shape == (rows * cols + 1 if rows else 1, 3, S, S)
    assert grid[0] <= max_tiles and grid[1] <= max_tiles
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, w", SIZES[:4])
def test_none_is_the_towers_processor_on_the_whole_image(tower, h, w):
    enc = encoder(tower)
    theirs = transformers.AutoImageProcessor.from_pretrained(tower)(images=image(h, w), return_tensors="pt")
    ours, (*grid, height, width) = tile_pixels(enc.processor, enc.tiling, image(h, w))
    grid = tuple(grid)
    assert (height, width) == (h, w)
    assert grid == (1, 1) and torch.equal(ours, theirs["pixel_values"])


def test_tile_settings_out_of_range_are_one_line_naming_them(tower):
    for override, message in (("encoder.tiles=grid", "encoder.tiles must be none, split or anyres, got 'grid'"),
                              ("encoder.max_tiles=0", "encoder.max_tiles must be >= 1, got 0"),
                              ("encoder.grid_pinpoints=[[64]]", "encoder.grid_pinpoints must be a list of [height, "
                                                                "width] pairs"),
                              ("encoder.grid_pinpoints=[[64, 0]]", "encoder.grid_pinpoints must be a list"),
                              ("encoder.grid_pinpoints=64", "override encoder.grid_pinpoints: expected a TOML array")):
        with pytest.raises(ValueError) as e:
            load_config(None, [override])
        assert str(e.value).startswith(message) and "\n" not in str(e.value), e.value
    assert load_config(None, ["encoder.grid_pinpoints=[[128, 64], [64, 128]]"]).encoder.grid_pinpoints == \
        [[128, 64], [64, 128]]
    with pytest.raises(ValueError, match=r"^encoder.grid_pinpoints=\[\[96, 64\]\]: every height and width must be "
                                         r"a multiple of the tower's 64-px side$"):
        encoder(tower, tiles="anyres", grid_pinpoints=[[96, 64]])
    with pytest.raises(ValueError, match="^encoder.max_tiles=65 makes a 4160-px side .* above Idefics3's 4096; "
                                         "use at most 64$"):
        encoder(tower, tiles="split", max_tiles=65)


def spec(**kw) -> EncoderSpec:
    return EncoderSpec.of_config(EncoderConfig(name_or_path="enc", **kw))


def test_the_fingerprint_holds_the_policy_and_only_the_setting_it_reads():
    before_tiles = {"select_layer": -2, "keep_cls": False, "pool": 1, "storage_dtype": "float16"}
    for unread in ({}, {"max_tiles": 9}, {"grid_pinpoints": [[64, 64]]}):  # none reads neither setting
        assert spec_of(EncoderConfig(**unread)) == before_tiles  # an untiled cache keeps its fingerprint id
    assert fingerprint_id(spec().fingerprint) == fingerprint_id(before_tiles)
    assert spec().differs(spec(tiles="split")) == ["tiles"]
    assert spec(tiles="split").differs(spec(tiles="split", max_tiles=2)) == ["max_tiles"]
    assert spec(tiles="split").differs(spec(tiles="split", grid_pinpoints=[[64, 64]])) == []
    assert spec(tiles="anyres").differs(spec(tiles="anyres", grid_pinpoints=[[64, 64]])) == ["grid_pinpoints"]
    assert spec(tiles="anyres").differs(spec(tiles="anyres", max_tiles=2)) == []
    stored = replace(spec(tiles="anyres", grid_pinpoints=[[64, 128]]), compute_dtype="float32")
    back = EncoderSpec.of_manifest({"encoder": stored.as_json()}).encoder_config()  # what captioning loads
    assert (back.tiles, back.grid_pinpoints) == ("anyres", [[64, 128]])
    with pytest.raises(ValueError, match=r"^the config has encoder.tiles='split' where cache c has encoder.tiles="
                                         r"'none'; re-embed$"):
        spec().check(spec(tiles="split"), "the config", "cache c", "re-embed")
