"""minivlm.training.model, .attention and minivlm.use.generate: placeholder injection, token reduction (pool, pixel
shuffle), MoE, GQA, KV cache, packed rows, freezing, checkpoint names."""
import dataclasses
import math

import pytest
import torch

from minivlm.config import ModelConfig
from minivlm.training.attention import attention_backend, cu_seqlens_of, packed_attention, packed_rows
from minivlm.training.model import VLM, MoEFeedForward, freeze, num_params, param_groups, reduce_rows
from minivlm.training.text import IGNORE
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
    with pytest.raises(ValueError, match=f"row 2 has {T - 1} image placeholder tokens; expected a multiple of T'={T}"):
        model(ids, images)
    ids, images = batch(3, image_rows=[0, 2])
    with pytest.raises(ValueError, match=f"{2 * T} image placeholder tokens for 1 images"):
        model(ids, images[:1])
    ids, _ = batch(2, image_rows=[1])
    with pytest.raises(ValueError, match="row 1 .* images is None"):
        model(ids, None)


# ---- token reduction: model.pool and model.pixel_shuffle, against torch's avg_pool2d and transformers' Idefics3 ----

def idefics3_pixel_shuffle(x, s):
    """transformers' own Idefics3 connector shuffle (SmolVLM's and nanoVLM's layout):
    (K, g*g, D) -> (K, g*g/s^2, s^2 D)."""
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    text = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 8, "vocab_size": 8}
    connector = Idefics3Connector(Idefics3Config(vision_config={"hidden_size": x.size(-1)}, text_config=text,
                                                 scale_factor=s))
    return connector.pixel_shuffle(x, s)


def avg_pool_rows(x, k):
    """torch's avg_pool2d over the row-major g x g grid of rows (K, g*g, D) -> (K, g*g/k^2, D)."""
    K, N, D = x.shape
    g = math.isqrt(N)
    grid = x.transpose(1, 2).reshape(K, D, g, g)  # (K, D, g, g)
    return torch.nn.functional.avg_pool2d(grid, k).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("cls", [0, 1], ids=["no_cls", "cls_kept"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_pool_is_avg_pool2d_over_the_patch_grid_and_leaves_the_cls_row(k, cls):
    images = torch.randn(3, cls + 64, D_IMG)  # an 8x8 grid, after the CLS row when kept
    out = reduce_rows(images, dataclasses.replace(TINY, pool=k))
    assert out.shape == (3, ModelConfig(pool=k).image_tokens(cls + 64), D_IMG) == (3, cls + 64 // k ** 2, D_IMG)
    torch.testing.assert_close(out[:, cls:], avg_pool_rows(images[:, cls:], k))
    assert torch.equal(out[:, :cls], images[:, :cls])


@pytest.mark.parametrize("k, s", [(1, 2), (1, 4), (2, 2), (1, 8), (4, 2)])
def test_pixel_shuffle_after_pooling_is_transformers_idefics3_pixel_shuffle(k, s):
    images = torch.randn(3, 64, D_IMG)
    out = reduce_rows(images, dataclasses.replace(TINY, pool=k, pixel_shuffle=s))
    want = idefics3_pixel_shuffle(avg_pool_rows(images, k) if k > 1 else images, s)
    assert out.shape == want.shape == (3, 64 // (k * s) ** 2, s * s * D_IMG)
    torch.testing.assert_close(out, want, rtol=0, atol=0 if k == 1 else 1e-6)


@pytest.mark.parametrize("over", [{"pool": 2}, {"pixel_shuffle": 2}, {"pool": 2, "pixel_shuffle": 2,
                                                                        "projector": "mlp"}])
def test_reduced_rows_fill_the_placeholders_through_a_projector_of_s2_d_inputs(over):
    """Cached rows (K, 16, D) of a 4x4 grid become T' rows per image, projected onto the placeholders in order."""
    model = tiny_vlm(**over)
    cfg = model.cfg
    s, n = cfg.pixel_shuffle, cfg.image_tokens(16)
    first = next(m for m in model.projector if isinstance(m, torch.nn.Linear))
    assert first.in_features == s * s * D_IMG
    images = torch.randn(2, 16, D_IMG)
    ids = torch.randint(0, V - 1, (2, 10))
    ids[0, 1:1 + n], ids[1, 5:5 + n] = IMG, IMG
    reference = avg_pool_rows(images, cfg.pool) if cfg.pool > 1 else images
    reference = idefics3_pixel_shuffle(reference, s) if s > 1 else reference
    h = model.embed(ids, images)
    proj = model.projector(reference)  # (2, T', dim)
    torch.testing.assert_close(h[0, 1:1 + n], proj[0])
    torch.testing.assert_close(h[1, 5:5 + n], proj[1])
    with pytest.raises(ValueError, match=f"{2 * n} image placeholder tokens for 1 images of T'={n} rows"):
        model.embed(ids, images[:1])


def test_a_grid_the_reduction_does_not_divide_and_cls_with_pixel_shuffle_are_one_line():
    assert ModelConfig(pool=2).image_tokens(17) == 5 and ModelConfig().image_tokens(12) == 12
    for cfg, rows, needle in [(ModelConfig(pool=3), 16, "model.pool=3 x model.pixel_shuffle=1 must divide the cache's "
                                                         "4x4 patch grid \\(T=16\\)"),
                              (ModelConfig(pool=4, pixel_shuffle=4), 64, "must divide the cache's 8x8 patch grid"),
                              (ModelConfig(pixel_shuffle=2), 17, "model.pixel_shuffle=2 on a cache that keeps the CLS "
                                                                  "row \\(encoder.keep_cls=true\\)"),
                              (ModelConfig(pool=2), 12, "T=12 rows per image are no square patch grid")]:
        with pytest.raises(ValueError, match=needle) as e:
            cfg.image_tokens(rows)
        assert "\n" not in str(e.value)


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


# Packed rows: several samples back to back in a row, each attending to itself alone (minivlm.training.attention).

def sample(n, image_at=(), seed=0):
    """A sample of n tokens with an image's T placeholders at each offset of image_at, its images (k, T, D) or
    None, and labels on every token (the first too, so a label predicted across samples would count)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (n,), generator=g)
    for o in image_at:
        ids[o:o + T] = IMG
    images = torch.randn(len(image_at), T, D_IMG, generator=g) if image_at else None
    return ids, ids.clone(), images


# Two images at different places, text only, one image near the end, text only.
SAMPLES = [sample(16, (1, 9), seed=1), sample(7, seed=2), sample(10, (5,), seed=3), sample(5, seed=4)]
ROWS = [[0, 1], [2, 3]]  # rows of L=24: 16 + 7 + a padding tail of 1; 10 + 5 + 9


def pack(samples, rows, L=24):
    """The data side's contract: rows of samples back to back, positions restarting at 0 per sample, the
    tail padded as one more sample (labels -100), the images in placeholder order, cu_seqlens from the host."""
    ids, labels, positions, images = [], [], [], []
    for row in rows:
        parts = [samples[i] for i in row]
        pad = L - sum(len(p[0]) for p in parts)
        ids.append(torch.cat([p[0] for p in parts] + [torch.zeros(pad, dtype=torch.long)]))
        labels.append(torch.cat([p[1] for p in parts] + [torch.full((pad,), -100)]))
        positions.append(torch.cat([torch.arange(len(p[0])) for p in parts] + [torch.arange(pad)]))
        images += [p[2] for p in parts if p[2] is not None]
    positions = torch.stack(positions)
    return (torch.stack(ids), torch.cat(images), torch.stack(labels),
            {"positions": positions, "cu_seqlens": cu_seqlens_of(positions)})


def pad(samples):
    """The same samples as today's padded batch: one per row, right-padded, labels -100 on the padding."""
    L = max(len(s[0]) for s in samples)
    ids = torch.stack([torch.cat([s[0], torch.zeros(L - len(s[0]), dtype=torch.long)]) for s in samples])
    labels = torch.stack([torch.cat([s[1], torch.full((L - len(s[0]),), -100)]) for s in samples])
    return ids, torch.cat([s[2] for s in samples if s[2] is not None]), labels


PACKED_MODELS = {"gqa": {}, "qk_norm": {"qk_norm": True, "head_dim": 16},
                 "moe": {"use_moe": True, "n_routed_experts": 4, "n_experts_per_tok": 2, "n_shared_experts": 1}}


@pytest.mark.parametrize("over", PACKED_MODELS.values(), ids=PACKED_MODELS.keys())
def test_every_sample_in_a_packed_row_has_its_logits_alone(over):
    model = tiny_vlm(**over).eval()
    ids, images, _, packing = pack(SAMPLES, ROWS)
    packed = model(ids, images, **packing).logits  # (2, 24, V)
    for row, at in zip(ROWS, ([0, 16], [0, 10])):
        for i, start in zip(row, at):
            s_ids, _, s_images = SAMPLES[i]
            alone = model(s_ids[None], s_images).logits[0]  # (n, V)
            torch.testing.assert_close(packed[ROWS.index(row), start:start + len(s_ids)], alone, atol=1e-5, rtol=0)


def test_each_packed_sample_is_rotated_from_position_0(monkeypatch):
    """RoPE scores depend on relative positions only, so logits barely show where a sample's rotation starts
    (fp32 rounding of large angles); the rotated queries and keys of the first layer show it exactly."""
    import minivlm.training.model as model_module
    seen, real = [], model_module.apply_rope

    def recording(x, cos, sin):
        seen.append(real(x, cos, sin))
        return seen[-1]

    monkeypatch.setattr(model_module, "apply_rope", recording)
    model = tiny_vlm(n_layer=1).eval()
    ids, images, _, packing = pack(SAMPLES, ROWS)
    model(ids, images, **packing)
    packed_q, packed_k = seen[0], seen[1]  # (2, H, 24, hd), (2, Hkv, 24, hd)
    seen.clear()
    s_ids, _, s_images = SAMPLES[3]  # row 1, from token 10
    model(s_ids[None], s_images)
    torch.testing.assert_close(packed_q[1:, :, 10:15], seen[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(packed_k[1:, :, 10:15], seen[1], atol=1e-6, rtol=0)


def test_packed_loss_is_the_token_weighted_loss_of_the_samples_alone():
    model = tiny_vlm(qk_norm=True).train()  # dropout 0: training computes what eval does
    ids, images, labels, packing = pack(SAMPLES, ROWS)
    total, count = 0.0, 0
    for s_ids, s_labels, s_images in SAMPLES:
        logits = model(s_ids[None], s_images).logits[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], s_labels[1:], reduction="sum")
        count += len(s_ids) - 1
    torch.testing.assert_close(model(ids, images, labels, **packing).loss, total / count, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("over", [{}, {"use_moe": True, "n_routed_experts": 4, "n_experts_per_tok": 2,
                                       "aux_loss_alpha": 0.0}], ids=["dense", "moe"])
def test_a_packed_step_gives_the_loss_and_gradients_of_the_padded_step(over):
    """The MoE balance loss counts padding tokens, so it differs between layouts; alpha 0 compares the rest."""
    grads = {}
    for layout in ("padded", "packed"):
        model = tiny_vlm(**over).train()
        if layout == "padded":
            loss = model(*pad(SAMPLES)).loss
        else:
            ids, images, labels, packing = pack(SAMPLES, ROWS)
            loss = model(ids, images, labels, **packing).loss
        loss.backward()
        grads[layout] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_a, a), (loss_b, b) = grads["padded"], grads["packed"]
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert a.keys() == b.keys() and len(a) == len(list(tiny_vlm(**over).parameters()))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_samples_first_token_is_never_predicted_from_the_previous_sample():
    model = tiny_vlm().eval()
    ids, images, labels, packing = pack(SAMPLES, ROWS)
    start = len(SAMPLES[0][0])  # row 0: sample 1 starts here, right after sample 0's last token
    losses = []
    for first in (IGNORE, 3, 17):
        labels[0, start] = first
        losses.append(model(ids, images, labels, **packing).loss)
    assert losses[0] == losses[1] == losses[2]
    labels[0, start + 1] = 17 if labels[0, start + 1] != 17 else 3  # the next label is a target: the test can fail
    assert model(ids, images, labels, **packing).loss != losses[0]


def positions_of(*lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def test_cu_seqlens_are_flash_attn_offsets_as_transformers_computes_them():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    positions = positions_of([3, 2, 1], [6])
    (ref, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(positions)
    got = cu_seqlens_of(positions)
    assert got.dtype == torch.int32 and got.tolist() == ref.tolist() == [0, 3, 5, 6, 12]
    assert int(max_len) <= positions.size(1)  # the row length we pass as max_seqlen bounds every sample


def attend(backend, q, k, v, positions):
    return packed_attention(q, k, v, packed_rows(positions, cu_seqlens_of(positions), backend, q.dtype), 0.0)


def qkv(positions, H=4, Hkv=2, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = positions.shape
    return (torch.randn(B, H, L, hd, generator=g), torch.randn(B, Hkv, L, hd, generator=g),
            torch.randn(B, Hkv, L, hd, generator=g))


# Rows of 384 tokens (three of FlexAttention's 128-token blocks): samples inside a block, across blocks, and
# a block pair with no sample in common (row 0: query block 2 and key block 0), so block skipping is exercised.
LONG = positions_of([130, 254], [60, 70, 200, 40, 14])


@pytest.mark.parametrize("backend", ["sdpa", "gather"])
def test_sdpa_with_the_block_mask_or_gathered_equals_causal_attention_over_each_sample_alone(backend):
    q, k, v = qkv(LONG)
    y = attend(backend, q, k, v, LONG)  # (B, L, H * hd)
    for b, row in enumerate(([130, 254], [60, 70, 200, 40, 14])):
        start = 0
        for n in row:
            s = slice(start, start + n)
            alone = torch.nn.functional.scaled_dot_product_attention(
                q[b:b + 1, :, s], k[b:b + 1, :, s].repeat_interleave(2, 1), v[b:b + 1, :, s].repeat_interleave(2, 1),
                is_causal=True)  # (1, H, n, hd)
            torch.testing.assert_close(y[b, s], alone[0].transpose(0, 1).flatten(1), atol=1e-5, rtol=0)
            start += n


@pytest.mark.slow  # compiles FlexAttention for the CPU (~30 s on two busy cores)
def test_flex_attention_forward_on_cpu_equals_sdpa_with_the_block_mask():
    """FlexAttention has no CPU backward (pytorch#148752), but its compiled CPU forward reads the same block
    mask (which blocks to skip, which to mask) that the CUDA kernel does."""
    q, k, v = qkv(LONG)
    with torch.no_grad():
        torch.testing.assert_close(attend("flex", q, k, v, LONG), attend("sdpa", q, k, v, LONG), atol=1e-5, rtol=0)


def test_varlen_layout_meets_flash_attn_varlen_func_contract(monkeypatch):
    """No flash-attn on the CPU: a stand-in with flash_attn_varlen_func's documented contract (tokens of all
    sequences concatenated (total, heads, hd), sequence i = rows cu_seqlens[i]:cu_seqlens[i+1], GQA by head
    groups, max_seqlen an upper bound) checks the layout we hand it and the one we read back."""
    import minivlm.training.attention as attention

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and causal
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= min(max_q, max_k)
            rep = q.size(1) // k.size(1)
            y = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(rep, 0),
                v[a:b].transpose(0, 1).repeat_interleave(rep, 0), is_causal=True)  # (H, n, hd)
            out[a:b] = y.transpose(0, 1)
        return out

    monkeypatch.setattr(attention, "flash_attn_varlen_func", varlen)
    q, k, v = qkv(LONG)
    torch.testing.assert_close(attend("flash_attn", q, k, v, LONG), attend("sdpa", q, k, v, LONG), atol=1e-5, rtol=0)


def test_attention_backend_follows_device_dtype_dropout_and_flash_attn(monkeypatch):
    import minivlm.training.attention as attention
    bf16 = torch.bfloat16
    assert attention_backend("cpu", torch.float32, 0.0).name == "gather"
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "HAS_TRITON", True)
    assert attention_backend("cuda:0", bf16, 0.0) == ("flex", "FlexAttention with a document mask; flash-attn is "
                                                              "not installed")
    assert attention_backend("cuda", bf16, 0.1).name == "sdpa"  # FlexAttention has no dropout
    monkeypatch.setattr(attention, "flash_attn_varlen_func", object())
    assert attention_backend("cuda", bf16, 0.1).name == "flash_attn"
    assert attention_backend("cuda", torch.float16, 0.0).name == "flash_attn"
    assert str(attention_backend("cuda", torch.float32, 0.0)) == \
        "flex (FlexAttention with a document mask; flash-attn cannot compute in torch.float32)"
    monkeypatch.setattr(attention, "HAS_TRITON", False)
    assert attention_backend("cuda", torch.float32, 0.0).name == "sdpa"


def test_bad_packed_rows_are_one_line_each():
    model = tiny_vlm().eval()
    ids, images, labels, packing = pack(SAMPLES, ROWS)
    positions, cu = packing["positions"], packing["cu_seqlens"]
    shifted = positions.clone()
    shifted[1] = torch.arange(1, 25)
    skipped = positions.clone()
    skipped[0, 5] = 7
    cases = [({"positions": positions, "cu_seqlens": None}, "positions come with cu_seqlens"),
             ({"positions": positions[:, :-1], "cu_seqlens": cu}, r"positions \(2, 23\) must have the shape"),
             ({"positions": shifted, "cu_seqlens": cu_seqlens_of(shifted)}, "positions row 1 starts at 1"),
             ({"positions": skipped, "cu_seqlens": cu_seqlens_of(skipped)}, "positions row 0 goes 4 -> 7"),
             ({"positions": positions, "cu_seqlens": cu.long()}, "cu_seqlens does not match positions"),
             ({"positions": positions, "cu_seqlens": cu[:-1]}, "cu_seqlens does not match positions")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            model(ids, images, labels, **kw)
    with pytest.raises(ValueError, match="take no KV cache"):
        model(ids, images, kv_cache=model.new_cache(), **packing)
