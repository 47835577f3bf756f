"""minivlm.encoder on tiny fakes: images decode to RGB, and the fingerprint names what changed the numbers."""
import numpy as np
import pytest
from PIL import Image

from minivlm.config import EncoderConfig
from minivlm.encoder import ImageError, fingerprint_diff, load_encoder, load_image


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    d = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


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
    fp32 = load_encoder(EncoderConfig(name_or_path=str(tiny_clip), dtype="float32")).fingerprint
    bf16 = load_encoder(EncoderConfig(name_or_path=str(tiny_clip), dtype="bfloat16")).fingerprint
    assert fp32["compute_dtype"] == "float32" and fp32["processor_class"].startswith("CLIPImageProcessor")
    assert fingerprint_diff(fp32, bf16) == ["compute_dtype"]
    pooled = load_encoder(EncoderConfig(name_or_path=str(tiny_clip), dtype="float32", pool=2)).fingerprint
    assert fingerprint_diff(fp32, pooled) == ["pool"]
