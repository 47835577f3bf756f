"""Export a trained run to transformers: `LlavaForConditionalGeneration` + `LlavaProcessor`, or the LM alone
as a causal LM, loadable with transformers alone (no minivlm, no `trust_remote_code`).

Design choices:
- Only exact exports: every mapping below computes the same function as the run. A run that has no exact
  LLaVA form (LayerNorm `mlp` projector, `encoder.pool > 1`, `model.pool > 1`, `model.pixel_shuffle > 1`,
  `encoder.post_layernorm`, MoE) is refused with one line naming the setting and what would export;
  `--lm-only` still exports a dense LM. (Pixel shuffle is Idefics3's connector: the place for that export is
  `refusal`'s pixel_shuffle line.)
- Built in memory with transformers' own classes, our tensors copied into their modules, written with
  their `save_pretrained`: the file layout is whatever this transformers version writes and reads back.
- The LM: MiniMind2-style dense -> `LlamaForCausalLM` (same parameter names, RMSNorm, rotate-half RoPE,
  GQA, SwiGLU, tied embeddings); with `qk_norm` (minimind-3) -> `Qwen3ForCausalLM` (the same plus per-head
  q/k RMSNorm, also under our names). `lm_config` is the one place that picks the architecture.
- The projector: `mlp2x_gelu` is LLaVA's Linear -> GELU -> Linear. `linear` maps onto the same two
  layers with the activation `linear` (identity) and an identity second layer (x @ I + 0 is exact in fp32).
- Feature selection: `select_layer` is `vision_feature_layer` (both index hidden_states); LLaVA's
  `default` strategy drops the first row (CLIP's CLS), `full` keeps every row: CLIP with keep_cls, and
  SigLIP, which has no CLS.
- The vision tower is the whole encoder stage 1 used (stage 1 drops the layers after select_layer),
  loaded from the run's stored spec, checked against the run's fingerprint, and its own weights hash
  checked against the fingerprint's.
- The processor's chat template turns content parts (`{"type": "image"}`, `{"type": "text", "text": P}`, in
  any number and order) into the user text training used (each image part an image token where it stands,
  followed by a newline unless the text after it starts with whitespace: records read content parts with the
  same rule, `records.parts_text`; the text trimmed as records trim it) and then applies the run tokenizer's
  own template, so it yields the prompt ids caption.py builds for the same prompt with `<image>` tags where
  the parts are, at the start, in the middle or at the end of the text, for one image or several; a string
  content with the image token inline passes as it is (caption.py's prompt with the tags inline); the processor expands each image
  token to the T rows the model was trained on, and LLaVA fills them with the images in order, as training
  does. `generation_config` never generates the image token (as our generate).
- Written into a temporary sibling directory, fsynced, published with one rename.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from minivlm.config import ModelConfig
from minivlm.embedding.encoder import EncoderSpec, load_encoder, weights_hash
from minivlm.fileio import fsync_dir, publishable
from minivlm.training.model import VLM, VLMConfig
from minivlm.training.text import TextFormat, load_tokenizer, text_format

LLAVA_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}  # ours -> LLaVA's projector_hidden_act


def refusal(vc: VLMConfig, lm_only: bool) -> str | None:
    """Why this run has no exact export (None if it has one)."""
    if vc.model.use_moe:
        return "model.use_moe=true: MoE LMs have no exact export here; dense runs export (Llama, or Qwen3 with qk_norm)"
    if lm_only:
        return None
    alt = "; or pass --lm-only to export the LM alone"
    if vc.encoder.pool > 1:
        return (f"encoder.pool={vc.encoder.pool}: LLaVA has no step that averages the patch grid; runs embedded "
                f"with encoder.pool=1 export{alt}")
    if vc.model.pool > 1:
        return (f"model.pool={vc.model.pool}: LLaVA has no step that averages the patch grid; runs with model.pool=1 "
                f"export{alt}")
    if vc.model.pixel_shuffle > 1:
        return (f"model.pixel_shuffle={vc.model.pixel_shuffle}: LLaVA has no pixel shuffle before its projector; runs "
                f"with model.pixel_shuffle=1 export{alt}")
    if vc.encoder.storage_dtype in ("int8", "float8_e4m3"):
        return (f"cache.dtype={vc.encoder.storage_dtype}: LLaVA has no step that quantizes the tower's features as "
                f"the run saw them; runs on a float16 or bfloat16 cache export{alt}")
    if vc.encoder.post_layernorm:
        return ("encoder.post_layernorm=true: LLaVA's vision_feature_layer takes hidden_states, before the tower's "
                f"post_layernorm; runs embedded without it export{alt}")
    if vc.model.projector not in LLAVA_PROJECTORS:
        return (f"model.projector={vc.model.projector} (LayerNorm first) has no LLaVA equivalent; runs with "
                f"model.projector=mlp2x_gelu or linear export{alt}")
    if vc.encoder.tiles == "split":
        return ("encoder.tiles=split: transformers' Idefics3 computes a SigLIP tower, pixel shuffle and one Linear "
                f"without bias, which a LLaVA projector's bias and GELU are not; runs tiled with encoder.tiles=anyres "
                f"export to LLaVA-NeXT{alt}")
    return None


def lm_config(cfg: ModelConfig, fmt: TextFormat):
    """The transformers config of our dense LM: the one place that picks the architecture. q/k RMSNorm per
    head (minimind-3) is Qwen3's attention; without it (MiniMind2, v1) the LM is Llama's."""
    from transformers import LlamaConfig, Qwen3Config

    same = dict(vocab_size=fmt.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attention_bias=False, tie_word_embeddings=True, bos_token_id=fmt.tokenizer.bos_token_id,
                eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id)
    return Qwen3Config(**same, use_sliding_window=False) if cfg.qk_norm else LlamaConfig(**same, mlp_bias=False)


def lm_state(model: VLM) -> dict[str, torch.Tensor]:
    """Our LM's tensors under their (shared) causal-LM names: `model.*`, `lm_head.weight`."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("projector.") and k != "image_newline"}


def projector_state(model: VLM) -> dict[str, torch.Tensor]:
    """Our projector as LLaVA's `linear_1` / `linear_2`."""
    p = model.projector
    if model.cfg.projector == "mlp2x_gelu":
        second_w, second_b = p[2].weight, p[2].bias
    else:  # linear: identity second layer (with activation `linear`)
        second_w, second_b = torch.eye(model.cfg.dim), torch.zeros(model.cfg.dim)
    return {"linear_1.weight": p[0].weight, "linear_1.bias": p[0].bias,
            "linear_2.weight": second_w, "linear_2.bias": second_b}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not missing and not unexpected, f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}"


def generation_config(fmt: TextFormat):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=fmt.tokenizer.bos_token_id, eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id,
                            do_sample=False, suppress_tokens=[fmt.image_token_id])


def chat_template(fmt: TextFormat) -> str:
    """The processor's template: list contents -> the user text training built, then the tokenizer's template
    (without one, the LLaVA `plain` format: the image token alone)."""
    if not fmt.chat:
        return ("{%- for message in messages -%}{%- for part in message['content'] if part is mapping -%}"
                "{%- if part['type'] == 'image' -%}" + fmt.image_token + "{%- endif -%}{%- endfor -%}{%- endfor -%}")
    return ("{%- set ns = namespace(messages=[], text='') -%}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
            "{%- else -%}{%- set ns.text = '' -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '" + fmt.image_token + "' -%}"
            "{%- set after = message['content'][loop.index0 + 1] if not loop.last else none -%}"
            "{%- if not (after is mapping and after['type'] == 'text' and after['text'][:1] in [' ', '\\n', '\\t'] "
            "and after['text'][:1]) -%}{%- set ns.text = ns.text + '\\n' -%}{%- endif -%}"
            "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
            "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text | trim}] -%}"
            "{%- endfor -%}{%- set messages = ns.messages %}" + fmt.tokenizer.chat_template)


def vision_tower(run_dir: Path, spec: EncoderSpec):
    """The run's whole encoder and the minivlm Encoder stage 1 used (its processor, its tiling), refused unless it
    is the fingerprinted one."""
    enc = load_encoder(spec.encoder_config(), "cpu", spec.storage_dtype)  # truncated; its fingerprint is checked
    spec.check(EncoderSpec.of_encoder(enc), f"encoder {spec.name_or_path}",
               f"the fingerprint run {run_dir} was trained with", "restore the original encoder files")
    full = type(enc.model).from_pretrained(spec.name_or_path, local_files_only=enc.cfg.local_files_only)
    assert weights_hash(full) == spec.fingerprint["weights"], "the reloaded tower is not the fingerprinted one"
    return full.float(), enc


def pinpoints(enc) -> list[list[int]] | None:
    """An anyres run's grid pinpoints (h, w in pixels) for LLaVA-NeXT; None for an untiled run."""
    return [list(p) for p in enc.tiling.pinpoints] if enc.tiling.policy == "anyres" else None


def llava(model: VLM, fmt: TextFormat, tower, strategy: str, grid_pinpoints: list | None = None):
    """LlavaForConditionalGeneration holding our tower, projector and LM; with `grid_pinpoints` (an anyres run)
    LlavaNextForConditionalGeneration, our learned newline row its `image_newline`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    vc = model.config
    same = dict(vision_config=tower.config, text_config=lm_config(model.cfg, fmt),
                image_token_index=fmt.image_token_id, projector_hidden_act=LLAVA_PROJECTORS[model.cfg.projector],
                vision_feature_select_strategy=strategy, vision_feature_layer=vc.encoder.select_layer,
                multimodal_projector_bias=True, tie_word_embeddings=True)
    if grid_pinpoints is None:
        out = LlavaForConditionalGeneration(LlavaConfig(**same, image_seq_length=vc.image_tokens)).float().eval()
    else:
        out = LlavaNextForConditionalGeneration(LlavaNextConfig(**same, image_grid_pinpoints=grid_pinpoints))
        out = out.float().eval()
        with torch.no_grad():
            out.model.image_newline.copy_(model.image_newline)
    lm = lm_state(model)
    with torch.no_grad():
        load_strict(out.model.vision_tower, tower.state_dict(), "vision tower")
        load_strict(out.model.multi_modal_projector, projector_state(model), "projector")
        load_strict(out.model.language_model, {k.removeprefix("model."): v for k, v in lm.items() if k != "lm_head.weight"},
                    "language model")
        out.lm_head.weight.copy_(lm["lm_head.weight"])
    return out


def causal_lm(model: VLM, fmt: TextFormat):
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_config(lm_config(model.cfg, fmt)).float().eval()
    with torch.no_grad():
        load_strict(out, lm_state(model), "causal LM")
    return out


def processor(fmt: TextFormat, tower, enc, strategy: str):
    """LlavaProcessor with the tower's image processor; for an anyres run LlavaNextProcessor with a LLaVA-NeXT
    image processor that cuts the tiles stage 1 cut (the tower's side, resampling and normalisation)."""
    import transformers

    has_cls = type(tower).__name__ == "CLIPVisionModel"
    same = dict(tokenizer=fmt.tokenizer, patch_size=tower.config.patch_size, vision_feature_select_strategy=strategy,
                chat_template=chat_template(fmt), image_token=fmt.image_token, num_additional_image_tokens=int(has_cls))
    grid = pinpoints(enc)
    if grid is None:
        proc = transformers.LlavaProcessor(image_processor=enc.processor, **same)
    else:
        p, side = enc.processor, enc.tiling.size
        cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
        image_processor = cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              image_grid_pinpoints=grid, resample=p.resample, image_mean=list(p.image_mean),
                              image_std=list(p.image_std), rescale_factor=p.rescale_factor)
        proc = transformers.LlavaNextProcessor(image_processor=image_processor, **same)
    if proc.image_token != fmt.image_token:  # LlavaProcessor prefers the tokenizer's own image_token
        raise ValueError(f"the run's tokenizer declares image_token {proc.image_token!r}, the run used "
                         f"tokenizer.image_token={fmt.image_token!r}; LlavaProcessor would expand the wrong token")
    return proc


def publish_dir(out: Path, overwrite: bool, build: Callable[[Path], None]) -> None:
    """build(tmp) writes the directory; it is fsynced and renamed to `out` (replacing it only if overwrite)."""
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    tmp, old = (out.with_name(f"{out.name}.{os.getpid()}.{s}") for s in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        publishable(tmp)
        fsync_dir(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: str | Path, out: str | Path, lm_only: bool = False, overwrite: bool = False) -> dict:
    """Write run_dir's model to `out` for transformers; returns a summary (class, files, bytes, seconds)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0, run_dir, out = time.perf_counter(), Path(run_dir), Path(out)
    model = VLM.from_pretrained(run_dir)
    vc = model.config
    why = refusal(vc, lm_only)
    if why:
        raise ValueError(f"{run_dir} cannot be exported exactly: {why}")
    tcfg = replace(vc.tokenizer, name_or_path=str(run_dir / "tokenizer"))
    fmt = text_format(load_tokenizer(tcfg), tcfg, vc.image_tokens, vc.encoder.tiles)
    if lm_only:
        hf = causal_lm(model, fmt)
        save = [hf, fmt.tokenizer]
    else:
        tower, enc = vision_tower(run_dir, vc.encoder)
        strategy = "full" if vc.encoder.keep_cls or type(tower).__name__ != "CLIPVisionModel" else "default"
        hf = llava(model, fmt, tower, strategy, pinpoints(enc))
        save = [hf, processor(fmt, tower, enc, strategy)]
    hf.generation_config = generation_config(fmt)
    publish_dir(out, overwrite, lambda d: [obj.save_pretrained(d) for obj in save])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    summary = {"run": str(run_dir), "out": str(out), "class": type(hf).__name__,
               "parameters": sum(p.numel() for p in hf.parameters()), "files": [str(p.relative_to(out)) for p in files],
               "bytes": sum(p.stat().st_size for p in files), "seconds": round(time.perf_counter() - t0, 2)}
    print(f"export: {run_dir} -> {out} ({summary['class']}, {summary['parameters'] / 1e6:.1f}M parameters, "
          f"{summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s)")
    return summary
