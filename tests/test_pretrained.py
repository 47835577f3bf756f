"""minivlm.training.pretrained: every LM we claim to load computes, after `train.init_from`, what its own definition
computes on the same weights, or the load is refused.

References are never our own code: transformers' Llama/Qwen3/Qwen3-MoE classes with tiny random weights,
and MiniMind v1 written out below from its 2024 definition (`model/model.py`: complex RoPE on adjacent
pairs, base 10,000, v1 key names)."""
import dataclasses
import json
import math
import pickle
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, train_config
from minivlm.config import ModelConfig, load_config
from minivlm.dist import Dist
from minivlm.training.data import load_data
from minivlm.training.model import VLM
from minivlm.training.pretrained import init_from, read_state, remap_lm_keys
from minivlm.training.trainer import build_model, evaluate, fit, lr_at
from minivlm.use.generate import generate

transformers = pytest.importorskip("transformers")

V = 96          # the checkpoint's vocabulary; ours adds the image placeholder as id V
BOUND = 1e-4    # max |delta logit| in fp32


def our_vlm(cfg: ModelConfig, vocab: int = V + 1) -> VLM:
    torch.manual_seed(123)  # different from the reference's weights, so only the load can make them agree
    return VLM(cfg, vocab_size=vocab, image_dim=8, image_token_id=vocab - 1).eval()


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1; make them matter, so a norm we skip or misplace shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))


def greedy(forward, ids: torch.Tensor, n: int) -> list[int]:
    """Reference greedy decoding: the whole sequence recomputed every step, no cache."""
    seq = ids
    for _ in range(n):
        seq = torch.cat((seq, forward(seq)[:, -1, :V].argmax(-1, keepdim=True)), dim=1)
    return seq[0, ids.size(1):].tolist()


def assert_same_function(ours: VLM, forward, vocab: int = V):
    """Max |delta logit| on random ids, and identical 20-token greedy continuations (ours with its KV cache)."""
    ids = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (ours(ids).logits[..., :vocab] - forward(ids)[..., :vocab]).abs().max().item()
    assert delta < BOUND, f"max |delta logit| = {delta}"
    prompt = ids[:1, :9]
    assert generate(ours, prompt, None, 20, eos_id=None)[0] == greedy(forward, prompt, 20)
    return delta


def hf_reference(tmp_path, cls_name: str, **conf):
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    ref = cls(config_cls(vocab_size=V, tie_word_embeddings=True, **conf)).eval()
    randomize_norms(ref)
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
LLAMA = ModelConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48, norm_eps=1e-6, rope_theta=5e5,
                    max_seq_len=128)
QWEN3 = dataclasses.replace(LLAMA, head_dim=16, qk_norm=True)  # head_dim != dim / n_head, as Qwen3 allows


def test_hf_llama_directory_loads_exactly(tmp_path):
    ref, path = hf_reference(tmp_path, "LlamaForCausalLM", intermediate_size=48, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **SMALL)
    ours = our_vlm(LLAMA)
    summary = init_from(ours, str(path), False, {})
    assert "Hugging Face directory" in summary and "vocabulary rows 96 -> 97" in summary
    assert_same_function(ours, lambda x: ref(x).logits)


def test_hf_qwen3_directory_loads_exactly(tmp_path):
    ref, path = hf_reference(tmp_path, "Qwen3ForCausalLM", intermediate_size=48, head_dim=16, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **SMALL)
    ours = our_vlm(QWEN3)
    init_from(ours, str(path), False, {})
    assert_same_function(ours, lambda x: ref(x).logits)


@pytest.mark.parametrize("top_k,norm", [(1, True), (2, False)])
def test_hf_qwen3_moe_directory_loads_exactly(tmp_path, top_k, norm):
    """top-1 with norm_topk_prob is minimind-3's routing: the one expert's weight becomes 1.0."""
    ref, path = hf_reference(tmp_path, "Qwen3MoeForCausalLM", intermediate_size=64, moe_intermediate_size=40,
                             head_dim=16, num_experts=4, num_experts_per_tok=top_k, norm_topk_prob=norm,
                             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **SMALL)
    cfg = dataclasses.replace(QWEN3, ffn_dim=40, use_moe=True, n_routed_experts=4, n_experts_per_tok=top_k,
                              n_shared_experts=0, moe_norm_topk="always" if norm else "never")
    ours = our_vlm(cfg)
    init_from(ours, str(path), False, {})
    assert_same_function(ours, lambda x: ref(x).logits)
    if top_k == 1:  # MiniMind2's routing (renormalise only when k > 1) is another function: refused by name
        with pytest.raises(ValueError, match=r"model.moe_norm_topk='k>1' \(k=1\) but config.json: norm_topk_prob=true "
                                             r"\(model.moe_norm_topk='always'\)"):
            init_from(our_vlm(dataclasses.replace(cfg, moe_norm_topk="k>1")), str(path), False, {})


def test_hf_config_mismatch_names_the_field_and_both_values(tmp_path):
    _, path = hf_reference(tmp_path, "Qwen3ForCausalLM", intermediate_size=48, head_dim=16, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **SMALL)
    with pytest.raises(ValueError, match=r"model.norm_eps=1e-05 but config.json rms_norm_eps=1e-06; "
                                         r"model.rope_theta=1000000.0 but config.json rope_theta=500000.0"):
        init_from(our_vlm(dataclasses.replace(QWEN3, norm_eps=1e-5, rope_theta=1e6)), str(path), False, {})
    with pytest.raises(ValueError, match=r"model.qk_norm=False but config.json: Qwen3ForCausalLM \(q_norm"):
        init_from(our_vlm(dataclasses.replace(QWEN3, qk_norm=False)), str(path), False, {})
    with pytest.raises(ValueError, match=r"model.head_dim=0 \(-> 8\) but config.json head_dim=16"):
        init_from(our_vlm(dataclasses.replace(QWEN3, head_dim=0)), str(path), False, {})


def test_fused_experts_and_a_transformers_4_config_load_exactly(tmp_path):
    """Weights as transformers 5 holds them in memory (each layer's experts as 3-D gate_up/down tensors),
    next to a config.json as transformers 4 wrote it (top-level rope_theta, no head_dim)."""
    from safetensors.torch import save_file
    ref, path = hf_reference(tmp_path, "Qwen3MoeForCausalLM", moe_intermediate_size=40, head_dim=128 // 8,
                             intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **SMALL)
    fused = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    save_file(fused, str(path / "model.safetensors"))
    conf = json.loads((path / "config.json").read_text())
    conf.pop("rope_parameters")
    conf.update(rope_theta=5e5, rope_scaling=None, head_dim=16, num_experts=conf.pop("num_local_experts"))
    (path / "config.json").write_text(json.dumps(conf))
    cfg = dataclasses.replace(QWEN3, ffn_dim=40, use_moe=True, n_routed_experts=4, n_experts_per_tok=2,
                              n_shared_experts=0, moe_norm_topk="k>1")
    ours = our_vlm(cfg)
    init_from(ours, str(path), False, {})
    assert_same_function(ours, lambda x: ref(x).logits)


@pytest.mark.parametrize("conf,needle", [({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
                                         ({"attention_bias": True}, "attention_bias=true"),
                                         ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling")])
def test_hf_settings_we_cannot_compute_are_refused(tmp_path, conf, needle):
    _, path = hf_reference(tmp_path, "LlamaForCausalLM", intermediate_size=48, rms_norm_eps=1e-6, **SMALL)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **conf}))
    with pytest.raises(ValueError, match=needle):
        init_from(our_vlm(LLAMA), str(path), False, {})


# ---- MiniMind v1, from its definition -----------------------------------------------------------------

def v1_state(cfg: ModelConfig, vocab: int, use_moe: bool) -> dict:
    """Random weights under v1's names (`Transformer` of the 2024 `model/model.py`), tied output."""
    g = torch.Generator().manual_seed(7)
    d, hd, f = cfg.dim, cfg.dim // cfg.n_head, cfg.ffn_size

    def w(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"tok_embeddings.weight": w(vocab, d, std=0.1), "norm.weight": 1 + w(d, std=0.3)}
    sd["output.weight"] = sd["tok_embeddings.weight"]
    ffn = lambda p: {f"{p}.w1.weight": w(f, d), f"{p}.w2.weight": w(d, f), f"{p}.w3.weight": w(f, d)}  # noqa: E731
    for i in range(cfg.n_layer):
        p = f"layers.{i}"
        sd.update({f"{p}.attention.wq.weight": w(cfg.n_head * hd, d, std=0.05),
                   f"{p}.attention.wk.weight": w(cfg.n_kv_head * hd, d, std=0.05),
                   f"{p}.attention.wv.weight": w(cfg.n_kv_head * hd, d), f"{p}.attention.wo.weight": w(d, d),
                   f"{p}.attention_norm.weight": 1 + w(d, std=0.3), f"{p}.ffn_norm.weight": 1 + w(d, std=0.3),
                   f"{p}.attention.mask": torch.full((1, 1, 8, 8), float("-inf")).triu(1)})  # a v1 buffer
        if use_moe:
            sd[f"{p}.feed_forward.gate.weight"] = w(cfg.n_routed_experts, d, std=0.5)
            for e in range(cfg.n_routed_experts):
                sd.update(ffn(f"{p}.feed_forward.experts.{e}"))
            sd.update(ffn(f"{p}.feed_forward.shared_experts"))
        else:
            sd.update(ffn(f"{p}.feed_forward"))
    return sd


def v1_forward(sd: dict, cfg: ModelConfig, ids: torch.Tensor, theta: float) -> torch.Tensor:
    """MiniMind v1's forward, fp32, no cache: RMSNorm, RoPE as a complex rotation of pairs (2i, 2i+1) at
    base `theta` (v1: 10,000; the first MiniMind2 `model.py` kept this code at 1e6), GQA by repeating kv heads, causal softmax attention, SwiGLU (w2(silu(w1 x) * w3 x)), MoE
    with softmax gate, top-k renormalised only when k > 1, plus one shared expert; tied output."""
    B, L = ids.shape
    hd, H, Hkv = cfg.dim // cfg.n_head, cfg.n_head, cfg.n_kv_head
    freqs = torch.outer(torch.arange(L).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
    pos_cis = torch.polar(torch.ones_like(freqs), freqs)  # (L, hd/2)

    def norm(x, wt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * wt

    def rope(x):  # (B, L, h, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None]).flatten(3)

    def ffn(p, x):
        return F.linear(F.silu(F.linear(x, sd[f"{p}.w1.weight"])) * F.linear(x, sd[f"{p}.w3.weight"]), sd[f"{p}.w2.weight"])

    h = sd["tok_embeddings.weight"][ids]
    mask = torch.full((L, L), float("-inf")).triu(1)
    for i in range(cfg.n_layer):
        p = f"layers.{i}"
        x = norm(h, sd[f"{p}.attention_norm.weight"])
        q = rope(F.linear(x, sd[f"{p}.attention.wq.weight"]).view(B, L, H, hd))
        k = rope(F.linear(x, sd[f"{p}.attention.wk.weight"]).view(B, L, Hkv, hd))
        v = F.linear(x, sd[f"{p}.attention.wv.weight"]).view(B, L, Hkv, hd)
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(2, 3)) / math.sqrt(hd) + mask).softmax(-1)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, L, -1), sd[f"{p}.attention.wo.weight"])
        x = norm(h, sd[f"{p}.ffn_norm.weight"])
        if f"{p}.feed_forward.gate.weight" in sd:
            scores = F.linear(x, sd[f"{p}.feed_forward.gate.weight"]).softmax(-1)  # (B, L, E)
            w, idx = scores.topk(cfg.n_experts_per_tok, dim=-1)
            if cfg.n_experts_per_tok > 1:
                w = w / w.sum(-1, keepdim=True)
            y = ffn(f"{p}.feed_forward.shared_experts", x)
            for e in range(cfg.n_routed_experts):
                y = y + ((idx == e) * w).sum(-1, keepdim=True) * ffn(f"{p}.feed_forward.experts.{e}", x)
        else:
            y = ffn(f"{p}.feed_forward", x)
        h = h + y
    return F.linear(norm(h, sd["norm.weight"]), sd["output.weight"])


def test_minimind_v1_config_is_v1s_lmconfig():
    """configs/minimind_v1.toml's [model] against v1's `LMConfig` (2024), value by value."""
    cfg = load_config(REPO / "configs" / "minimind_v1.toml").model
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.ffn_size, cfg.norm_eps, cfg.rope_theta,
            cfg.qk_norm, cfg.n_routed_experts, cfg.n_experts_per_tok, cfg.n_shared_experts, cfg.moe_norm_topk) == \
        (512, 8, 16, 8, 32, 1408, 1e-5, 10000.0, False, 4, 2, 1, "k>1")


def test_minimind_v_config_is_upstreams_pretraining_recipe():
    """configs/minimind_v.toml against minimind-v's trainer/train_pretrain_vlm.py defaults, model_vlm.py and
    minimind-3's MiniMindConfig, value by value; its schedule is upstream's get_lr."""
    cfg = load_config(REPO / "configs" / "minimind_v.toml")
    m, e, t = cfg.model, cfg.encoder, cfg.train
    assert (m.dim, m.n_layer, m.n_head, m.n_kv_head, m.head_size, m.ffn_size, m.norm_eps, m.rope_theta, m.qk_norm,
            m.projector) == (768, 8, 8, 4, 768 // 8, math.ceil(768 * math.pi / 64) * 64, 1e-6, 1e6, True, "mlp")
    assert (e.select_layer, e.post_layernorm, e.pool) == (-1, True, 1) and "siglip2-base-p32-256" in e.name_or_path
    assert (t.epochs, t.batch_size, t.grad_accum, t.lr, t.grad_clip, t.dtype, t.freeze_llm) == \
        (2, 16, 1, 4e-4, 1.0, "bfloat16", 2)
    assert (t.weight_decay, t.beta1, t.beta2) == (0.01, 0.9, 0.999)  # torch.optim.AdamW's defaults
    assert cfg.tokenizer.max_len == 450 and cfg.data.records.endswith("pretrain_i2t.parquet")
    for step in (0, 1, 300, 500, 999, 1000):
        upstream = t.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 1000)))
        assert lr_at(step, 1000, t) == pytest.approx(upstream, rel=1e-12)


@pytest.mark.parametrize("config,theta,use_moe", [("minimind_v1", 1e4, False), ("minimind_v1", 1e4, True),
                                                  ("llava_pretrain", 1e6, False)])
def test_old_name_minimind_pth_loads_exactly_with_its_generations_config(tmp_path, config, theta, use_moe):
    """v1 under configs/minimind_v1.toml; the first MiniMind2 (old names, base 1e6, 8 / 2 heads) under
    configs/llava_pretrain.toml. Both [model] sections as shipped, two layers instead of eight for time."""
    cfg = dataclasses.replace(load_config(REPO / "configs" / f"{config}.toml").model, n_layer=2, use_moe=use_moe)
    sd = v1_state(cfg, V, use_moe)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, tmp_path / "pretrain_512.pth")
    ours = our_vlm(cfg)
    summary = init_from(ours, str(tmp_path / "pretrain_512.pth"), False, {})
    assert f"old MiniMind names (v1 / early MiniMind2), RoPE pairs reordered, base {theta:g}" in summary
    assert "skipped 2 buffers" in summary
    assert_same_function(ours, lambda x: v1_forward(sd, cfg, x, theta))


def test_v1_rope_permutation_preserves_attention_scores():
    """v1 rotated adjacent pairs (complex view); after remap our rotate-half RoPE gives the same q.k."""
    from minivlm.training.model import apply_rope, rope_tables
    torch.manual_seed(0)
    hd, H, L, dim, theta = 8, 2, 6, 16, 10000.0
    wq, wk, x = torch.randn(H * hd, dim), torch.randn(H * hd, dim), torch.randn(L, dim)
    cos, sin = rope_tables(hd, L, theta)

    def v1_rope(t):  # (L, H, hd), MiniMind v1 apply_rotary_emb
        freqs = torch.outer(torch.arange(L).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
        tc = torch.view_as_complex(t.reshape(L, H, hd // 2, 2)) * torch.polar(torch.ones_like(freqs), freqs)[:, None]
        return torch.view_as_real(tc).flatten(2)

    q1, k1 = v1_rope((x @ wq.T).view(L, H, hd)), v1_rope((x @ wk.T).view(L, H, hd))
    ours = remap_lm_keys({"layers.0.attention.wq.weight": wq, "layers.0.attention.wk.weight": wk}, head_dim=hd)
    q2 = apply_rope((x @ ours["model.layers.0.self_attn.q_proj.weight"].T).view(L, H, hd).transpose(0, 1), cos, sin)
    k2 = apply_rope((x @ ours["model.layers.0.self_attn.k_proj.weight"].T).view(L, H, hd).transpose(0, 1), cos, sin)
    torch.testing.assert_close(q2 @ k2.transpose(1, 2), q1.transpose(0, 1) @ k1.permute(1, 2, 0))


# ---- minimind-3 and silent partial loads ------------------------------------------------------------

def lm_state(cfg: ModelConfig) -> dict:
    """A current-names MiniMind state dict: minimind-3-shaped (`model/model_minimind.py` of 2026, q_norm /
    k_norm per head) when cfg.qk_norm, else MiniMind2-shaped."""
    src = our_vlm(cfg, vocab=V)
    return {k: v for k, v in src.state_dict().items() if not k.startswith("projector.")}


MM2 = ModelConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, ffn_dim=48, max_seq_len=64)  # eps 1e-5
MM3 = dataclasses.replace(MM2, qk_norm=True, norm_eps=1e-6)


def test_minimind3_state_dict_into_a_model_without_qk_norm_fails_naming_q_norm(tmp_path):
    torch.save(lm_state(MM3), tmp_path / "minimind3.pth")
    with pytest.raises(ValueError, match=r"minimind-3 \(it has q_norm/k_norm\) state dict.*"
                                         r"model.norm_eps=1e-05 but minimind-3 used 1e-06; "
                                         r"model.qk_norm=False but minimind-3 used True"):
        init_from(our_vlm(MM2), str(tmp_path / "minimind3.pth"), False, {})
    with pytest.raises(ValueError, match=r"model.moe_norm_topk='k>1' \(k=1\) but minimind-3 used moe_norm_topk='always'"):
        init_from(our_vlm(dataclasses.replace(MM3, use_moe=True, n_experts_per_tok=1, n_shared_experts=0)),
                  str(tmp_path / "minimind3.pth"), False, {})
    init_from(our_vlm(MM3), str(tmp_path / "minimind3.pth"), False, {})


def test_missing_tensors_are_an_error_unless_partial_init_is_allowed(tmp_path):
    state = lm_state(MM2)
    torch.save({k: v for k, v in state.items() if "layers.1." not in k}, tmp_path / "one_layer.pth")
    with pytest.raises(ValueError, match=r"lacks 9 of 20 tensors: model.layers.1.*\(\+6 more\) -> model.n_layer=1; set.*allow_partial_init"):
        init_from(our_vlm(MM2), str(tmp_path / "one_layer.pth"), False, {})
    assert "9 missing, left random" in init_from(our_vlm(MM2), str(tmp_path / "one_layer.pth"), True, {})


def test_a_vocabulary_that_grew_by_more_than_the_image_token_is_refused(tmp_path):
    state = lm_state(MM2)
    state["model.embed_tokens.weight"] = state["lm_head.weight"] = state["lm_head.weight"][:V - 5]
    torch.save(state, tmp_path / "small_vocab.pth")
    with pytest.raises(ValueError, match=r"91 vocabulary rows, but the tokenizer has 97 tokens.*tokenizer.name_or_path"):
        init_from(our_vlm(MM2), str(tmp_path / "small_vocab.pth"), False, {})


class NotATensor:
    pass


def test_an_lm_file_that_needs_pickle_is_refused_naming_it(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(read_state(tmp_path / "ok.pth")["w"], torch.ones(2))
    with open(tmp_path / "bad.pth", "wb") as f:
        pickle.dump({"w": NotATensor()}, f, protocol=2)
    with pytest.raises(ValueError, match="bad.pth: cannot read it without pickle.*safetensors"):
        read_state(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="init_from.*none.safetensors.*not found"):
        init_from(our_vlm(MM2), str(tmp_path / "none.safetensors"), False, {})


def test_unexpected_experts_biases_and_untied_heads_are_refused_buffers_are_not(tmp_path):
    cfg = dataclasses.replace(MM3, use_moe=True, n_shared_experts=0, n_experts_per_tok=1, moe_norm_topk="always")
    state = lm_state(cfg)
    torch.save(state, tmp_path / "moe.pth")
    with pytest.raises(ValueError, match=r"mlp.experts.*-> model.use_moe=true"):
        init_from(our_vlm(MM3), str(tmp_path / "moe.pth"), False, {})
    with pytest.raises(ValueError, match=r"shared_experts.*model.n_shared_experts \(fewer there\)"):
        init_from(our_vlm(dataclasses.replace(cfg, n_shared_experts=1)), str(tmp_path / "moe.pth"), False, {})
    dense = lm_state(MM3)
    extra = {**dense, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    torch.save(extra, tmp_path / "bias.pth")
    with pytest.raises(ValueError, match=r"q_proj.bias -> none"):
        init_from(our_vlm(MM3), str(tmp_path / "bias.pth"), False, {})
    del extra["model.layers.0.self_attn.q_proj.bias"]
    torch.save(extra, tmp_path / "buffer.pth")
    assert "skipped 1 buffers" in init_from(our_vlm(MM3), str(tmp_path / "buffer.pth"), False, {})
    untied = {**dense, "lm_head.weight": dense["model.embed_tokens.weight"] + 1}
    torch.save(untied, tmp_path / "untied.pth")
    with pytest.raises(ValueError, match="untied embeddings"):
        init_from(our_vlm(MM3), str(tmp_path / "untied.pth"), False, {})


# ---- chaining runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_starts_from_an_earlier_run_and_goes_on(demo, demo_cache, tmp_path):
    first = train_config(demo, demo_cache, tmp_path, "train.max_steps=6", "train.run_name=proj", "train.freeze_llm=2",
                         "train.lr=5e-3")
    done = fit(first, Dist())
    second = train_config(demo, demo_cache, tmp_path, "train.max_steps=4", "train.run_name=full", "train.freeze_llm=0",
                          f"train.init_from={first.train.run_dir}")
    data = load_data(second, Dist())
    model, _, _ = build_model(second, data, "cpu", init=True)
    at_step_0 = evaluate(model, data.eval_batches, data.codec, torch.float32, "cpu")["eval_loss"]
    assert abs(at_step_0 - done["eval_loss"]) < 1e-4
    data.train.close()
    after = fit(second, Dist())
    assert after["step"] == 4 and math.isfinite(after["eval_loss"]) and after["eval_loss"] < at_step_0

    mc = json.loads((first.train.run_dir / "model_config.json").read_text())
    other_weights = {**mc["encoder"], "fingerprint": {**mc["encoder"]["fingerprint"], "weights": "0" * 16}}
    for i, (change, needle) in enumerate([({"encoder": other_weights}, "has encoder.weights='0000000000000000' where"),
                                          ({"cache_tokens": 64, "image_tokens": 64}, "image rows T: 64 there, 16 here"),
                                          ({"image_tokens": 4}, "image_tokens=4, but cache_tokens=16 with model.pool=1"),
                                          ({"model": {**mc["model"], "pool": 2}, "image_tokens": 4},
                                           "model.pool: 2 there, 1 here"),
                                          ({"model": {**mc["model"], "pixel_shuffle": 2}, "image_tokens": 4},
                                           "model.pixel_shuffle: 2 there, 1 here"),
                                          ({"vocab_size": mc["vocab_size"] + 1}, "vocab_size"),
                                          ({"model": {**mc["model"], "n_kv_head": 2}}, "model.n_kv_head=1 but 2 there"),
                                          ({"model": {**mc["model"], "projector": "mlp"}}, "model.projector")]):
        other = tmp_path / f"other{i}"
        shutil.copytree(first.train.run_dir, other)
        (other / "model_config.json").write_text(json.dumps({**mc, **change}))
        with pytest.raises(ValueError, match=needle):
            init_from(model, str(other), False, data.manifest)
    # a run written before the LM options and token reduction existed (its model config lacks them) still chains
    old = {k: v for k, v in mc["model"].items()
           if k not in ("head_dim", "ffn_dim", "qk_norm", "moe_norm_topk", "pool", "pixel_shuffle")}
    (other / "model_config.json").write_text(json.dumps({**{k: v for k, v in mc.items() if k != "cache_tokens"},
                                                         "model": old}))
    assert "minivlm run" in init_from(model, str(other), False, data.manifest)


# ---- MiniMind-V VLM checkpoints, from their definitions -------------------------------------------------

class VisionProj(torch.nn.Module):
    """v1's projector (2024 `model/model.py`, kept by MiniMind2-V's `model/model_vlm.py`): one Linear with
    bias in a Sequential, so its tensors are `vision_proj.vision_proj.0.*`."""

    def __init__(self, ve_dim: int, lm_dim: int):
        super().__init__()
        self.vision_proj = torch.nn.Sequential(torch.nn.Linear(ve_dim, lm_dim))

    def forward(self, x):
        return self.vision_proj(x)


class MMVisionProjector(torch.nn.Module):
    """minimind-3v's projector (`model/model_vlm.py` of 2026): LayerNorm -> Linear -> GELU -> Linear on each
    of SigLIP's 64 rows, `vision_proj.mlp.{0,1,3}.*`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(in_dim), torch.nn.Linear(in_dim, out_dim), torch.nn.GELU(),
                                       torch.nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.mlp(x)


class MergingProjector(torch.nn.Module):
    """The token-merging `MMVisionProjector` of a 2025 model_vlm.py (256 SigLIP2 rows -> 64: four rows
    concatenated, then Linear -> GELU -> Linear): a function minivlm's projectors do not compute."""

    def __init__(self, in_dim: int, out_dim: int, merge: int = 4):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(in_dim * merge, out_dim), torch.nn.GELU(),
                                       torch.nn.Linear(out_dim, out_dim))


IMG = 8  # the image row width D (768 upstream), as our_vlm builds it


def with_projector(lm: dict, projector: torch.nn.Module) -> dict:
    """A MiniMind-V VLM's state dict: the LM's tensors and `vision_proj.*` (its tower left out)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in projector.parameters():  # LayerNorm's too: a weight of 1 and a bias of 0 would hide a skipped one
            p.normal_(0.0, 0.3)
    return {**lm, **{f"vision_proj.{k}": v for k, v in projector.state_dict().items()}}


def saved_as_today(path, state: dict) -> dict:
    """What trainer/train_pretrain_vlm.py saves: every tensor but `vision_encoder.*`, in fp16. Returns the
    weights as they come back (fp32), for the references."""
    torch.save({k: v.half().cpu() for k, v in state.items() if not k.startswith("vision_encoder.")}, path)
    return {k: v.float() for k, v in torch.load(path, weights_only=True).items()}


def minimind3_lm(cfg: ModelConfig):
    """minimind-3's LM (`model/model_minimind.py` of 2026) on random weights. transformers' Qwen3 computes its
    function under its tensor names: q/k RMSNorm per head before rotate-half RoPE, eps 1e-6, base 1e6, SwiGLU,
    tied embeddings, no biases (the equivalence docs/training.md states and the HF tests above hold ours to)."""
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=V, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_size, intermediate_size=cfg.ffn_size,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, max_position_embeddings=cfg.max_seq_len)).eval()
    randomize_norms(ref)
    return ref


M3V = dataclasses.replace(MM3, projector="mlp")  # minimind-3's function at a tiny size


def assert_same_projector(ours: VLM, ref: torch.nn.Module):
    x = torch.randn(2, 5, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours.projector(x), ref(x))


def test_todays_minimind_v_checkpoint_loads_its_lm_and_layernorm_projector_exactly(tmp_path):
    """pretrain_vlm_768.pth: minimind-3 LM + MMVisionProjector, saved in fp16 without the tower."""
    ref_lm, ref_proj = minimind3_lm(M3V), MMVisionProjector(IMG, M3V.dim)
    back = saved_as_today(tmp_path / "pretrain_vlm_768.pth", with_projector(ref_lm.state_dict(), ref_proj))
    ref_lm.load_state_dict({k: v for k, v in back.items() if not k.startswith("vision_proj.")})
    ref_proj.load_state_dict({k.removeprefix("vision_proj."): v for k, v in back.items()
                              if k.startswith("vision_proj.")})
    ours = our_vlm(M3V)
    summary = init_from(ours, str(tmp_path / "pretrain_vlm_768.pth"), False, {})
    assert "(MiniMind-V checkpoint, LM: minimind-3" in summary and "projector mlp from vision_proj.*" in summary
    assert_same_function(ours, lambda x: ref_lm(x).logits)
    assert_same_projector(ours, ref_proj.eval())


def test_v1_minimind_v_checkpoint_loads_its_lm_and_linear_projector_exactly(tmp_path):
    """v1's pretrain_vlm_512.pth: the v1 LM (old names) + VisionProj, `torch.save(model.state_dict())`."""
    cfg = dataclasses.replace(load_config(REPO / "configs" / "minimind_v1.toml").model, n_layer=2)
    proj = VisionProj(IMG, cfg.dim)
    sd = with_projector(v1_state(cfg, V, False), proj)
    torch.save(sd, tmp_path / "pretrain_vlm_512.pth")
    ours = our_vlm(cfg)
    summary = init_from(ours, str(tmp_path / "pretrain_vlm_512.pth"), False, {})
    assert "(MiniMind-V checkpoint, LM: old MiniMind names" in summary and "projector linear from" in summary
    assert_same_function(ours, lambda x: v1_forward(sd, cfg, x, 1e4))
    assert_same_projector(ours, proj.eval())


def test_a_resume_file_with_the_vision_tower_skips_the_tower_and_says_so(tmp_path):
    """checkpoints/*_resume.pth keeps the whole VLM (its SigLIP tower too) under `model`, beside the optimizer."""
    ref_lm, ref_proj = minimind3_lm(M3V), MMVisionProjector(IMG, M3V.dim)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8))
    state = {**with_projector(ref_lm.state_dict(), ref_proj),
             **{f"vision_encoder.{k}": v for k, v in tower.state_dict().items()}}
    opt = torch.optim.AdamW(ref_proj.parameters())
    torch.save({"model": state, "optimizer": opt.state_dict(), "epoch": 0, "step": 3, "world_size": 1,
                "wandb_id": None}, tmp_path / "pretrain_vlm_768_resume.pth")
    ours = our_vlm(M3V)
    summary = init_from(ours, str(tmp_path / "pretrain_vlm_768_resume.pth"), False, {})
    n = len(tower.state_dict())
    assert f"skipped {n} vision tower tensors (vision_encoder.*: stage 1's encoder, not part of this model)" in summary
    assert_same_function(ours, lambda x: ref_lm(x).logits)
    assert_same_projector(ours, ref_proj.eval())


@pytest.mark.parametrize("cfg,projector,why", [
    (M3V, MMVisionProjector(IMG + 4, M3V.dim),
     r"shapes differ \(vision_proj.mlp.0.weight \(12,\) vs projector.0.weight \(8,\) here"),
    (dataclasses.replace(M3V, projector="mlp2x_gelu"), MMVisionProjector(IMG, M3V.dim),
     r"the checkpoint's is MMVisionProjector: LayerNorm -> Linear -> GELU -> Linear, model.projector=mlp2x_gelu "
     r"here; set model.projector=mlp to load it"),
    (M3V, VisionProj(IMG, M3V.dim), r"checkpoint's is VisionProj: one Linear, model.projector=mlp here; set "
                                    r"model.projector=linear"),
    (M3V, MergingProjector(IMG, M3V.dim), r"vision_proj.mlp.0.weight \(32, 32\).* is no MiniMind-V projector minivlm "
                                          r"can compute; model.projector=mlp starts from its initialisation")])
def test_a_projector_that_is_not_ours_is_skipped_with_the_reason_and_the_lm_still_loads(tmp_path, cfg, projector, why):
    ref_lm = minimind3_lm(cfg)
    back = saved_as_today(tmp_path / "vlm.pth", with_projector(ref_lm.state_dict(), projector))
    ref_lm.load_state_dict({k: v for k, v in back.items() if not k.startswith("vision_proj.")})
    ours = our_vlm(cfg)
    before = {k: v.clone() for k, v in ours.projector.state_dict().items()}
    summary = init_from(ours, str(tmp_path / "vlm.pth"), False, {})
    assert re.search("projector not loaded: .*" + why, summary), summary
    assert all(torch.equal(before[k], v) for k, v in ours.projector.state_dict().items())
    assert_same_function(ours, lambda x: ref_lm(x).logits)


def test_a_vocabulary_grown_by_the_image_token_and_splits_markers_loads(tmp_path):
    from minivlm.training.pretrained import load_state

    state = lm_state(MM2)
    ours = our_vlm(MM2, vocab=V + 1 + 4)  # placeholder + 4 markers, as a split tokenizer adds them
    assert "vocabulary rows 96 -> 101 (minivlm's tokens added)" in load_state(ours, state, "lm.pth", False, markers=4)
    assert torch.equal(ours.lm_head.weight[:V], state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match=r"96 vocabulary rows, but the tokenizer has 101 tokens \(3 added"):
        load_state(our_vlm(MM2, vocab=V + 1 + 4), state, "lm.pth", False, markers=2)
