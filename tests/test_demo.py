"""The embedded demo: deterministic synthetic data, a tiny CLIP and a tokenizer that load like real ones."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.demo import folder as demolib
from minivlm.formats.records import load_records

N_TRAIN, N_VAL = 40, 8


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demolib.make_demo(out, n_train=N_TRAIN, n_val=N_VAL)
    return out


@pytest.fixture(scope="module")
def train_records(demo_dir) -> list[dict]:
    return json.loads((demo_dir / "train.json").read_text())


def image_records(records):
    return [r for r in records if "image" in r]


def test_two_builds_write_identical_images_records_encoder_and_tokenizer(demo_dir, tmp_path):
    demolib.make_demo(tmp_path, n_train=N_TRAIN, n_val=N_VAL)
    first, second = tree_bytes(demo_dir), tree_bytes(tmp_path)
    assert any(k.startswith("images/train/") for k in first) and "encoder/model.safetensors" in first
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_image_i_is_the_same_whatever_the_number_of_images(demo_dir, tmp_path):
    records = demolib.make_images_and_records(tmp_path, n_train=6, n_val=2)
    for r in image_records(records["train"] + records["val"]):
        assert (tmp_path / "images" / r["image"]).read_bytes() == (demo_dir / "images" / r["image"]).read_bytes()


def test_records_are_llava_records_that_minivlm_loads(demo_dir, train_records):
    loaded = load_records(demo_dir / "train.json")
    assert len(loaded) == N_TRAIN + len(demolib.TEXT_ONLY) and len(load_records(demo_dir / "val.json")) == N_VAL
    text_only = [r for r in loaded if not r.images]
    assert len(text_only) == len(demolib.TEXT_ONLY)
    for r in image_records(train_records):
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"][len("<image>\n"):] in demolib.PROMPTS
        assert (demo_dir / "images" / r["image"]).is_file()
    assert {Path(r["image"]).suffix for r in image_records(train_records)} == {".jpg", ".png"}


def test_every_caption_names_the_main_colour_and_shape(train_records):
    for r in image_records(train_records):
        words = r["conversations"][1]["value"].lower().replace(".", " ").replace(",", " ").split()
        meta = r["meta"]
        assert meta["color"] in words and meta["shape"] in words, r
        if meta["second"]:
            assert meta["second"]["color"] in words and meta["second"]["color"] != meta["color"]


def test_main_object_shows_its_meta_colour_at_its_position(demo_dir, train_records):
    checked = 0
    for r in image_records(train_records):
        meta = r["meta"]
        if meta["shape"] == "ring":  # a ring's centre is background
            continue
        im = np.asarray(Image.open(demo_dir / "images" / r["image"]).convert("RGB"), dtype=np.float64)
        x, y = demolib.POSITIONS[meta["position"]]
        pixel = im[int(y * im.shape[0]), int(x * im.shape[1])]
        nearest = min(demolib.COLORS, key=lambda c: np.sum((np.array(demolib.COLORS[c]) - pixel) ** 2))
        assert nearest == meta["color"], (r["image"], pixel)
        checked += 1
    assert checked > N_TRAIN // 2


def test_scenes_cover_every_colour_shape_size_and_position_with_some_second_objects():
    metas = [demolib.sample_scene(np.random.default_rng([0, i])) for i in range(1000)]
    for key, names in [("color", demolib.COLORS), ("shape", demolib.SHAPES), ("size", demolib.SIZES),
                       ("position", demolib.POSITIONS)]:
        assert {m[key] for m in metas} == set(names)
    second = [m["second"] for m in metas if m["second"]]
    assert 0.2 < len(second) / len(metas) < 0.4
    assert {s["position"] for s in second} == set(demolib.CORNERS)


def test_tiny_clip_loads_with_from_pretrained_and_gives_patch_hidden_states(demo_dir):
    from transformers import AutoImageProcessor, CLIPVisionModel

    processor = AutoImageProcessor.from_pretrained(demo_dir / "encoder")
    model = CLIPVisionModel.from_pretrained(demo_dir / "encoder").eval()
    images = [Image.open(demo_dir / "images" / "train" / f"0000{i}.jpg") for i in range(3)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 64, 64)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 2 + 1 and hidden[-2].shape == (3, 1 + 8 * 8, 64)  # CLS + (64/8)² patches, D=64
    assert torch.isfinite(hidden[-2]).all() and hidden[-2].std() > 0.1


def test_tiny_clip_loads_through_the_minivlm_encoder(demo_dir):
    from minivlm.config import EncoderConfig
    from minivlm.embedding.encoder import features, load_encoder, load_image, preprocess

    enc = load_encoder(EncoderConfig(name_or_path=str(demo_dir / "encoder")))
    assert (enc.tokens, enc.width) == (64, 64)
    pixels = preprocess(enc.processor, load_image(demo_dir / "images" / "train" / "00000.jpg", 10**6))
    assert features(enc, pixels[None]).shape == (1, 64, 64)


def test_building_the_encoder_leaves_the_callers_torch_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demolib.build_tiny_clip(tmp_path / "encoder")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_loads_with_autotokenizer_with_v3_style_special_ids(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    image_ids = tok.encode(demolib.IMAGE_TOKEN * 3, add_special_tokens=False)
    assert image_ids == [tok.convert_tokens_to_ids(demolib.IMAGE_TOKEN)] * 3
    assert demolib.IMAGE_TOKEN in tok.all_special_tokens


def test_chat_template_renders_chatml_with_optional_system_and_generation_prompt(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    turns = [{"role": "user", "content": "<|image_pad|>\nDescribe this image."},
             {"role": "assistant", "content": "A red circle."}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>user\n<|image_pad|>\nDescribe this image.<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n")
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, turns[0]],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_decode_round_trips_captions(demo_dir, train_records):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    for text in demolib.record_texts(train_records):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_make_demo_skips_an_identical_build_and_rebuilds_when_parameters_change(tmp_path, capsys):
    demolib.make_demo(tmp_path, n_train=4, n_val=2)
    stamp = (tmp_path / "train.json").stat().st_mtime_ns
    demolib.make_demo(tmp_path, n_train=4, n_val=2)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "train.json").stat().st_mtime_ns == stamp
    demolib.make_demo(tmp_path, n_train=4, n_val=3)
    assert len(json.loads((tmp_path / "val.json").read_text())) == 3
    (tmp_path / demolib.MARKER).write_text("{not json")  # a damaged marker means: build again
    summary = demolib.make_demo(tmp_path, n_train=4, n_val=3)
    assert json.loads((tmp_path / demolib.MARKER).read_text())["summary"] == summary


# ---- the detail demo (stages/demo_data.py --detail) ---------------------------------------------------

@pytest.fixture(scope="module")
def detail_dir(tmp_path_factory) -> Path:
    from minivlm.demo.detail import make_detail_demo
    out = tmp_path_factory.mktemp("detail")
    make_detail_demo(out, n_train=8, n_val=2)
    return out


def test_every_detail_caption_names_the_tiny_shape_drawn_at_that_end(detail_dir):
    from minivlm.demo import detail
    records = image_records(json.loads((detail_dir / "train.json").read_text()))
    assert {r["meta"]["orientation"] for r in records} == {"wide", "tall"}
    for r in records:
        meta, text = r["meta"], r["conversations"][1]["value"]
        d = meta["detail"]
        assert f"tiny {d['color']} {d['shape']}" in text and d["end"] in text and meta["color"] in text, r
        im = np.asarray(Image.open(detail_dir / "images" / r["image"]).convert("RGB"), dtype=np.float64)
        assert im.shape[:2] == ((detail.SHORT, detail.LONG) if meta["orientation"] == "wide" else
                                (detail.LONG, detail.SHORT))
        strip = {"left": im[:, :24], "right": im[:, -24:], "top": im[:24], "bottom": im[-24:]}[d["end"]]
        near = np.sqrt(((strip - np.array(demolib.COLORS[d["color"]])) ** 2).sum(-1)).min()
        assert near < 40, (r["image"], d)  # the tiny shape is there, in its colour


def test_the_detail_demo_embeds_with_each_policy_into_the_tiles_transformers_cuts(detail_dir, tmp_path):
    import transformers

    from minivlm.config import load_config
    from minivlm.dist import Dist
    from minivlm.embedding.embed import run_embed
    from conftest import REPO
    processor = transformers.AutoImageProcessor.from_pretrained(detail_dir / "encoder")
    like = dict(resample=processor.resample, image_mean=processor.image_mean, image_std=processor.image_std)
    cut = {"none": lambda im: 1,  # (the reference processors, as in tests/test_tiles.py)
           "anyres": lambda im: len(transformers.LlavaNextImageProcessorPil(
               size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, **like,
               image_grid_pinpoints=[[h * 64 // 336, w * 64 // 336] for h, w in
                                     transformers.LlavaNextImageProcessorPil.image_grid_pinpoints])(
               images=im, return_tensors="pt")["pixel_values"][0]),
           "split": lambda im: len(transformers.Idefics3ImageProcessorPil(
               size={"longest_edge": 256}, max_image_size={"longest_edge": 64}, **like)(
               images=im, return_tensors="pt")["pixel_values"][0])}
    images = sorted((detail_dir / "images").rglob("*.*"))
    for policy, tiles_of in cut.items():
        cfg = load_config(REPO / "configs" / "demo.toml", [
            f"data.records={detail_dir}/train.json", f"data.val_records={detail_dir}/val.json",
            f"data.image_root={detail_dir}/images", f"encoder.name_or_path={detail_dir}/encoder",
            f"cache.dir={tmp_path}/{policy}", "encoder.num_workers=0", f"encoder.tiles={policy}"])
        counts = run_embed(cfg, Dist())["counts"]
        assert counts["embedded"] == len(images) == 10
        tiles = sum(tiles_of(Image.open(p).convert("RGB")) for p in images)
        assert counts.get("tiles", counts["embedded"]) == tiles and ("tiles" in counts) == (policy != "none"), policy
