"""minivlm.training.model and minivlm.use.generate: placeholder injection, MoE, GQA, KV cache, freezing, checkpoint names."""
import dataclasses
import math

import pytest
import torch

from minivlm.config import ModelConfig
from minivlm.training.model import VLM, MoEFeedForward, freeze, num_params, param_groups
from minivlm.use.generate import generate, sample_next

V, D_IMG, T = 50, 12, 4
IMG = V - 1  # image placeholder token id
TINY = ModelConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, multiple_of=16, max_seq_len=64)


def tiny_vlm(seed=0, **over) -> VLM:
    torch.manual_seed(seed)
    return VLM(dataclasses.replace(TINY, **over), vocab_size=V, image_dim=D_IMG, image_token_id=IMG)


def batch(B, L=12, image_rows=None, offsets=None, seed=0):
    """Random text ids (never the placeholder) with T placeholders at offsets[r] in each image row, and the
    images of the image rows in order (K, T, D)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    image_rows = list(image_rows if image_rows is not None else range(B))
    for r in image_rows:
        o = offsets[r] if offsets else 1
        ids[r, o:o + T] = IMG
    return ids, torch.randn(len(image_rows), T, D_IMG, generator=g)


@pytest.mark.parametrize("B", [1, 3])
def test_image_rows_reach_only_their_own_row_placeholders(B):
    model = tiny_vlm()
    image_rows = [0] if B == 1 else [0, 2]  # row 1 of the batch of 3 is text-only
    ids, images = batch(B, image_rows=image_rows, offsets={0: 1, 2: 5})
    images.requires_grad_(True)

    h = model.embed(ids, images)
    proj = model.projector(images)
    for k, r in enumerate(image_rows):
        torch.testing.assert_close(h[r][ids[r] == IMG], proj[k])
    text = ids != IMG
    torch.testing.assert_close(h[text], model.model.embed_tokens(ids)[text])

    logits = model(ids, images).logits
    for r in range(B):
        (grad,) = torch.autograd.grad(logits[r].pow(2).sum(), images, retain_graph=True)
        for k, q in enumerate(image_rows):
            if q == r:
                assert grad[k].abs().sum() > 0, f"row {r} loss does not reach its own image"
            else:
                assert torch.all(grad[k] == 0), f"row {r} loss reaches image {k} of row {q}"


def test_several_images_fill_their_placeholder_runs_in_order():
    """Two images in one row, one in the next: the n-th placeholder run of the batch takes image n."""
    model = tiny_vlm()
    ids, _ = batch(2, L=16, image_rows=[])
    ids[0, 2:2 + T], ids[0, 9:9 + T], ids[1, 0:T] = IMG, IMG, IMG
    images = torch.randn(3, T, D_IMG)
    h, proj = model.embed(ids, images), model.projector(images)
    for (r, at), k in zip([(0, 2), (0, 9), (1, 0)], range(3)):
        torch.testing.assert_close(h[r, at:at + T], proj[k])


def test_wrong_placeholder_count_raises():
    model = tiny_vlm()
    ids, images = batch(3, image_rows=[0, 2])
    ids[2, 1] = 7  # row 2 now has T - 1 placeholders
    with pytest.raises(ValueError, match=f"row 2 has {T - 1} image placeholder tokens; expected a multiple of T={T}"):
        model(ids, images)
    ids, images = batch(3, image_rows=[0, 2])
    with pytest.raises(ValueError, match=f"{2 * T} image placeholder tokens for 1 images"):
        model(ids, images[:1])
    ids, _ = batch(2, image_rows=[1])
    with pytest.raises(ValueError, match="row 1 .* images is None"):
        model(ids, None)


def test_moe_loss_includes_aux_and_every_expert_gets_a_gradient():
    model = tiny_vlm(use_moe=True, n_routed_experts=4, n_experts_per_tok=2, n_shared_experts=1)
    model.train()
    ids, images = batch(3, image_rows=[0, 2])
    out = model(ids, images, labels=ids)
    assert out.aux_loss > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    mlp = model.model.layers[0].mlp
    assert mlp.gate.weight.grad.abs().sum() > 0
    assert sum(e.down_proj.weight.grad.abs().sum() > 0 for e in mlp.experts) >= 2
    model.eval()
    assert model(ids, images).aux_loss == 0


def test_moe_matches_per_token_reference():
    cfg = dataclasses.replace(TINY, use_moe=True, n_routed_experts=4, n_experts_per_tok=2, n_shared_experts=1)
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg).eval()
    x = torch.randn(2, 5, cfg.dim)
    y, _ = moe(x)
    for b, t in [(0, 0), (1, 3)]:
        p = moe.gate(x[b, t]).softmax(-1)
        w, i = p.topk(2)
        w = w / w.sum()
        ref = sum(wk * moe.experts[int(ik)](x[b, t]) for wk, ik in zip(w, i)) + moe.shared_experts[0](x[b, t])
        torch.testing.assert_close(y[b, t], ref)


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = tiny_vlm(n_head=4, n_kv_head=2).eval()
    mha = tiny_vlm(n_head=4, n_kv_head=4).eval()
    sd = gqa.state_dict()
    hd = TINY.dim // 4
    for k, t in sd.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # KV head j serves query heads 2j, 2j+1
            sd[k] = t.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    ids, images = batch(2)
    torch.testing.assert_close(gqa(ids, images).logits, mha(ids, images).logits)


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_prefill_and_decode_equal_full_forward(use_moe):
    model = tiny_vlm(use_moe=use_moe).eval()
    ids, images = batch(3, L=14, image_rows=[0, 2], offsets={0: 1, 2: 3})
    full = model(ids, images).logits
    cache = model.new_cache()
    parts = [model(ids[:, :7], images, kv_cache=cache).logits,  # prefill holds every placeholder
             model(ids[:, 7:10], None, kv_cache=cache, start_pos=7).logits]  # chunk with start_pos > 0
    parts += [model(ids[:, p:p + 1], None, kv_cache=cache, start_pos=p).logits for p in range(10, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="start_pos=3"):
        model(ids[:, :1], None, kv_cache=cache, start_pos=3)


def test_greedy_generate_with_cache_equals_without_cache():
    model = tiny_vlm(seed=1).eval()
    ids, images = batch(3, L=10, image_rows=[0, 2])
    cached = generate(model, ids, images, max_new_tokens=12, eos_id=None)
    plain = generate(model, ids, images, max_new_tokens=12, eos_id=None, use_cache=False)
    assert cached == plain
    assert all(len(row) == 12 and IMG not in row for row in cached)
    eos = cached[0][3]
    cut = generate(model, ids, images, max_new_tokens=12, eos_id=eos)
    assert cut[0] == cached[0][:cached[0].index(eos) + 1]


def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy():
    logits = torch.randn(4, V)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_freeze_levels_choose_trainable_parameters():
    model = tiny_vlm(n_layer=3)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}
    groups = lambda *prefixes: {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    freeze(model, 0)
    assert trainable() == groups("")
    freeze(model, 2)
    assert trainable() == groups("projector.")
    freeze(model, 1)
    assert trainable() == groups("projector.", "model.layers.0.", "model.layers.2.")
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_param_groups_skip_decay_on_norms_biases_and_embeddings():
    model = tiny_vlm()
    freeze(model, 0)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
    decay_names = {by_id[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names and "model.norm.weight" in no_decay_names
    assert {"projector.0.weight", "projector.0.bias", "projector.1.bias"} <= no_decay_names
    assert all("layernorm" in n for n in no_decay_names if n.startswith("model.layers."))
    assert "model.layers.0.self_attn.q_proj.weight" in decay_names and "projector.1.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    freeze(model, 2)
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.projector.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)


def test_swiglu_hidden_and_default_lm_size_match_minimind_26m():
    cfg = ModelConfig()
    assert cfg.ffn_size == 1408
    for dim in (256, 512, 640, 768, 1024):  # MiniMind: int(8 * dim / 3) rounded up to a multiple of 64
        assert dataclasses.replace(cfg, dim=dim, n_head=8, n_kv_head=8).ffn_size == 64 * math.ceil(int(dim * 8 / 3) / 64)
    vocab = 6400  # MiniMind tokenizer
    with torch.device("meta"):
        model = VLM(cfg, vocab_size=vocab, image_dim=768, image_token_id=vocab - 1)
    lm = num_params(model) - num_params(model.projector)
    d, hd, F = cfg.dim, cfg.dim // cfg.n_head, cfg.ffn_size
    per_layer = d * hd * (cfg.n_head + 2 * cfg.n_kv_head) + cfg.n_head * hd * d + 3 * d * F + 2 * d
    expected = vocab * d + cfg.n_layer * per_layer + d  # tied embeddings counted once
    print(f"default LM: {lm / 1e6:.2f}M parameters (projector {num_params(model.projector) / 1e6:.2f}M)")
    assert lm == expected
    assert abs(lm - 26e6) / 26e6 < 0.05
    assert model.lm_head.weight is model.model.embed_tokens.weight
