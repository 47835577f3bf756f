"""Held-out evaluation of a finished run: losses with true and shuffled images, captions, a contact sheet.

Design choices:
- Image features come from the cache the run was trained on (bitwise what the live path computes), so
  evaluation needs no encoder and no image decoding except for the thumbnails.
- Losses are token-weighted over every held-out sample, with the same `evaluate` the trainer logs, in
  the compute dtype the run trained in (`train.dtype`).
- Each captioned sample is asked its own first user turn, its images at its tags (the first k images of
  the sample, k the tags of that turn), and compared with that turn's answer: on SFT data (questions,
  several turns) a caption row shows the sample's own question and answer. A bare caption's turn asks
  tokenizer.prompt, as training did, so single-caption data is captioned as before. Samples that ask the
  same prompt with the same number of images are captioned together.
- Output goes to `runs/<name>/eval/`: `eval.json` (numbers), `captions.md`, `contact_sheet.png`.
"""
from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from minivlm.config import load_config
from minivlm.embedding import mirror
from minivlm.embedding.encoder import EncoderSpec
from minivlm.fileio import atomic_write, atomic_write_json, atomic_write_text
from minivlm.formats.records import IMAGE_TAG, Record, resolve_image, user_text
from minivlm.formats.sources import read_records
from minivlm.training.data import BatchSampler, Samples, join, load_splits, open_cache
from minivlm.training.model import VLMConfig
from minivlm.training.trainer import amp_dtype, evaluate
from minivlm.use.captioner import Captioner, caption_features, load_run


def held_out(run_dir: Path, vc: VLMConfig, cache_dir: str | None, records: str | None):
    """The run's config (cache optionally replaced), its validated cache and the held-out split."""
    cfg = load_config(run_dir / "config.toml")
    if cache_dir:
        cfg = replace(cfg, cache=replace(cfg.cache, dir=cache_dir, mirror=""))  # a URL: its own mirror
    manifest, index = open_cache(cfg, vc.cache_tokens, vc.image_dim)
    vc.encoder.check(EncoderSpec.of_manifest(manifest), f"cache {cfg.cache.dir}", f"run {run_dir}",
                     "pass --cache with the cache this run was trained on")
    split = join(read_records(records, cfg.data, mirror.local(cfg)), index) if records else load_splits(cfg, index)[1]
    if not len(split):
        raise ValueError(f"no held-out samples with cached images for {run_dir}; pass --records")
    return cfg, index, split


def first_turn(record: Record) -> tuple[str, int, str]:
    """A sample's first user turn (its <image> tags in place), the images that turn holds, and its answer."""
    roles = [r for r, _ in record.turns]
    u = roles.index("user") if "user" in roles else 0
    ask = record.turns[u][1] if roles[u] == "user" else ""
    answer = next((t for r, t in record.turns[u + 1:] if r == "assistant"), "")
    return ask, ask.count(IMAGE_TAG), answer


def evaluate_run(run_dir: str | Path, cache_dir: str | None = None, records: str | None = None, n: int = 32,
                 device: str = "cpu") -> dict:
    run_dir = Path(run_dir)
    cap = load_run(run_dir, device, with_encoder=False)
    cfg, index, split = held_out(run_dir, cap.model.config, cache_dir, records)
    ds = Samples(split, index.reader(), cap.fmt)
    batches = [ds[ix] for ix in BatchSampler(ds, cfg.train.batch_size, 0, shuffle=False).batches(0)]
    losses = evaluate(cap.model, batches, index.codec, amp_dtype(cfg.train, device), device)  # the run's dtype

    samples = caption_samples(cap, ds, index.codec, n)
    ds.close()
    result = {"run": str(run_dir), "cache": cfg.cache.dir, "n_eval_samples": len(ds.split),
              **losses, "captions": samples}
    out = run_dir / "eval"
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "captions.md", captions_markdown(result))
    sheet = contact_sheet([(resolve_image(cfg.data.image_root, s["images"][0]), s["generated"], s["reference"])
                           for s in samples])
    atomic_write(out / "contact_sheet.png", lambda p: sheet.save(p, format="PNG"))
    print(f"evaluate: {len(ds.split)} held-out samples, eval_loss {losses['eval_loss']:.4f}, shuffled-image "
          f"{losses['eval_loss_shuffled']:.4f}, image gap {losses['image_gap']:.3f} nats -> {out}/")
    return result


def caption_samples(cap: Captioner, ds: Samples, codec, n: int) -> list[dict]:
    """Greedy captions of the first n held-out samples whose first user turn shows images (of those that fit
    tokenizer.max_len), from their cached rows, each asked its own first turn: id, image keys, prompt, generated
    and reference (that turn's answer) each."""
    split = ds.split
    asks = {i: first_turn(split.records[i]) for i in range(len(split))}
    picked = [i for i in range(len(split)) if asks[i][1]][:n]  # samples whose first turn shows images
    generated = {}
    for prompt, k in dict.fromkeys(asks[i][:2] for i in picked):  # one prompt, k images: captioned together
        group = [i for i in picked if asks[i][:2] == (prompt, k)]
        slots = [split.first[i] + np.arange(k) for i in group]  # each sample's first k images
        tiles = [int(split.layout[s, 0].sum()) for s in slots]
        rows = torch.cat([ds.rows(np.array([i]))[:t] for i, t in zip(group, tiles)])
        generated.update(zip(group, caption_features(cap, codec.decode(rows), prompt, per_prompt=k,
                                                     layouts=split.layout[np.concatenate(slots)])))
    samples = []
    for i in picked:
        rec, (ask, k, answer) = split.records[i], asks[i]
        samples.append({"id": rec.id, "images": list(rec.images[:k]), "prompt": user_text(ask),
                        "generated": generated[i], "reference": answer})
    return samples


def captions_markdown(result: dict) -> str:
    lines = [f"# Captions: {result['run']}", "",
             f"eval_loss {result['eval_loss']:.4f} · shuffled-image {result['eval_loss_shuffled']:.4f} · "
             f"image gap {result['image_gap']:.3f} nats · {result['n_eval_samples']} held-out samples", "",
             "| image | prompt | generated | reference |", "| --- | --- | --- | --- |"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines += [f"| {', '.join(f'`{k}`' for k in s['images'])} | {cell(s['prompt'])} | {cell(s['generated'])} | "
              f"{cell(s['reference'])} |"
              for s in result["captions"]]
    return "\n".join(lines) + "\n"


def contact_sheet(items: list[tuple[Path | None, str, str]], thumb: int = 192, cols: int = 4) -> Image.Image:
    """Thumbnails with the generated (black) and reference (grey) caption under each."""
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 4
    wrap = max(12, int(thumb / (font.getlength("abcdefghij") / 10)) - 2)
    text_lines = 8
    cell_w, cell_h = thumb + 16, thumb + text_lines * line_h + 16
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * cell_w + 16, rows * cell_h + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (path, gen, ref) in enumerate(items):
        x, y = 16 + (k % cols) * cell_w, 16 + (k // cols) * cell_h
        try:
            with Image.open(path) as im:
                sheet.paste(ImageOps.contain(im.convert("RGB"), (thumb, thumb)), (x, y))
        except (OSError, TypeError, AttributeError):
            draw.rectangle([x, y, x + thumb, y + thumb], outline="red")
            draw.text((x + 4, y + 4), "image unavailable", fill="red", font=font)
        gen_lines = textwrap.wrap("gen: " + gen, wrap)[:text_lines // 2]
        ref_lines = textwrap.wrap("ref: " + ref, wrap)[:text_lines - len(gen_lines)]
        ty = y + thumb + 6
        for line, colour in [(ln, "black") for ln in gen_lines] + [(ln, "gray") for ln in ref_lines]:
            draw.text((x, ty), line, fill=colour, font=font)
            ty += line_h
    return sheet
