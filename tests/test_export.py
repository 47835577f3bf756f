"""Export to transformers: the exported LLaVA (or causal LM) computes what the run computes, loads offline
with transformers alone, and runs without an exact export are refused in one line."""
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import demo_config, run_stage, train_config
from minivlm.demo.folder import CLIP_MEAN, CLIP_STD
from minivlm.dist import Dist
from minivlm.embedding.embed import run_embed
from minivlm.embedding.encoder import features, load_image, preprocess
from minivlm.training.model import VLM
from minivlm.training.text import prompt_ids
from minivlm.training.trainer import fit
from minivlm.use.captioner import caption_features, live_features, load_run
from minivlm.use.export import export_run, refusal
from minivlm.use.generate import generate

PROMPT = "Describe the picture briefly."
N_IMAGES, NEW_TOKENS = 8, 24
# 64 image rows (pool 1) + prompt + a 24-token answer: more room than the demo's 96 / 128
ROOM = ["encoder.pool=1", "tokenizer.max_len=128", "model.max_seq_len=160"]
SHORT = ["train.max_steps=8", "train.batch_size=16", "train.eval_batches=1", "train.log_interval=4"]
TINY = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.multiple_of=16"]


def build_tiny_siglip(out_dir: Path) -> None:
    """A random SigLIP vision tower shaped like the demo CLIP (64 px, patch 8, width 64, 2 layers)."""
    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4)).save_pretrained(out_dir)
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    cls(size={"height": 64, "width": 64}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out_dir)


def trained_run(demo: Path, work: Path, *overrides: str):
    cfg = demo_config(demo, work, f"train.out_dir={work}/runs", f"cache.dir={work}/cache", *overrides)
    run_embed(cfg, Dist())
    fit(cfg, Dist())
    return cfg


def held_out_images(demo: Path) -> list[Path]:
    return [demo / "images" / r["image"] for r in json.loads((demo / "val.json").read_text())[:N_IMAGES]]


def exported_inputs(proc, paths: list[Path], prompt: str):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return proc(images=[Image.open(p) for p in paths], text=[text] * len(paths), return_tensors="pt")


def assert_exact_export(run_dir: Path, out: Path, demo: Path):
    """The acceptance checks for one exported run against the run itself."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    export_run(run_dir, out)
    hf = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    cap = load_run(run_dir)
    paths = held_out_images(demo)
    inputs = exported_inputs(proc, paths, PROMPT)
    ours_ids = torch.tensor([prompt_ids(cap.fmt, PROMPT)] * len(paths))
    assert torch.equal(inputs["input_ids"], ours_ids)  # the processor builds caption.py's prompt

    pixels = torch.stack([preprocess(cap.encoder.processor, load_image(p, 10 ** 8)) for p in paths])
    assert torch.equal(inputs["pixel_values"], pixels)
    exact = features(cap.encoder, pixels).float()  # (B, T, D) before the fp16 storage rounding
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = cap.model(ours_ids, exact).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, ours_ids.size(1):].tolist()
    gen = [row[:row.index(cap.fmt.eos_id) + 1] if cap.fmt.eos_id in row else row for row in gen]
    assert gen == generate(cap.model, ours_ids, exact, NEW_TOKENS, cap.fmt.eos_id)  # same features: same tokens
    stored, _, _ = live_features(cap, paths)  # what caption.py feeds: fp16 rows
    captions = caption_features(cap, stored, prompt=PROMPT, max_new_tokens=NEW_TOKENS)
    for i, (caption, row) in enumerate(zip(captions, gen)):
        if caption != proc.decode(row, skip_special_tokens=True).strip():
            assert_near_tie(cap, ours_ids[i:i + 1], exact[i:i + 1], stored[i:i + 1], row)
    return hf, proc, cap


def assert_near_tie(cap, ids, exact, stored, row):
    """Where caption.py's fp16 rows pick another token than the exact features, the two were nearly tied."""
    ours = generate(cap.model, ids, stored, NEW_TOKENS, cap.fmt.eos_id)[0]
    k = next(i for i, (a, b) in enumerate(zip(ours, row)) if a != b)
    with torch.no_grad():
        logits = cap.model(torch.cat([ids, torch.tensor([row[:k]])], 1), stored).logits[0, -1]
    margin = (logits[ours[k]] - logits[row[k]]).item()
    assert 0 <= margin < 1e-2, f"step {k}: fp16 rows prefer token {ours[k]} by {margin} logits, not a near-tie"


@pytest.fixture(scope="module")
def clip_run(demo, tmp_path_factory):
    return trained_run(demo, tmp_path_factory.mktemp("export_clip"), *ROOM, *SHORT)


def test_linear_projector_run_exports_to_llava_with_the_same_prompt_logits_and_captions(demo, clip_run, tmp_path):
    assert clip_run.model.projector == "linear"
    assert_exact_export(clip_run.train.run_dir, tmp_path / "hf", demo)


@pytest.fixture(scope="module")
def anyres_run(demo, tmp_path_factory):
    """A run on a cache tiled as LLaVA-NeXT tiles (base image + grid, 64 rows a tile)."""
    return trained_run(demo, tmp_path_factory.mktemp("export_anyres"), "encoder.pool=1", "encoder.tiles=anyres",
                       "tokenizer.max_len=400", "model.max_seq_len=440", *SHORT)


def test_an_anyres_run_exports_to_llava_next_with_the_same_prompt_logits_and_captions(demo, anyres_run, tmp_path):
    """Wide, tall and square images through LlavaNextForConditionalGeneration and its processor alone: the same
    tiles, the same prompt ids (the image token expanded to base + unpadded grid + newlines), our logits within
    1e-4 and our greedy tokens."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from minivlm.embedding.encoder import tile_pixels
    from minivlm.training.layout import image_index

    export_run(anyres_run.train.run_dir, tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    cap = load_run(anyres_run.train.run_dir)
    square = Image.open(held_out_images(demo)[0]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    for im in (square.resize((150, 40)), square.resize((40, 150)), square, square.resize((70, 130))):
        tiles, lay = tile_pixels(cap.encoder.processor, cap.encoder.tiling, im)
        layout = (len(tiles), *lay)
        inputs = proc(images=[im], text=[text], return_tensors="pt")
        ids = torch.tensor([prompt_ids(cap.fmt, PROMPT, layouts=[layout])])
        assert torch.equal(inputs["input_ids"], ids), im.size  # the processor counts the positions we place
        torch.testing.assert_close(inputs["pixel_values"][0][:len(tiles)], tiles, atol=1e-6, rtol=0)
        exact = features(cap.encoder, tiles).float()  # (tiles, T, D)
        index = torch.from_numpy(image_index("anyres", [layout], cap.fmt.image_tokens, cap.fmt.image_token))
        with torch.no_grad():
            ours = cap.model(ids, exact, image_index=index).logits
            torch.testing.assert_close(hf(**inputs).logits, ours, atol=1e-4, rtol=0)
            gen = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[:, ids.size(1):].tolist()
        assert gen == generate(cap.model, ids, exact, 6, None, image_index=index), im.size


def test_a_split_run_is_refused_in_one_line_and_exports_its_lm(demo, tmp_path):
    cfg = trained_run(demo, tmp_path, "encoder.pool=1", "encoder.tiles=split", "encoder.max_tiles=2", "tokenizer.max_len=600",
                      "model.max_seq_len=640", *SHORT, *TINY)
    with pytest.raises(ValueError, match="encoder.tiles=split: transformers' Idefics3 .*--lm-only") as e:
        export_run(cfg.train.run_dir, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert export_run(cfg.train.run_dir, tmp_path / "lm", lm_only=True)["class"] == "LlamaForCausalLM"


def test_a_two_image_prompt_through_the_export_computes_what_the_run_computes(demo, clip_run, tmp_path):
    """Two images in one prompt, text between and after them: transformers alone builds the same prompt ids, fills
    the images in order, and gives our logits (1e-4) and our greedy tokens; swapping the images changes both alike."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    export_run(clip_run.train.run_dir, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    cap = load_run(clip_run.train.run_dir)
    parts = [{"type": "text", "text": "First"}, {"type": "image"}, {"type": "text", "text": "then"},
             {"type": "image"}, {"type": "text", "text": "which shapes?"}]
    text = proc.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False)
    ours_ids = torch.tensor([prompt_ids(cap.fmt, "First<image>\nthen<image>\nwhich shapes?", images=2)])
    for paths in (held_out_images(demo)[:2], held_out_images(demo)[1::-1]):
        inputs = proc(images=[Image.open(p) for p in paths], text=[text], return_tensors="pt")
        assert torch.equal(inputs["input_ids"], ours_ids) and inputs["pixel_values"].shape[0] == 2
        exact = features(cap.encoder, inputs["pixel_values"]).float()  # (2, T, D): the images in order
        with torch.no_grad():
            torch.testing.assert_close(hf(**inputs).logits, cap.model(ours_ids, exact).logits, atol=1e-4, rtol=0)
            gen = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[:, ours_ids.size(1):].tolist()
        assert gen == generate(cap.model, ours_ids, exact, 6, None)


# Logits of the export against the run: on the same features, fp32 summation order alone (EXACT_ATOL); against
# caption.py, which feeds the cache's rows as stored (float16 here, cache.dtype), the rows' rounding (STORED_ATOL).
EXACT_ATOL, STORED_ATOL = 1e-4, 1e-3  # docs/using.md states both; seen here: 0 and 1.8e-4
PLACES = {  # caption.py's prompt -> the same prompt as content parts, images anywhere in the text
    "start": ("<image>\nWhich shape is it?", [{"type": "image"}, {"type": "text", "text": "Which shape is it?"}]),
    "middle": ("Is <image> a circle?", [{"type": "text", "text": "Is "}, {"type": "image"},
                                        {"type": "text", "text": " a circle?"}]),
    "end": ("What is this? <image>", [{"type": "text", "text": "What is this? "}, {"type": "image"}]),
    "two": ("<image>\nCompare it with <image> please.", [
        {"type": "image"}, {"type": "text", "text": "Compare it with "}, {"type": "image"},
        {"type": "text", "text": " please."}]),
}


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    out = tmp_path_factory.mktemp("clip_export") / "hf"
    mask = os.umask(0o022)
    try:
        export_run(clip_run.train.run_dir, out)
    finally:
        os.umask(mask)
    return (out, LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval(),
            AutoProcessor.from_pretrained(out, local_files_only=True), load_run(clip_run.train.run_dir))


@pytest.mark.parametrize("place", list(PLACES))
def test_content_parts_and_inline_tokens_give_caption_pys_ids_and_greedy_tokens_with_images_anywhere(
        demo, clip_export, place):
    """The exported processor's template, given transformers' content parts or a string with the image token
    inline, builds exactly caption.py's ids for the same prompt; transformers alone then gives the run's logits
    (EXACT_ATOL on the same features, STORED_ATOL against the stored rows caption.py feeds) and greedy tokens."""
    _, hf, proc, cap = clip_export
    prompt, parts = PLACES[place]
    k = prompt.count("<image>")
    ours_ids = torch.tensor([prompt_ids(cap.fmt, prompt, images=k)])
    paths = held_out_images(demo)[:k]
    inline = prompt.replace("<image>", cap.fmt.image_token)
    for content in (parts, inline):
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
        inputs = proc(images=[Image.open(p) for p in paths], text=[text], return_tensors="pt")
        assert torch.equal(inputs["input_ids"], ours_ids), (place, type(content))
    exact = features(cap.encoder, inputs["pixel_values"]).float()  # (k, T, D) live, before the storage rounding
    stored, _, _ = live_features(cap, paths)                        # what caption.py feeds
    with torch.no_grad():
        theirs = hf(**inputs).logits
        torch.testing.assert_close(theirs, cap.model(ours_ids, exact).logits, atol=EXACT_ATOL, rtol=0)
        torch.testing.assert_close(theirs, cap.model(ours_ids, stored).logits, atol=STORED_ATOL, rtol=0)
        gen = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, ours_ids.size(1):].tolist()
    gen = [row[:row.index(cap.fmt.eos_id) + 1] if cap.fmt.eos_id in row else row for row in gen]
    assert gen == generate(cap.model, ours_ids, exact, 8, cap.fmt.eos_id)


def test_a_run_and_its_export_are_readable_as_the_umask_allows(clip_run, clip_export):
    """0644 under umask 022 (the export written under it; the run's files as the test process's umask gave them),
    each still published by a rename."""
    out, *_ = clip_export
    assert {f.name: f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()} == \
        {f.name: 0o644 for f in out.rglob("*") if f.is_file()}
    mask = os.umask(0)
    os.umask(mask)
    run = clip_run.train.run_dir
    assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_mlp2x_gelu_run_exports_exactly(demo, clip_run, tmp_path):
    cfg = train_config(demo, Path(clip_run.cache.dir), tmp_path, *ROOM, *SHORT, "model.projector=mlp2x_gelu")
    fit(cfg, Dist())
    hf, _, _ = assert_exact_export(cfg.train.run_dir, tmp_path / "hf", demo)
    assert hf.config.projector_hidden_act == "gelu"


def test_v1_style_last_layer_with_cls_exports_with_the_full_strategy(demo, tmp_path):
    cfg = trained_run(demo, tmp_path, *ROOM, *SHORT, *TINY, "encoder.select_layer=-1", "encoder.keep_cls=true")
    hf, proc, cap = assert_exact_export(cfg.train.run_dir, tmp_path / "hf", demo)
    assert hf.config.vision_feature_select_strategy == "full" and hf.config.vision_feature_layer == -1
    assert cap.fmt.image_tokens == 65  # CLS + 8x8 patches


def test_siglip_tower_exports_with_every_row(demo, tmp_path):
    build_tiny_siglip(tmp_path / "siglip")
    cfg = trained_run(demo, tmp_path, *ROOM, *SHORT, *TINY, f"encoder.name_or_path={tmp_path}/siglip")
    hf, _, cap = assert_exact_export(cfg.train.run_dir, tmp_path / "hf", demo)
    assert hf.config.vision_config.model_type == "siglip_vision_model" and cap.fmt.image_tokens == 64
    assert hf.config.vision_feature_select_strategy == "full"  # `default` would drop a patch row


@pytest.mark.parametrize("setting", ["model.projector=mlp", "encoder.pool=2", "model.pool=2", "model.pixel_shuffle=2"])
def test_runs_without_an_exact_export_are_refused_in_one_line_and_export_their_lm(
        demo, demo_cache, clip_run, tmp_path, setting):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cache = demo_cache if setting == "encoder.pool=2" else clip_run.cache.dir
    room = [] if setting == "encoder.pool=2" else ROOM
    cfg = train_config(demo, Path(cache), tmp_path, *room, "train.max_steps=2", "train.eval_batches=1", setting)
    fit(cfg, Dist())
    with pytest.raises(ValueError, match=f"cannot be exported exactly: {setting}.*--lm-only to export the LM alone"):
        export_run(cfg.train.run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    if setting == "model.projector=mlp":  # the stage says it in one line
        r = run_stage("export.py", "--run", str(cfg.train.run_dir), "--out", str(tmp_path / "hf"))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and setting in r.stderr, r.stderr

    export_run(cfg.train.run_dir, tmp_path / "lm", lm_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", local_files_only=True).eval()
    assert isinstance(lm, LlamaForCausalLM)
    cap = load_run(cfg.train.run_dir, with_encoder=False)
    ids = torch.tensor([prompt_ids(cap.fmt, PROMPT, images=0)])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, cap.model(ids).logits, atol=1e-4, rtol=0)


def test_export_loads_offline_with_no_custom_code(demo, clip_run, tmp_path):
    out = tmp_path / "hf"
    export_run(clip_run.train.run_dir, out)
    assert not [p for p in out.rglob("*") if p.suffix == ".py"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    code = ("import sys; from transformers import AutoProcessor, LlavaForConditionalGeneration as L; "
            "L.from_pretrained(sys.argv[1], local_files_only=True); AutoProcessor.from_pretrained(sys.argv[1], "
            "local_files_only=True); print('ok')")
    import subprocess
    import sys
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        export_run(clip_run.train.run_dir, out)
    export_run(clip_run.train.run_dir, out, overwrite=True)


def test_moe_runs_are_refused_even_for_the_lm_alone(clip_run):
    vc = VLM.from_pretrained(clip_run.train.run_dir).config
    assert refusal(vc, lm_only=False) is None and refusal(vc, lm_only=True) is None
    moe = replace(vc, model=replace(vc.model, use_moe=True))
    assert refusal(moe, lm_only=True).startswith("model.use_moe=true")


def test_post_layernorm_runs_are_refused_but_export_their_lm(clip_run):
    """LLaVA's vision_feature_layer reads hidden_states, before any post_layernorm (MiniMind-V's features)."""
    vc = VLM.from_pretrained(clip_run.train.run_dir).config
    normed = replace(vc, encoder=replace(vc.encoder, fingerprint={**vc.encoder.fingerprint, "post_layernorm": True}))
    assert refusal(normed, lm_only=False).startswith("encoder.post_layernorm=true: LLaVA's vision_feature_layer")
    assert refusal(normed, lm_only=True) is None


def test_save_pretrained_round_trips_the_model_and_its_config(clip_run, tmp_path):
    model = VLM.from_pretrained(clip_run.train.run_dir)
    model.save_pretrained(tmp_path, model.config)
    again = VLM.from_pretrained(tmp_path)
    assert again.config == model.config and again.config.encoder.fingerprint["weights"]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    saved = json.loads((tmp_path / "model_config.json").read_text())
    (tmp_path / "model_config.json").write_text(json.dumps({**saved, "format": 3}))
    with pytest.raises(ValueError, match="model_config.json has format 3, this minivlm reads 2; use the minivlm"):
        VLM.from_pretrained(tmp_path)
    v1 = {k: v for k, v in saved.items() if k not in ("format", "image_dim")}  # format 1: the trainer's old dict
    v1.update(image_width=saved["image_dim"], encoder={k: v for k, v in saved["encoder"].items() if k != "fingerprint"},
              fingerprint_fields=saved["encoder"]["fingerprint"], fingerprint="id", image_token="<|image_pad|>")
    (tmp_path / "model_config.json").write_text(json.dumps(v1))
    assert VLM.from_pretrained(tmp_path).config == model.config


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_runs_with_the_real_minimind_tokenizers_export_exactly(demo, clip_run, tmp_path, version):
    from conftest import tokenizer_dir
    cfg = train_config(demo, Path(clip_run.cache.dir), tmp_path, *ROOM, "train.max_steps=1", "train.eval_batches=1",
                       f"tokenizer.name_or_path={tokenizer_dir(version)}", "tokenizer.max_len=160",
                       "model.max_seq_len=200")
    fit(cfg, Dist())
    assert_exact_export(cfg.train.run_dir, tmp_path / "hf", demo)


def test_export_refuses_an_encoder_that_no_longer_matches_the_fingerprint(clip_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    shutil.copytree(clip_run.train.run_dir, run)
    shutil.copytree(clip_run.encoder.name_or_path, tmp_path / "encoder")
    weights = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    name = sorted(weights)[-1]
    save_file({**weights, name: weights[name] + 0.01}, str(tmp_path / "encoder" / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((run / "model_config.json").read_text())
    config["encoder"]["name_or_path"] = str(tmp_path / "encoder")
    (run / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has encoder.weights=.* where the fingerprint run .* was trained with"):
        export_run(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_leaves_the_previous_one_and_no_temporary_files(clip_run, tmp_path, monkeypatch):
    from transformers import LlavaProcessor
    out = tmp_path / "hf"
    export_run(clip_run.train.run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, *a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(LlavaProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_run(clip_run.train.run_dir, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_qk_norm_lm_exports_as_qwen3(demo, clip_run, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM
    cfg = train_config(demo, Path(clip_run.cache.dir), tmp_path, *ROOM, "train.max_steps=4", "train.eval_batches=1",
                       "model.qk_norm=true", "model.head_dim=24", "model.norm_eps=1e-6")
    fit(cfg, Dist())
    hf, _, cap = assert_exact_export(cfg.train.run_dir, tmp_path / "hf", demo)
    assert hf.config.text_config.model_type == "qwen3"
    export_run(cfg.train.run_dir, tmp_path / "lm", lm_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", local_files_only=True).eval()
    assert isinstance(lm, Qwen3ForCausalLM)
    ids = torch.tensor([prompt_ids(cap.fmt, PROMPT, images=0)])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, cap.model(ids).logits, atol=1e-4, rtol=0)
