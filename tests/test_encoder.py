"""minivlm.embedding.encoder on tiny fakes: images decode to RGB, the fingerprint names what changed the numbers, and
EncoderSpec is the one comparison of encoder specs that every stage makes."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.config import EncoderConfig
from minivlm.embedding.encoder import EncoderSpec, ImageError, features, load_encoder, load_image, preprocess


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    d = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A random SigLIP tower shaped like MiniMind-V's (an 8 x 8 patch grid: 64 rows), its post_layernorm
    randomised so that applying it or not shows."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    d = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, image_size=64, patch_size=8))
    with torch.no_grad():
        model.post_layernorm.weight.normal_(1.0, 0.5)
        model.post_layernorm.bias.normal_(0.0, 0.5)
    model.save_pretrained(d)
    siglip_processor()(size={"height": 64, "width": 64}).save_pretrained(d)
    return d


def siglip_processor():
    """The class MiniMind-V's model_vlm.py loads (`SiglipImageProcessor`; its PIL backend where transformers
    has one and torchvision is absent)."""
    import transformers
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def test_post_layernorm_features_are_siglips_last_hidden_state_as_minimind_v_takes_it(tiny_siglip):
    """model_vlm.py: `SiglipVisionModel(**processor(images=image))`.last_hidden_state, all 64 rows."""
    from transformers import SiglipVisionModel
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    pixels = siglip_processor().from_pretrained(tiny_siglip)(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = SiglipVisionModel.from_pretrained(tiny_siglip).eval()(pixel_values=pixels, output_hidden_states=True)

    def ours(**kw):
        enc = load_encoder(EncoderConfig(name_or_path=str(tiny_siglip), dtype="float32", **kw))
        assert torch.equal(preprocess(enc.processor, image), pixels[0]) and enc.tokens == 64
        return features(enc, pixels)

    torch.testing.assert_close(ours(select_layer=-1, post_layernorm=True), out.last_hidden_state)
    torch.testing.assert_close(ours(select_layer=-1), out.hidden_states[-1])  # before post_layernorm: not it
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 0.1
    with torch.no_grad():
        earlier = SiglipVisionModel.from_pretrained(tiny_siglip).post_layernorm(out.hidden_states[-2])
    torch.testing.assert_close(ours(select_layer=-2, post_layernorm=True), earlier)


def test_images_of_every_mode_decode_to_rgb_and_bad_files_say_why(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "grey16.png")
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "grey16.png", 100).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "clear.png", 100).getpixel((0, 0)) == (255, 255, 255)  # alpha on white
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, why in (("missing.jpg", "missing"), ("empty.jpg", "empty"), ("text.jpg", "not an image"),
                      ("grey16.png", "too large")):
        with pytest.raises(ImageError, match=why):
            load_image(tmp_path / name, 100 if name != "grey16.png" else 4)


def test_the_fingerprint_holds_compute_dtype_and_processor_class_and_names_a_change(tiny_clip):
    def loaded(**kw) -> EncoderSpec:
        return EncoderSpec.of_encoder(load_encoder(EncoderConfig(name_or_path=str(tiny_clip), **kw)))

    fp32 = loaded(dtype="float32")
    assert fp32.fingerprint["compute_dtype"] == "float32"
    assert fp32.fingerprint["processor_class"].startswith("CLIPImageProcessor")
    assert fp32.differs(loaded(dtype="bfloat16")) == ["compute_dtype"]
    assert fp32.differs(loaded(dtype="float32", pool=2)) == ["pool"]


LOADED = {"arch": "CLIPVisionModel", "weights": "w1", "processor": "p1"}


def spec(path="enc", **config) -> EncoderSpec:
    return EncoderSpec.of_config(EncoderConfig(name_or_path=path, **config))


def test_configs_differ_by_selection_or_path_and_loaded_encoders_by_fingerprint_not_path():
    assert spec().differs(spec(keep_cls=True)) == ["keep_cls"]
    assert spec().differs(spec("other")) == ["name_or_path"]  # not loaded: the path names the weights
    a = replace(spec(), fingerprint={**spec().fingerprint, **LOADED})
    moved = replace(a, name_or_path="moved/enc")
    assert a.differs(moved) == []  # loaded: the weights hash decides, a moved directory still matches
    assert a.differs(replace(moved, fingerprint={**a.fingerprint, "weights": "w2"})) == ["weights"]
    assert spec("other").differs(a) == []  # a config against a cache: the fields the config knows
    assert a.differs(replace(a, fingerprint={**a.fingerprint, "new_field": 1})) == ["fingerprint"]


def test_check_names_every_differing_field_with_both_values_and_the_fix():
    with pytest.raises(ValueError, match=r"^the config has encoder.select_layer=-1, encoder.pool=2 where cache c "
                                         r"has encoder.select_layer=-2, encoder.pool=1; re-embed$"):
        spec().check(spec(select_layer=-1, pool=2), "the config", "cache c", "re-embed")
    spec().check(spec(batch_size=7, num_workers=0), "the config", "cache c", "re-embed")  # not part of the spec


def test_post_layernorm_is_refused_for_clip_and_is_part_of_the_fingerprint(tiny_clip):
    with pytest.raises(ValueError, match=r"encoder.post_layernorm=true, but .* is CLIP, whose last_hidden_state "
                                         r"has no post_layernorm.*set it to false"):
        load_encoder(EncoderConfig(name_or_path=str(tiny_clip), post_layernorm=True))
    assert spec().differs(spec(post_layernorm=True)) == ["post_layernorm"]
    assert spec(post_layernorm=True).encoder_config().post_layernorm
    assert "post_layernorm" not in spec().fingerprint  # caches built before the option keep their fingerprint
    old = replace(spec(), fingerprint={**spec().fingerprint, **LOADED})  # a cache from before the option...
    assert old.differs(spec(post_layernorm=True)) == ["post_layernorm"]  # ...was embedded without it
    assert old.differs(replace(old, fingerprint={**old.fingerprint, "post_layernorm": True})) == ["post_layernorm"]


def test_manifest_entry_round_trips():
    a = replace(spec(), compute_dtype="float32", fingerprint={**spec().fingerprint, **LOADED})
    assert EncoderSpec.of_manifest({"encoder": a.as_json()}) == a
