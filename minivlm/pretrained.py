"""`train.init_from`: start from an existing LM (or a whole earlier run), exactly or not at all.

A load that matches shapes but computes another function is the worst failure a trainer can have
(hours of training on a broken LM, nothing said), so every source is checked against `model.*`:
- a file, `.safetensors` or `.pth`/`.pt` (read with `weights_only=True`): a MiniMind state dict of any
  generation. v1 (2024) names are renamed and its `wq`/`wk` rows permuted per head (v1 rotated
  adjacent RoPE pairs (2i, 2i+1), we rotate (i, i + hd/2); the same permutation of q and k keeps q.k).
  v1 had no RoPE setting: base 10,000, so any other `model.rope_theta` is refused.
- a Hugging Face directory (`config.json` + safetensors) of `LlamaForCausalLM`, `Qwen3ForCausalLM` or
  `Qwen3MoeForCausalLM`: every config value that changes the function is compared with `model.*`, and a
  setting we cannot compute (biases, sliding windows, RoPE scaling, untied embeddings) is refused.
- a minivlm run directory: its final weights, projector included, so stages chain (projector-only
  pretraining, then full fine-tuning on the same cache). Its image rows (T, D), encoder fingerprint,
  vocabulary and `model.*` must equal this run's.
Then the tensors themselves: an unexpected tensor that would change the function (a norm, a bias, an
expert) is an error naming it and the `model.*` setting that would take it; a missing one is an error
unless `train.allow_partial_init`; buffers that hold no weights (rotary tables, v1's causal mask) are
listed and skipped. Only the vocabulary may differ in size (an added image token): the rows both have
are copied.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minivlm.config import ModelConfig
from minivlm.model import VLM

RUN_FILES = ("model.safetensors", "model_config.json")

_V1_RULES = [  # MiniMind v1 (2024, `Transformer`) name -> ours; applied in order, each to every key
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^output\.", "lm_head."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attention\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.feed_forward\.", r"model.layers.\1.mlp."),
    (r"\.mlp\.shared_experts\.w", ".mlp.shared_experts.0.w"),  # v1 had one shared expert, not a list
    (r"\.w1\.", ".gate_proj."), (r"\.w2\.", ".down_proj."), (r"\.w3\.", ".up_proj."),
]
V1_ROPE_THETA = 10000.0

# Tensors that hold no weights: rotary tables and causal masks some checkpoints store as buffers.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|freqs_cos|freqs_sin|pos_cis|self_attn\.mask)$")


def _unprefixed(key: str) -> str:
    """Without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.split(".", 1)[1]
    return key


def is_v1(state: dict) -> bool:
    return any(re.match(r"^(tok_embeddings|layers\.\d+\.attention)\.", _unprefixed(k)) for k in state)


def remap_lm_keys(state: dict, head_dim: int | None = None) -> dict:
    """MiniMind LM state dict (current or v1 names, maybe `_orig_mod.`/`module.`-prefixed) -> our names.

    Converting v1 `wq`/`wk` to rotate-half RoPE needs `head_dim` (model.head_dim or dim // n_head).
    Keys that are neither current nor v1 LM names pass through unchanged."""
    out = {}
    for key, t in state.items():
        key = _unprefixed(key)
        v1 = re.match(r"^(tok_embeddings|output|norm|layers)\.", key) is not None
        if v1 and re.match(r"^layers\.\d+\.attention\.w[qk]\.weight$", key):
            if head_dim is None:
                raise ValueError(f"{key}: MiniMind v1 checkpoint; pass head_dim=model.dim // model.n_head "
                                 "so wq/wk can be converted to rotate-half RoPE")
            t = t.view(-1, head_dim // 2, 2, t.size(1)).transpose(1, 2).reshape(t.shape)
        for pattern, repl in _V1_RULES if v1 else ():
            key = re.sub(pattern, repl, key)
        out[key] = t
    return out


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
        raise ValueError(f"{path}: holds no state dict of tensors")
    return state


# ---- Hugging Face directories -----------------------------------------------------------------------

_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
# config.json values we cannot compute, with the only value we accept (absent = the class default, fine)
_HF_REQUIRED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "use_sliding_window": False,
                "tie_word_embeddings": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "pretraining_tp": 1}
# our field (a ModelConfig field or property) -> its `model.*` setting
_SETTING = {"head_size": "head_dim", "ffn_size": "ffn_dim", "renorm_topk": "moe_norm_topk"}


def hf_model_fields(conf: dict, where: str) -> dict[str, tuple[str, object]]:
    """config.json -> {our field: (its config.json name, value)} for every value that changes the function;
    refuses settings minivlm's LM cannot compute."""
    arch = (conf.get("architectures") or [None])[0]
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
    n_head = conf["num_attention_heads"]
    fields = {"dim": ("hidden_size", conf["hidden_size"]), "n_layer": ("num_hidden_layers", conf["num_hidden_layers"]),
              "n_head": ("num_attention_heads", n_head),
              "n_kv_head": ("num_key_value_heads", conf.get("num_key_value_heads") or n_head),
              "head_size": ("head_dim", conf.get("head_dim") or conf["hidden_size"] // n_head),
              "norm_eps": ("rms_norm_eps", conf["rms_norm_eps"]),
              "rope_theta": ("rope_theta", float(rope.get("rope_theta", conf.get("rope_theta", 10000.0)))),
              "qk_norm": ("architectures", arch != "LlamaForCausalLM"),
              "use_moe": ("architectures", arch == "Qwen3MoeForCausalLM")}
    if arch == "Qwen3MoeForCausalLM":
        experts = conf.get("num_experts", conf.get("num_local_experts"))
        fields.update(ffn_size=("moe_intermediate_size", conf["moe_intermediate_size"]),
                      n_routed_experts=("num_experts", experts),
                      n_experts_per_tok=("num_experts_per_tok", conf["num_experts_per_tok"]),
                      n_shared_experts=("architectures", 0),
                      renorm_topk=("norm_topk_prob", bool(conf.get("norm_topk_prob", False))))
    else:
        fields["ffn_size"] = ("intermediate_size", conf["intermediate_size"])
    return fields


def _fused_experts(state: dict) -> dict:
    """transformers >= 5 may keep a layer's experts as two 3-D tensors; split them into per-expert names."""
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


def read_hf_dir(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Llama/Qwen3 directory's weights, after checking its config.json against `model.*`."""
    conf_path = path / "config.json"
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{conf_path}: unreadable config ({e})") from None
    try:
        fields = hf_model_fields(conf, str(conf_path))
    except KeyError as e:
        raise ValueError(f"{conf_path}: has no {e.args[0]}") from None
    wrong = [f"model.{_SETTING.get(f, f)}={getattr(cfg, f)!r} but {name}={value!r}"
             for f, (name, value) in fields.items() if getattr(cfg, f) != value]
    if wrong:
        raise ValueError(f"train.init_from={path}: config.json describes another model ({'; '.join(wrong)}); "
                         f"set model.* to match it")
    index = path / "model.safetensors.index.json"
    files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
        else [path / "model.safetensors"]
    state = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: train.init_from={path} needs the safetensors weights "
                                    f"(.bin files are pickles: convert them)")
        state.update(read_state(f))
    return _fused_experts(state)


# ---- minivlm runs -----------------------------------------------------------------------------------

# Settings that do not change the function a run's weights compute.
_RUN_MAY_DIFFER = {"dropout", "aux_loss_alpha", "max_seq_len"}


def read_run(path: Path, model: VLM, manifest: dict) -> dict[str, torch.Tensor]:
    """An earlier run's final weights, refused unless it saw the same image rows, vocabulary and model."""
    mc_path = path / "model_config.json"
    try:
        mc = json.loads(mc_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{mc_path}: unreadable ({e})") from None
    theirs = {"image rows T": mc["image_tokens"], "image width D": mc["image_width"],
              "encoder fingerprint": mc["fingerprint"], "vocab_size": mc["vocab_size"],
              "image_token_id": mc["image_token_id"]}
    ours = {"image rows T": manifest["tokens"], "image width D": manifest["width"],
            "encoder fingerprint": manifest["fingerprint"], "vocab_size": model.lm_head.weight.size(0),
            "image_token_id": model.image_token_id}
    ours.update({f"model.{k}": v for k, v in dataclasses.asdict(model.cfg).items() if k not in _RUN_MAY_DIFFER})
    theirs.update({f"model.{k}": v for k, v in mc["model"].items() if k not in _RUN_MAY_DIFFER})
    wrong = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if wrong:
        raise ValueError(f"train.init_from={path}: that run was trained on other image rows or another model "
                         f"({'; '.join(wrong)}); start from a run on the same cache with the same model.*")
    return read_state(path / "model.safetensors")


# ---- the load ---------------------------------------------------------------------------------------

def _setting_for(key: str, cfg: ModelConfig, missing: bool, layers_there: int) -> str:
    """The `model.*` setting under which a tensor the checkpoint lacks (or has in excess) would fit."""
    if re.search(r"\.[qk]_norm\.", key):
        return f"model.qk_norm={str(not missing).lower()}"
    if re.search(r"\.mlp\.shared_experts\.", key):
        return f"model.n_shared_experts ({'fewer' if missing else 'more'} there)"
    if re.search(r"\.mlp\.(experts\.|gate\.)", key):
        return "model.use_moe=true" if not cfg.use_moe else \
            f"model.n_routed_experts ({'fewer' if missing else 'more'} there)" + (" or model.use_moe=false" * missing)
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", key):
        return f"model.use_moe={str(missing).lower()}"
    if (m := re.match(r"model\.layers\.(\d+)\.", key)) and int(m[1]) >= (layers_there if missing else cfg.n_layer):
        return f"model.n_layer={layers_there}"
    return "none: the checkpoint lacks it" if missing else "none (minivlm's LM has no such tensor)"


def _grouped(keys: list[str], cfg: ModelConfig, missing: bool, state: dict) -> str:
    """Tensor names grouped by the setting that would account for them (first three of each group)."""
    layers_there = 1 + max((int(m[1]) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))), default=-1)
    by_setting: dict[str, list[str]] = {}
    for k in keys:
        by_setting.setdefault(_setting_for(k, cfg, missing, layers_there), []).append(k)
    return "; ".join(f"{', '.join(ks[:3])}{f' (+{len(ks) - 3} more)' if len(ks) > 3 else ''} -> {s}"
                     for s, ks in by_setting.items())


def load_state(model: VLM, state: dict[str, torch.Tensor], source: str, allow_partial: bool,
               with_projector: bool = False) -> str:
    """Copy `state` (our names) into `model`'s LM (and projector); returns a one-line summary."""
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
    unexpected = [k for k in state if k not in own and k not in skipped]
    if not with_projector:
        unexpected = [k for k in unexpected if not k.startswith("projector.")]
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
    notes = []
    with torch.no_grad():
        for k, v in own.items():
            if k not in state:
                continue
            w = state[k]
            if w.shape[0] != v.shape[0]:  # the vocabulary: an added image token, or rows the tokenizer lacks
                notes.append(f"vocabulary rows {w.shape[0]} -> {v.shape[0]}")
            n = min(w.shape[0], v.shape[0])
            v[:n].copy_(w[:n])
    loaded = len(own) - len(missing)
    notes += [f"{len(missing)} missing, left random (allow_partial_init)"] if missing else []
    notes += [f"skipped {len(skipped)} buffers ({skipped[0]}, ...)"] if skipped else []
    return f"{loaded}/{len(own)} tensors" + "".join(f"; {n}" for n in notes)


def init_from(model: VLM, path: str, allow_partial: bool, manifest: dict) -> str:
    """Load `train.init_from` into `model` (see the module docstring); returns the summary it printed."""
    p, cfg = Path(path), model.cfg
    if p.is_dir() and all((p / f).is_file() for f in RUN_FILES):
        kind, state, whole = "minivlm run", read_run(p, model, manifest), True
    elif p.is_dir() and (p / "config.json").is_file():
        kind, state, whole = "Hugging Face directory", read_hf_dir(p, cfg), False
    elif p.is_file():
        raw = read_state(p)
        kind, state, whole = ("MiniMind v1 state dict" if is_v1(raw) else "state dict"), raw, False
        if is_v1(raw) and cfg.rope_theta != V1_ROPE_THETA:
            raise ValueError(f"train.init_from={path}: a MiniMind v1 checkpoint (RoPE base 10,000) but "
                             f"model.rope_theta={cfg.rope_theta:g}; set model.rope_theta=10000 "
                             f"(configs/minimind_v1.toml does)")
        state = remap_lm_keys(raw, head_dim=cfg.head_size)
    elif p.is_dir():
        raise FileNotFoundError(f"train.init_from={path}: a directory with neither config.json (a Hugging Face "
                                f"model) nor {' + '.join(RUN_FILES)} (a finished minivlm run)")
    else:
        raise FileNotFoundError(f"train.init_from={path!r} not found; point it at an LM checkpoint (.safetensors, "
                                f".pth), a Hugging Face Llama/Qwen3 directory or an earlier run's directory")
    summary = f"init_from {path} ({kind}): loaded " + load_state(model, state, f"train.init_from={path}",
                                                                 allow_partial, with_projector=whole)
    print(summary)
    return summary
