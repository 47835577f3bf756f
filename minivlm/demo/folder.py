"""The embedded offline demo: synthetic shape images with LLaVA records, a tiny random CLIP tower and a
tiny BPE tokenizer, so `make demo` and the tests run end to end with no download.

Design choices:
- Scenes are simple on purpose: one main object (colour, shape, size, position) on a light neutral
  background, and in ~30% of images a smaller second object in a corner. The colour and shape words of
  a caption are predictable from the pixels; the phrasing (several templates and synonyms) is not, so a
  model must look at the image to get the content words right.
- Every record keeps its machine-readable truth under an extra `meta` key (records allow extra keys),
  so evaluation can check that a generated caption names the main object's colour.
- Deterministic to the byte: image i of a split draws from its own RNG seeded with (seed, split, i), so
  it is the same however many images are asked for; JPEG encoding is deterministic for equal pixels.
  The tower is built under a forked torch RNG (the caller's RNG state is left alone).
- Shapes are drawn at 2x and box-downsampled (cheap anti-aliasing): thousands of images per second.
- The encoder and tokenizer go through `save_pretrained` and are loaded back with `from_pretrained`,
  the same path real ones (CLIP ViT-B/16, the MiniMind tokenizers) take.
- The tokenizer follows the v3 MiniMind tokenizer: byte-level BPE, `<|endoftext|>`=0 (pad),
  `<|im_start|>`=1, `<|im_end|>`=2 (eos), `<|image_pad|>` special, a ChatML chat template (no <think>).
- `make_demo` is idempotent: a marker holding the parameters is written last (atomically); a build
  with the same parameters is skipped, anything else is rebuilt.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivlm.fileio import atomic_write_json, atomic_write_text

DEMO_VERSION = 1
MARKER = "demo_complete.json"
SPLITS = ("train", "val")

COLORS = {  # name -> RGB; far apart so a name is unambiguous after JPEG and jitter
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "purple": (130, 40, 170), "orange": (245, 130, 20), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
SIZES = {"small": 0.12, "large": 0.22}            # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}                # main object centre (x, y), fractions of the side
CORNERS = {"top left": (0.13, 0.13), "top right": (0.87, 0.13), "bottom left": (0.13, 0.87),
           "bottom right": (0.87, 0.87)}          # second object centre; never overlaps the main one
IMAGE_SIZE = 96                                   # the scenes' side in pixels
SECOND_RADIUS = 0.085
JITTER = 0.03                                     # main centre jitter, fraction of the side
SECOND_P = 0.3
PNG_EVERY, PNG_AT = 64, 5                         # image i is a PNG when i % 64 == 5 (formats vary in real data)

PROMPTS = ("Describe this image.", "What is in this picture?", "What do you see?", "Describe the picture briefly.",
           "Give a short caption for this image.", "What shapes are in the image?",
           "Write a one-sentence description of the image.")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
WHERE = {
    "left": ("on the left", "on the left side", "to the left"),
    "right": ("on the right", "on the right side", "to the right"),
    "top": ("at the top", "near the top of the picture", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom of the picture", "in the lower part"),
    "center": ("in the center", "in the middle", "in the middle of the picture"),
}
MAIN_TEMPLATES = ("{A} {where}.", "There is {a} {where}.", "{A_plain} {where}.", "The picture shows {a} {where}.",
                  "{A} {where} on a plain background.", "Only one shape: {a}.", "{Where}, there is {a}.")
PAIR_TEMPLATES = ("{A} {where} and {b} in the {corner} corner.", "{A} and {b}.", "Two shapes: {a} {where} and {b}.",
                  "There is {a} {where}, with {b} in the {corner} corner.",
                  "The picture shows {a} and, in the {corner} corner, {b}.")
TEXT_ONLY = (
    ("What colours can the shapes be?", "They can be red, green, blue, yellow, purple, orange, black or gray."),
    ("Name some shapes.", "A circle, a square, a triangle, a star, a cross, a ring and a diamond."),
    ("Hello!", "Hello! Show me a picture and I will describe it."),
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")  # ids 0, 1, 2, 3
IMAGE_TOKEN = "<|image_pad|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- scenes -----------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> dict:
    """The meta of one image: main object and an optional second object of another colour and shape."""
    color, shape = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES)
    meta = {"color": color, "shape": shape, "size": _pick(rng, tuple(SIZES)),
            "position": _pick(rng, tuple(POSITIONS)), "second": None}
    if rng.random() < SECOND_P:
        meta["second"] = {"color": _pick(rng, tuple(c for c in COLORS if c != color)),
                          "shape": _pick(rng, tuple(s for s in SHAPES if s != shape)),
                          "size": "small", "position": _pick(rng, tuple(CORNERS))}
    return meta


def _star_points(cx, cy, r, n, rot, inner=None, squash=1.0):
    """Vertices of a regular n-gon (or an n-pointed star when inner is the inner radius ratio)."""
    k = 2 * n if inner else n
    pts = []
    for j in range(k):
        a = math.radians(rot - 90 + j * 360 / k)
        rr = r * inner if inner and j % 2 else r
        pts.append((cx + squash * rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float) -> None:
    """One filled shape of circumradius r centred at (cx, cy); rot (degrees) tilts the polygons a little."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.3 * r)))
    elif shape == "square":
        draw.polygon(_star_points(cx, cy, r, 4, 45 + rot), fill=fill)
    elif shape == "diamond":
        draw.polygon(_star_points(cx, cy, r, 4, rot / 2, squash=0.65), fill=fill)
    elif shape == "triangle":
        draw.polygon(_star_points(cx, cy, r, 3, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r, 5, rot, inner=0.45), fill=fill)
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise AssertionError(f"unknown shape {shape}")


def _jittered(rng: np.random.Generator, rgb, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(meta: dict, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw the scene at 2x and box-downsample: (image_size, image_size) RGB."""
    s = 2 * image_size
    base = int(rng.integers(215, 251))
    im = Image.new("RGB", (s, s), _jittered(rng, (base, base, base), 8))
    draw = ImageDraw.Draw(im)
    second = meta["second"]
    if second:
        cx, cy = CORNERS[second["position"]]
        draw_shape(draw, second["shape"], cx * s, cy * s, SECOND_RADIUS * s,
                   _jittered(rng, COLORS[second["color"]], 12), float(rng.uniform(-12, 12)))
    cx, cy = (c + rng.uniform(-JITTER, JITTER) for c in POSITIONS[meta["position"]])
    draw_shape(draw, meta["shape"], cx * s, cy * s, SIZES[meta["size"]] * s,
               _jittered(rng, COLORS[meta["color"]], 12), float(rng.uniform(-12, 12)))
    return im.reduce(2)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(meta: dict, rng: np.random.Generator) -> str:
    """One sentence from a random template; always names the main colour (lowercase) and shape."""
    noun = f"{meta['color']} {meta['shape']}"
    a = _article(f"{_pick(rng, SIZE_WORDS[meta['size']])} {noun}")
    where = _pick(rng, WHERE[meta["position"]])
    fields = {"a": a, "A": a.capitalize(), "A_plain": _article(noun).capitalize(), "where": where,
              "Where": where[0].upper() + where[1:]}
    second = meta["second"]
    if second is None:
        return _pick(rng, MAIN_TEMPLATES).format(**fields)
    small = _pick(rng, ("small ", "little ", ""))
    fields.update(b=_article(f"{small}{second['color']} {second['shape']}"), corner=second["position"])
    return _pick(rng, PAIR_TEMPLATES).format(**fields)


# ---- images and records -----------------------------------------------------------------------------

def _image_name(i: int) -> str:
    return f"{i:05d}." + ("png" if i % PNG_EVERY == PNG_AT else "jpg")


def shape_scene(rng: np.random.Generator) -> tuple[Image.Image, str, str, dict]:
    """One image of the shape demo and what is said about it: (image, prompt, caption, meta)."""
    meta = sample_scene(rng)
    im = render(meta, rng, IMAGE_SIZE)
    return im, _pick(rng, PROMPTS), caption(meta, rng), meta


def make_split(out_dir: Path, split: str, n: int, seed: int, scene=shape_scene) -> list[dict]:
    """Write out_dir/images/<split>/NNNNN.jpg and return the split's LLaVA records (with meta); `scene(rng)`
    draws each image and its texts."""
    image_dir = Path(out_dir) / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])  # image i never depends on n
        im, prompt, text, meta = scene(rng)
        key = f"{split}/{_image_name(i)}"
        if key.endswith(".png"):
            im.save(image_dir / _image_name(i), "PNG")
        else:
            im.save(image_dir / _image_name(i), "JPEG", quality=90)
        records.append({"id": f"{split}-{i:05d}", "image": key, "conversations": [
            {"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": text}], "meta": meta})
    return records


def text_only_records() -> list[dict]:
    return [{"id": f"text-{j}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for j, (q, a) in enumerate(TEXT_ONLY)]


def _records_json(records: list[dict]) -> str:
    """A JSON array with one record per line: valid JSON, and still greppable."""
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def make_images_and_records(out_dir: Path, n_train: int, n_val: int, seed: int = 0,
                            scene=shape_scene) -> dict[str, list[dict]]:
    """Images under out_dir/images/{train,val}/, records in out_dir/{train,val}.json; returns the records."""
    out = {"train": make_split(out_dir, "train", n_train, seed, scene) + text_only_records(),
           "val": make_split(out_dir, "val", n_val, seed, scene)}
    for split, records in out.items():
        atomic_write_text(Path(out_dir) / f"{split}.json", _records_json(records))
    return out


def record_texts(records: list[dict]) -> list[str]:
    """Every conversation turn, `<image>` tag removed: the tokenizer's training text."""
    return [t["value"].replace("<image>", "").strip() for r in records for t in r["conversations"]]


# ---- encoder and tokenizer --------------------------------------------------------------------------

def build_tiny_clip(out_dir: Path, image_size: int = 64, patch_size: int = 8, hidden_size: int = 64,
                    layers: int = 2, heads: int = 4, seed: int = 0):
    """A random-weight CLIP vision tower + CLIP image processor in out_dir; returns its CLIPVisionConfig.

    T = (image_size // patch_size)**2 patch tokens (+1 CLS) of width D = hidden_size.
    """
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                           intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                           num_attention_heads=heads)
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPVisionModel(cfg).float().eval()
    # Without torchvision, transformers 5 names the PIL processor CLIPImageProcessorPil; it saves as
    # "CLIPImageProcessor", so any transformers version loads it back through AutoImageProcessor.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    out_dir = Path(out_dir)
    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
    return cfg


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 1000):
    """Train a byte-level BPE on texts, save it as a HF fast tokenizer in out_dir, return it loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts) + ["system", "user", "assistant"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  extra_special_tokens={"image_token": IMAGE_TOKEN},
                                  clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
                                  model_max_length=2048)
    out_dir = Path(out_dir)
    with _quiet_transformers():
        tok.save_pretrained(out_dir, save_jinja_files=False)  # template inline, as in the MiniMind tokenizers
    # transformers 5 writes its backend class and a list-valued extra_special_tokens that 4.x cannot read;
    # spell the config as the v3 MiniMind tokenizer does, which every version loads.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("extra_special_tokens", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", image_token=IMAGE_TOKEN,
                  additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    loaded = AutoTokenizer.from_pretrained(out_dir)
    assert loaded.encode(IMAGE_TOKEN, add_special_tokens=False) == [SPECIAL_TOKENS.index(IMAGE_TOKEN)]
    return loaded


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' save progress bars and advisories for the duration of a block."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


# ---- the whole demo ---------------------------------------------------------------------------------

def make_demo(out_dir: Path, n_train: int = 4000, n_val: int = 256, seed: int = 0, scene=shape_scene) -> dict:
    """Write images + records, encoder/ and tokenizer/ under out_dir (skipped when already built alike);
    `scene(rng) -> (image, prompt, caption, meta)` draws the images (the detail demo passes its own)."""
    out_dir = Path(out_dir)
    params = {"version": DEMO_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
              **({} if scene is shape_scene else {"scene": f"{scene.__module__}.{scene.__name__}"})}
    marker = out_dir / MARKER
    previous = _read_marker(marker)
    if previous.get("params") == params:
        print(f"demo: {out_dir} already built ({n_train} train + {n_val} val images); nothing to do")
        return previous["summary"]
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)  # a build interrupted from here on is redone whole
    records = make_images_and_records(out_dir, n_train, n_val, seed, scene)
    vcfg = build_tiny_clip(out_dir / "encoder", seed=seed)
    tok = build_tokenizer(out_dir / "tokenizer", record_texts(records["train"] + records["val"]))
    summary = {"train_records": len(records["train"]), "val_records": len(records["val"]),
               "text_only": len(TEXT_ONLY), "image_tokens": (vcfg.image_size // vcfg.patch_size) ** 2,
               "width": vcfg.hidden_size, "vocab_size": len(tok)}
    atomic_write_json(marker, {"params": params, "summary": summary})
    print(f"demo: {n_train} train + {n_val} val images, encoder T={summary['image_tokens']} "
          f"D={summary['width']}, tokenizer vocab {summary['vocab_size']} -> {out_dir} "
          f"({time.perf_counter() - t0:.1f}s)")
    return summary


def _read_marker(marker: Path) -> dict:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
