"""`train.init_from`: start from an existing LM (or a whole earlier run), exactly or not at all.

A load that matches shapes but computes another function is the worst failure a trainer can have
(hours of training on a broken LM, nothing said), so every source is checked against `model.*`:
- a file, `.safetensors` or `.pth`/`.pt` (read with `weights_only=True`): a MiniMind state dict. It
  carries no config, so its generation, told by its tensor names, fixes what the upstream training
  scripts never let a user change: old names (`tok_embeddings`, `layers.N.attention.wq`: v1 of 2024 and
  MiniMind2's first `model.py`) have RoPE on adjacent pairs (2i, 2i+1), so their `wq`/`wk` rows are
  permuted per head to our rotate-half pairs (i, i + hd/2) (the same permutation of q and k keeps q.k),
  and RMSNorm eps 1e-5; their RoPE base (v1 10,000, MiniMind2 1e6) is `model.rope_theta`'s to say.
  Current names without `q_norm` are MiniMind2 (eps 1e-5, base 1e6, top-k renormalised only for k > 1),
  with `q_norm` minimind-3 (eps 1e-6, base 1e6, top-k always renormalised). A MiniMind-V VLM checkpoint
  is such a state dict plus its projector (loaded where ours is the same function, else skipped with a
  note) and maybe its vision tower (skipped with a note): see `minivlm.training.minimind_v`.
- a Hugging Face directory (`config.json` + safetensors) of `LlamaForCausalLM`, `Qwen3ForCausalLM` or
  `Qwen3MoeForCausalLM`: every config value that changes the function is compared with `model.*`, and a
  setting we cannot compute (biases, sliding windows, RoPE scaling, untied embeddings) is refused.
- a minivlm run directory: its final weights, projector included, so stages chain (projector-only
  pretraining, then full fine-tuning on the same cache). Its image rows (T, D), encoder fingerprint,
  vocabulary, LM and token reduction (model.pool, model.pixel_shuffle: same shapes, another function) must
  equal this run's.
Then the tensors: an unexpected one that would change the function (a norm, a bias, an expert) is an
error naming it and the `model.*` setting that would take it; a missing one is an error unless
`train.allow_partial_init`; buffers that hold no weights (rotary tables, v1's causal mask) are listed
and skipped. The vocabulary may only grow by the image token minivlm added, or shrink by padding rows
the tokenizer never produces.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minivlm.config import ModelConfig
from minivlm.embedding.encoder import EncoderSpec
from minivlm.training import layout, minimind_v
from minivlm.training.model import VLM, VLMConfig

RUN_FILES = ("model.safetensors", "model_config.json")

_OLD_RULES = [  # MiniMind's old names (v1 `Transformer`, early MiniMind2 `MiniMindLM`) -> ours, in order
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^output\.", "lm_head."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attention\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.feed_forward\.", r"model.layers.\1.mlp."),
    (r"\.mlp\.shared_experts\.w", ".mlp.shared_experts.0.w"),  # one shared expert, not a list
    (r"\.w1\.", ".gate_proj."), (r"\.w2\.", ".down_proj."), (r"\.w3\.", ".up_proj."),
]
_OLD_KEY = re.compile(r"^(tok_embeddings|output|norm|layers)\.")

# What a config-less state dict of each generation was trained with (upstream never exposed these).
GENERATIONS = {"old MiniMind names (v1 / early MiniMind2)": {"norm_eps": 1e-5, "qk_norm": False, "renorm_topk": "k>1"},
               "MiniMind2": {"norm_eps": 1e-5, "rope_theta": 1e6, "qk_norm": False, "renorm_topk": "k>1"},
               "minimind-3 (it has q_norm/k_norm)": {"norm_eps": 1e-6, "rope_theta": 1e6, "qk_norm": True,
                                                     "renorm_topk": "always"}}

# Tensors that hold no weights: rotary tables and causal masks some checkpoints store as buffers.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|freqs_cos|freqs_sin|pos_cis|self_attn\.mask)$")


def _unprefixed(key: str) -> str:
    """Without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.split(".", 1)[1]
    return key


def remap_lm_keys(state: dict, head_dim: int) -> dict:
    """A MiniMind LM state dict, current or old names, maybe prefixed -> our names.

    Old-name `wq`/`wk` rows are permuted per head (`head_dim` = model.head_dim or dim / n_head) from
    adjacent-pair to rotate-half RoPE. Other keys pass through unchanged."""
    out = {}
    for key, t in state.items():
        key = _unprefixed(key)
        if _OLD_KEY.match(key):
            if re.match(r"^layers\.\d+\.attention\.w[qk]\.weight$", key):
                t = t.view(-1, head_dim // 2, 2, t.size(1)).transpose(1, 2).reshape(t.shape)
            for pattern, repl in _OLD_RULES:
                key = re.sub(pattern, repl, key)
        out[key] = t
    return out


def generation(state: dict) -> str:
    """The MiniMind generation a raw state dict comes from (a key of GENERATIONS)."""
    keys = [_unprefixed(k) for k in state]
    if any(_OLD_KEY.match(k) for k in keys):
        return "old MiniMind names (v1 / early MiniMind2)"
    return "minimind-3 (it has q_norm/k_norm)" if any(re.search(r"\.q_norm\.", k) for k in keys) else "MiniMind2"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth/.pt read with weights_only=True (no pickle code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read it without pickle ({type(e).__name__}); convert it to "
                         f"safetensors") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors; save the LM's model.state_dict() "
                         f"(torch.save or safetensors)")
    return state


# ---- what an LM computes, and how to name it --------------------------------------------------------

def lm_function(cfg: ModelConfig) -> dict:
    """The values of `model.*` that decide what the LM computes (MoE ones only with MoE)."""
    out = {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
           "head_dim": cfg.head_size, "ffn_dim": cfg.ffn_size, "norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "qk_norm": cfg.qk_norm, "use_moe": cfg.use_moe}
    if cfg.use_moe:
        out.update(n_routed_experts=cfg.n_routed_experts, n_experts_per_tok=cfg.n_experts_per_tok,
                   n_shared_experts=cfg.n_shared_experts, renorm_topk=cfg.renorm_topk)
    return out


def _setting(cfg: ModelConfig, name: str) -> str:
    """How `model.*` spells the value `lm_function` calls `name`, e.g. `model.head_dim=0 (-> 64)`."""
    if name == "renorm_topk":
        return f"model.moe_norm_topk={cfg.moe_norm_topk!r} (k={cfg.n_experts_per_tok})"
    if name in ("head_dim", "ffn_dim") and not getattr(cfg, name):
        return f"model.{name}=0 (-> {lm_function(cfg)[name]})"
    return f"model.{name}={getattr(cfg, name)!r}"


def _differences(cfg: ModelConfig, expected: dict[str, tuple[str, object]]) -> list[str]:
    """`expected` maps lm_function names to (where the value comes from, value)."""
    ours = lm_function(cfg)
    return [f"{_setting(cfg, k)} but {where}" for k, (where, v) in expected.items() if k in ours and ours[k] != v]


# ---- Hugging Face directories -----------------------------------------------------------------------

_HF_ARCHS = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# config.json values we cannot compute, with the only value we accept. An absent tie_word_embeddings is
# true (transformers 4 left out values equal to PretrainedConfig's defaults); the tensors are checked too.
_HF_REQUIRED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "use_sliding_window": False,
                "tie_word_embeddings": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def hf_lm_function(conf: dict, where: str) -> dict[str, tuple[str, object]]:
    """config.json -> {lm_function name: (its config.json spelling, value)}; refuses what we cannot compute."""
    arch = (conf.get("architectures") or [None])[0]
    if arch == "MiniMindForCausalLM":
        raise ValueError(f"{where}: MiniMind's own Hugging Face format; point train.init_from at its weights "
                         f"file (model.safetensors) and use the config of its generation (README.md, Configuration)")
    if arch not in _HF_ARCHS:
        raise ValueError(f"{where}: architectures={conf.get('architectures')}; train.init_from takes "
                         f"{', '.join(_HF_ARCHS)} directories")
    for key, ok in _HF_REQUIRED.items():
        if key in conf and conf[key] != ok:
            raise ValueError(f"{where}: {key}={json.dumps(conf[key])} cannot be computed by minivlm's LM (it needs "
                             f"{json.dumps(ok)}); this checkpoint cannot be loaded exactly")
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: RoPE scaling {rope} is not supported (only rope_type default)")
    if any(t != "full_attention" for t in conf.get("layer_types") or []):
        raise ValueError(f"{where}: layer_types has sliding-window layers; minivlm's attention is full")
    qwen, moe = arch != "LlamaForCausalLM", arch == "Qwen3MoeForCausalLM"
    hidden, heads = conf["hidden_size"], conf["num_attention_heads"]
    head_dim = conf.get("head_dim") or (128 if qwen else hidden // heads)  # the classes' defaults
    theta = float(rope.get("rope_theta", conf.get("rope_theta", 10000.0)))
    out = {"dim": ("hidden_size", hidden), "n_layer": ("num_hidden_layers", conf["num_hidden_layers"]),
           "n_head": ("num_attention_heads", heads),
           "n_kv_head": ("num_key_value_heads", conf.get("num_key_value_heads") or heads),
           "head_dim": ("head_dim", head_dim), "norm_eps": ("rms_norm_eps", conf.get("rms_norm_eps", 1e-6)),
           "rope_theta": ("rope_theta", theta), "qk_norm": (f"{arch} (q_norm/k_norm: {qwen})", qwen),
           "use_moe": (f"{arch} (MoE: {moe})", moe)}
    if moe:
        norm = bool(conf.get("norm_topk_prob", False))
        out.update(ffn_dim=("moe_intermediate_size", conf["moe_intermediate_size"]),
                   n_routed_experts=("num_experts", conf.get("num_experts", conf.get("num_local_experts"))),
                   n_experts_per_tok=("num_experts_per_tok", conf["num_experts_per_tok"]),
                   n_shared_experts=("Qwen3-MoE (no shared experts)", 0),
                   renorm_topk=(f"norm_topk_prob={str(norm).lower()} (model.moe_norm_topk="
                                f"{'always' if norm else 'never'!r})", norm))
    else:
        out["ffn_dim"] = ("intermediate_size", conf["intermediate_size"])
    return {k: (f"{where} {name}={value!r}" if name.isidentifier() else f"{where}: {name}", value)
            for k, (name, value) in out.items()}


def _fused_experts(state: dict) -> dict:
    """transformers >= 5 keeps a layer's experts as two 3-D tensors in memory (gate rows then up rows);
    split them into per-expert names."""
    out = {}
    for key, t in state.items():
        m = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", key)
        if not m:
            out[key] = t
            continue
        for e in range(t.size(0)):
            if m[2] == "down_proj":
                out[f"{m[1]}.{e}.down_proj.weight"] = t[e]
            else:
                out[f"{m[1]}.{e}.gate_proj.weight"], out[f"{m[1]}.{e}.up_proj.weight"] = t[e].chunk(2, dim=0)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def read_hf_dir(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Llama/Qwen3 directory's weights, after checking its config.json against `model.*`."""
    conf_path = path / "config.json"
    try:
        expected = hf_lm_function(_read_json(conf_path), "config.json")
    except KeyError as e:
        raise ValueError(f"{conf_path}: has no {e.args[0]}") from None
    wrong = _differences(cfg, expected)
    if wrong:
        raise ValueError(f"train.init_from={path} describes another model ({'; '.join(wrong)}); set model.* "
                         f"to match it")
    index = path / "model.safetensors.index.json"
    files = sorted({path / f for f in _read_json(index).get("weight_map", {}).values()}) if index.is_file() \
        else [path / "model.safetensors"]
    state = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: train.init_from={path} needs the safetensors weights "
                                    f"(.bin files are pickles: convert them)")
        state.update(read_state(f))
    return _fused_experts(state)


# ---- minivlm runs -----------------------------------------------------------------------------------

def read_run(path: Path, model: VLM, manifest: dict) -> dict[str, torch.Tensor]:
    """An earlier run's final weights, refused unless it saw the same image rows and vocabulary and has the
    same LM and projector."""
    mc_path = path / "model_config.json"
    vc = VLMConfig.from_json(_read_json(mc_path), str(mc_path))  # model fields added since take their defaults
    fix = "start from a run on the same cache with the same model.*"
    EncoderSpec.of_manifest(manifest).check(vc.encoder, f"train.init_from={path}", "this run's cache", fix)
    theirs = {"image rows T": vc.cache_tokens, "image width D": vc.image_dim, "vocab_size": vc.vocab_size,
              "image_token_id": vc.image_token_id, "model.projector": vc.model.projector, "model.pool": vc.model.pool,
              "model.pixel_shuffle": vc.model.pixel_shuffle}
    ours = {"image rows T": manifest["tokens"], "image width D": manifest["width"],
            "vocab_size": model.lm_head.weight.size(0), "image_token_id": model.image_token_id,
            "model.projector": model.cfg.projector, "model.pool": model.cfg.pool,
            "model.pixel_shuffle": model.cfg.pixel_shuffle}
    wrong = [f"{k}: {theirs[k]!r} there, {v!r} here" for k, v in ours.items() if theirs[k] != v]
    wrong += _differences(model.cfg, {k: (f"{v!r} there", v) for k, v in lm_function(vc.model).items()})
    if wrong:
        raise ValueError(f"train.init_from={path}: that run was trained on other image rows or with another "
                         f"model ({'; '.join(wrong)}); {fix}")
    return read_state(path / "model.safetensors")


# ---- the load ---------------------------------------------------------------------------------------

def _setting_for(key: str, cfg: ModelConfig, missing: bool, layers_there: int) -> str:
    """The `model.*` setting under which a tensor the checkpoint lacks (or has in excess) would fit."""
    if (m := re.match(r"model\.layers\.(\d+)\.", key)) and int(m[1]) >= (layers_there if missing else cfg.n_layer):
        return f"model.n_layer={layers_there}"
    if re.search(r"\.[qk]_norm\.", key):
        return f"model.qk_norm={str(not missing).lower()}"
    if re.search(r"\.mlp\.shared_experts\.", key):
        return f"model.n_shared_experts ({'fewer' if missing else 'more'} there)"
    if re.search(r"\.mlp\.(experts\.|gate\.)", key):
        if not cfg.use_moe:
            return "model.use_moe=true"
        return "model.n_routed_experts (fewer there) or model.use_moe=false" if missing else \
            "model.n_routed_experts (more there)"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", key):
        return f"model.use_moe={str(missing).lower()}"
    return "none: the checkpoint lacks it" if missing else "none (minivlm's LM has no such tensor)"


def _grouped(keys: list[str], cfg: ModelConfig, missing: bool, state: dict) -> str:
    """Tensor names grouped by the setting that would account for them (first three of each group)."""
    layers_there = 1 + max((int(m[1]) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))), default=-1)
    by_setting: dict[str, list[str]] = {}
    for k in keys:
        by_setting.setdefault(_setting_for(k, cfg, missing, layers_there), []).append(k)
    return "; ".join(f"{', '.join(ks[:3])}{f' (+{len(ks) - 3} more)' if len(ks) > 3 else ''} -> {s}"
                     for s, ks in by_setting.items())


def _vocab_rows(model: VLM, rows: int, source: str, markers: int) -> str | None:
    """Growth only by the tokens minivlm added (the image token, a tiling's `markers`); shrinking drops rows the
    tokenizer never produces."""
    ours = model.lm_head.weight.size(0)
    added = int(model.image_token_id >= rows) + markers
    if ours > rows + added:
        raise ValueError(f"{source}: {rows} vocabulary rows, but the tokenizer has {ours} tokens ({added} added by "
                         f"minivlm); is tokenizer.name_or_path the tokenizer this LM was trained with?")
    if ours != rows:
        return f"vocabulary rows {rows} -> {ours}" + (" (minivlm's tokens added)" if ours > rows else
                                                       " (rows past the tokenizer dropped)")
    return None


def load_state(model: VLM, state: dict[str, torch.Tensor], source: str, allow_partial: bool,
               with_projector: bool = False, markers: int = 0) -> str:
    """Copy `state` (our names) into `model`'s LM (and projector); returns a one-line summary. `markers`: how many
    tiling marker tokens the run's tokenizer gained (layout.markers)."""
    own = {k: v for k, v in model.state_dict().items() if with_projector or not k.startswith("projector.")}
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    if emb is not None and head is not None and not torch.equal(emb, head):
        raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight (untied embeddings); "
                         f"minivlm ties them, so this LM cannot be loaded exactly")
    if emb is None and head is not None:  # tied: a checkpoint may store only one of the two
        state = {**state, "model.embed_tokens.weight": head}
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    own.pop("lm_head.weight", None)
    skipped = [k for k in state if k not in own and _BUFFERS.search(k)]
    projector = [k for k in state if k not in own and k.startswith("projector.")]
    unexpected = [k for k in state if k not in own and k not in skipped and k not in projector]
    if unexpected:
        raise ValueError(f"{source}: tensors this model.* has no place for would change the function: "
                         f"{_grouped(unexpected, model.cfg, False, state)}")
    missing = [k for k in own if k not in state]
    if missing and not allow_partial:
        raise ValueError(f"{source}: the checkpoint lacks {len(missing)} of {len(own)} tensors: "
                         f"{_grouped(missing, model.cfg, True, state)}; set model.* to match it, or "
                         f"train.allow_partial_init=true to start those from random")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)} here" for k, v in own.items()
             if k in state and state[k].shape != v.shape and not (k == "model.embed_tokens.weight"
                                                                  and state[k].shape[1:] == v.shape[1:])]
    if wrong:
        raise ValueError(f"{source}: shapes differ ({'; '.join(wrong[:3])}); check model.dim, n_head, n_kv_head, "
                         f"head_dim and ffn_dim against the checkpoint")
    notes = [_vocab_rows(model, state["model.embed_tokens.weight"].size(0), source, markers)] \
        if "model.embed_tokens.weight" in state else []
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                n = min(state[k].size(0), v.size(0))  # all rows, but for the vocabulary
                v[:n].copy_(state[k][:n])
    notes += [f"{len(missing)} missing, left random (allow_partial_init)"] if missing else []
    notes += [f"skipped {len(skipped)} buffers ({skipped[0]}, ...)"] if skipped else []
    notes += [f"ignored {len(projector)} projector tensors (pass the run directory to load them too)"] \
        if projector else []
    return f"{len(own) - len(missing)}/{len(own)} tensors" + "".join(f"; {n}" for n in notes if n)


def _check_generation(cfg: ModelConfig, gen: str, source: str) -> None:
    """A config-less state dict: refuse settings its generation never had (see GENERATIONS)."""
    name, fixed = gen.split(" (")[0], dict(GENERATIONS[gen])
    renorm = fixed.pop("renorm_topk")
    expected = {k: (f"{name} used {v!r}", v) for k, v in fixed.items()}
    if cfg.use_moe:
        expected["renorm_topk"] = (f"{name} used moe_norm_topk={renorm!r}",
                                   renorm == "always" or cfg.n_experts_per_tok > 1)
    wrong = _differences(cfg, expected)
    if wrong:
        raise ValueError(f"{source} is a {gen} state dict, which carries no config: {'; '.join(wrong)}; use the "
                         f"[model] of that generation's config (docs/training.md: Starting from a pretrained LM)")


def init_from(model: VLM, path: str, allow_partial: bool, manifest: dict) -> str:
    """Load `train.init_from` into `model` (see the module docstring); returns the summary it printed."""
    p, cfg, source = Path(path), model.cfg, f"train.init_from={path}"
    vlm: list[dict] = [{}, {}]  # a MiniMind-V checkpoint's projector and vision tower tensors
    if p.is_dir() and all((p / f).is_file() for f in RUN_FILES):
        kind, state, whole = "minivlm run", read_run(p, model, manifest), True
    elif p.is_dir() and (p / "config.json").is_file():
        kind, state, whole = "Hugging Face directory", read_hf_dir(p, cfg), False
    elif p.is_file():
        raw, *vlm = minimind_v.split({_unprefixed(k): v for k, v in read_state(p).items()})
        kind, whole = generation(raw), False
        _check_generation(cfg, kind, source)
        state = remap_lm_keys(raw, head_dim=cfg.head_size)
        if kind.startswith("old"):
            kind += f", RoPE pairs reordered, base {cfg.rope_theta:g}"
        if any(vlm):
            kind = f"MiniMind-V checkpoint, LM: {kind}"
    elif p.is_dir():
        raise FileNotFoundError(f"{source}: a directory with neither config.json (a Hugging Face model) nor "
                                f"{' + '.join(RUN_FILES)} (a finished minivlm run)")
    else:
        raise FileNotFoundError(f"{source} not found; point it at an LM checkpoint (.safetensors, .pth), a "
                                f"Hugging Face Llama/Qwen3 directory or an earlier run's directory")
    spec = EncoderSpec.of_manifest(manifest) if "encoder" in manifest else None
    markers = len(layout.markers(spec.tiles, spec.complete_fingerprint["max_tiles"])) if spec else 0
    loaded = [load_state(model, state, source, allow_partial, whole, markers), *minimind_v.load_parts(model, *vlm)]
    summary = f"init_from {path} ({kind}): loaded " + "; ".join(loaded)
    print(summary)
    return summary
