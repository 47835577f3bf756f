"""The VLM: a MiniMind-style decoder LM plus a projector from cached image rows to the LM width.

Design choices:
- Parameter names follow the current MiniMind (`model/model_minimind.py`), which are also Hugging Face
  Llama/Qwen3's: `model.embed_tokens`, `model.layers.N.{input_layernorm,self_attn.{q,k,v,o}_proj,
  post_attention_layernorm,mlp.*}`, `model.norm`, `lm_head` (tied to `model.embed_tokens`).
- RoPE uses the rotate-half convention (pairs (i, i + head_dim/2)), as MiniMind2, minimind-3, Llama and
  Qwen3 do. v1 rotated adjacent pairs (2i, 2i+1); `minivlm.training.pretrained` permutes v1 `wq`/`wk` rows per head.
- The options that differ between the LMs we load are config fields, never guesses: `head_dim` apart
  from dim / n_head and `qk_norm` (per-head RMSNorm of q and k before RoPE) for minimind-3 / Qwen3,
  `ffn_dim`, `moe_norm_topk` (minimind-3 and Qwen3-MoE renormalise even a single expert's weight to 1).
- RMSNorm computes in fp32. Grouped-query attention via SDPA: query head h reads KV head h // n_rep.
- Packed rows (`forward(positions=, cu_seqlens=)`): several samples back to back in a row, each rotated by
  RoPE from position 0 and attending only to itself (minivlm.training.attention: flash-attn's varlen kernel,
  FlexAttention, SDPA with a block-diagonal mask or causal SDPA on each sample, as `attention_backend` picks),
  so a sample's logits are its logits alone. A sample's first token is never a target: its logit position holds the previous
  sample's last token (`next_token_targets`). The loss stays the mean over the batch's targets, so a step
  weighs every token as the padded layout does. Without positions each row is one sample from `start_pos`
  (generation, the KV cache), computed exactly as before packing.
- Every Linear/Embedding starts at N(0, 0.02); residual output projections (`o_proj`, `down_proj`) at
  0.02 / sqrt(2 * n_layer) (GPT-2). The projector uses the same init.
- MoE (cfg.use_moe): softmax router, top-k experts per token with weights renormalised per
  `moe_norm_topk`, `n_shared_experts` always-on shared experts, and in training the Switch/DeepSeek balance loss
  alpha * sum_i f_i * P_i (f_i = E * share of routed slots, P_i = mean router prob); 0 in eval, so
  validation loss is pure cross-entropy. An expert with no tokens still runs on an empty batch, so
  every parameter stays in the graph (DDP).
- Image rows replace the embeddings of the placeholder tokens: the batch's K images fill its placeholders in
  order, T' rows each, so a sample holds any number of images at its tags. On the CPU a count that does not
  add up is a ValueError, never a silent misalignment.
- The model chooses how many rows an image becomes, not the cache: each image's cached (T, D) rows, a g x g
  patch grid (after a kept CLS row), are averaged over k x k blocks (`model.pool`) and then pixel-shuffled
  (`model.pixel_shuffle` s: each s x s block concatenated into one row of s^2 D, in Idefics3 / SmolVLM /
  nanoVLM's order) before the projector, whose input is s^2 D wide: T' = (g / k / s)^2 (+ the CLS row, which
  stays outside the grid and goes through the projector as it is). So one cache serves a sweep over tokens per
  image. Both run in the embedding's dtype (fp32), on the device, where the rows already are.
- The KV cache is a plain per-layer list of tensors that `forward(kv_cache=..., start_pos=p)` appends to.
- A trained model is one artifact: `VLM.save_pretrained` writes safetensors + `VLMConfig` (asdict) as
  `model_config.json`, `VLM.from_pretrained` reads them back; the config is the only place its shape,
  prompt format and encoder spec are recorded (captioning, evaluation and export read it, never a dict).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlm.config import ModelConfig, TokenizerConfig, patch_grid
from minivlm.embedding.encoder import EncoderSpec
from minivlm.fileio import atomic_write_json, reading
from minivlm.training.attention import (PackedRows, attention_backend, check_packed, compute_dtype, packed_attention,
                                        packed_rows)
from minivlm.training.checkpoint import load_weights, save_weights
from minivlm.training.text import IGNORE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (S, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (S, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, L, hd), cos/sin (L, hd) or per row (B, 1, L, hd): rotate the pairs (i, i + hd/2) by
    position * freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class KVCache:
    """Keys and values of every layer so far, each (B, n_kv_head, S, head_dim); forward appends."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def seq_len(self) -> int:
        return 0 if self.k[0] is None else self.k[0].size(2)

    def update(self, layer: int, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.head_size
        self.q_proj = nn.Linear(cfg.dim, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # minimind-3 / Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None, rows: PackedRows | None = None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if rows is not None:  # packed rows: each sample attends to itself alone
            return self.resid_dropout(self.o_proj(packed_attention(q, k, v, rows, dropout_p)))  # (B, L, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd), S = start_pos + L
        S, rep = k.size(2), self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        # Query i sits at absolute position S - L + i and sees keys 0 .. S - L + i.
        mask = None if S == L or L == 1 else torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == L and L > 1,
                                           dropout_p=dropout_p)  # (B, H, L, hd)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, L, -1)))  # (B, L, D)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_size
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.renorm, self.alpha = cfg.n_experts_per_tok, cfg.renorm_topk, cfg.aux_loss_alpha
        self.gate = nn.Linear(cfg.dim, cfg.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_routed_experts))
        self.shared_experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_shared_experts))

    def forward(self, x):
        B, L, D = x.shape
        E = len(self.experts)
        xf = x.reshape(-1, D)  # (N, D)
        probs = self.gate(xf).float().softmax(dim=-1)  # (N, E)
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.renorm:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(xf)  # (N, D)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)  # tokens routed to e, and which of their k slots
            y.index_add_(0, tok, (expert(xf[tok]) * top_w[tok, slot, None]).to(y.dtype))
        y = y.view(B, L, D)
        for expert in self.shared_experts:
            y = y + expert(x)
        aux = probs.new_zeros(())
        if self.training and self.alpha > 0:
            f = torch.bincount(top_i.flatten(), minlength=E).float() * E / top_i.numel()  # (E,)
            aux = self.alpha * (f * probs.mean(dim=0)).sum()
        return y, aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg)

    def forward(self, x, cos, sin, cache, rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, rows)  # (B, L, D)
        h = self.post_attention_layernorm(x)
        y, aux = self.mlp(h) if isinstance(self.mlp, MoEFeedForward) else (self.mlp(h), None)
        return x + y, aux


class Transformer(nn.Module):
    """The LM body (MiniMind's `MiniMindModel`): embed_tokens, layers, norm, RoPE tables."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_dropout = cfg.dropout
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)  # (max_seq_len, hd)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, h, start_pos: int = 0, kv_cache: KVCache | None = None, positions=None, cu_seqlens=None):
        """h: input embeddings (B, L, D) -> final-normed hidden states (B, L, D), summed MoE aux loss. With
        `positions` (B, L) the rows are packed: each sample is rotated and attended to as if alone."""
        L, rows = h.size(1), None
        if positions is None:
            cos, sin = self.freqs_cos[start_pos:start_pos + L], self.freqs_sin[start_pos:start_pos + L]  # (L, hd)
        else:
            cos, sin = self.freqs_cos[positions].unsqueeze(1), self.freqs_sin[positions].unsqueeze(1)  # (B, 1, L, hd)
            dtype = compute_dtype(h)
            rows = packed_rows(positions, cu_seqlens, attention_backend(h.device, dtype, self.attention_dropout).name,
                               dtype)
        h, aux = self.dropout(h), h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, a = layer(h, cos, sin, kv_cache, rows)
            aux = aux if a is None else aux + a
        return self.norm(h), aux


def pool(grid: torch.Tensor, k: int) -> torch.Tensor:
    """(K, g, g, D) -> (K, g/k, g/k, D): the mean of each k x k block (avg_pool2d over the grid)."""
    K, g, _, D = grid.shape
    return grid.view(K, g // k, k, g // k, k, D).mean(dim=(2, 4))


def pixel_shuffle(grid: torch.Tensor, s: int) -> torch.Tensor:
    """(K, g, g, D) -> (K, g/s, g/s, s*s*D): each s x s block as one row, its s rows in order and each row's s
    positions in order (Idefics3 / SmolVLM / nanoVLM's layout, so their projectors read the same features)."""
    K, g, _, D = grid.shape
    return grid.view(K, g // s, s, g // s, s, D).transpose(2, 3).reshape(K, g // s, g // s, s * s * D)


def reduce_rows(images: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """An image's cached rows as the projector takes them: (K, T, D) -> (K, T', s*s*D), `cfg.pool` then
    `cfg.pixel_shuffle` over the patch grid, a kept CLS row (first) left as it is. T' = cfg.image_tokens(T)."""
    if cfg.pool == cfg.pixel_shuffle == 1:
        return images
    K, T, D = images.shape
    g, cls = patch_grid(T)
    grid = images[:, cls:].reshape(K, g, g, D)  # (K, g, g, D), row-major as the tower lays out its patches
    rows = pixel_shuffle(pool(grid, cfg.pool), cfg.pixel_shuffle).flatten(1, 2)  # (K, (g/k/s)^2, s*s*D)
    return torch.cat((images[:, :cls], rows), dim=1) if cls else rows  # CLS with s > 1: image_tokens refuses it


class Projector(nn.Sequential):
    """Image rows (B, T', image_dim) -> LM width (B, T', dim): `linear`; `mlp2x_gelu` (LLaVA-1.5's
    Linear -> GELU -> Linear, so it exports as LLaVA's projector); `mlp` (LayerNorm first, no LLaVA twin).
    `image_dim` is s^2 D under `model.pixel_shuffle` s."""

    def __init__(self, cfg: ModelConfig, image_dim: int):
        # Build only the layers used: each Linear draws from the RNG when made, so an unused one would change
        # every initial weight that follows (and the demo's numbers).
        norm = [nn.LayerNorm(image_dim)] if cfg.projector == "mlp" else []
        first = nn.Linear(image_dim, cfg.dim)
        rest = [] if cfg.projector == "linear" else [nn.GELU(), nn.Linear(cfg.dim, cfg.dim)]
        super().__init__(*norm, first, *rest)


@dataclass(frozen=True)
class VLMConfig:
    """A trained VLM's `model_config.json`: what builds it and what it reads (the prompt format, the image
    rows' encoder spec), so captioning, evaluation and export need nothing else from the run."""
    model: ModelConfig
    vocab_size: int
    image_dim: int                # D, the width of a cached image row
    image_tokens: int             # T', placeholder tokens per image: model.image_tokens(cache_tokens)
    image_token_id: int
    tokenizer: TokenizerConfig    # how prompts were built; the tokenizer itself is saved beside the weights
    encoder: EncoderSpec          # the features it was trained on (spec + fingerprint of the cache)
    cache_tokens: int             # T, cached rows per image (a cache it reads must have them)

    @classmethod
    def of_run(cls, cfg, manifest: dict, fmt) -> VLMConfig:
        """A training run's (RunConfig, cache manifest, text.TextFormat)."""
        return cls(cfg.model, fmt.vocab_size, manifest["width"], fmt.image_tokens, fmt.image_token_id,
                   cfg.tokenizer, EncoderSpec.of_manifest(manifest), manifest["tokens"])

    @classmethod
    def from_json(cls, d: dict, where: str) -> VLMConfig:
        """model_config.json as saved by save_pretrained; format 1 (before VLMConfig) holds the same facts."""
        try:
            if d.get("format") is None and "image_width" in d:  # format 1
                d = {**d, "format": MODEL_FORMAT, "image_dim": d["image_width"],
                     "encoder": {**d["encoder"], "fingerprint": d["fingerprint_fields"]}}
            if d.get("format") != MODEL_FORMAT:
                raise ValueError(f"{where} has format {d.get('format')!r}, this minivlm reads {MODEL_FORMAT}; "
                                 f"use the minivlm version that wrote it")
            # cache_tokens: absent before model.pool / pixel_shuffle, when T' was T
            vc = cls(ModelConfig(**d["model"]), d["vocab_size"], d["image_dim"], d["image_tokens"],
                     d["image_token_id"], TokenizerConfig(**d["tokenizer"]), EncoderSpec(**d["encoder"]),
                     d.get("cache_tokens", d["image_tokens"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a minivlm model config ({type(e).__name__}: {e})") from None
        if vc.image_tokens != vc.model.image_tokens(vc.cache_tokens):
            raise ValueError(f"{where}: image_tokens={vc.image_tokens}, but cache_tokens={vc.cache_tokens} with "
                             f"model.pool={vc.model.pool} and model.pixel_shuffle={vc.model.pixel_shuffle} make "
                             f"{vc.model.image_tokens(vc.cache_tokens)}; train the run again to rewrite it")
        return vc


MODEL_FORMAT = 2  # model_config.json layout (1: the dict the trainer built by hand before VLMConfig)


class VLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V)
    loss: torch.Tensor | None  # cross-entropy (+ MoE aux loss), None without labels
    aux_loss: torch.Tensor  # MoE balance loss, 0 without MoE or in eval


class VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_dim: int, image_token_id: int, newline: bool = False):
        """`newline`: a learned row closing each row of an image's tile grid (LLaVA-NeXT's `image_newline`; a
        cache tiled with encoder.tiles=anyres)."""
        super().__init__()
        self.cfg, self.image_dim, self.image_token_id = cfg, image_dim, image_token_id
        self.config: VLMConfig | None = None  # set by from_config / from_pretrained
        self.model = Transformer(cfg, vocab_size)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight  # tied
        self.projector = Projector(cfg, image_dim * cfg.pixel_shuffle ** 2)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if newline:  # drawn last, so every other weight starts as in a model without it (LLaVA-NeXT's init)
            self.image_newline = nn.Parameter(torch.randn(cfg.dim) / math.sqrt(cfg.dim))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.model.layers))

    def embed(self, input_ids, images, image_index=None):
        """Token embeddings (B, L, D) with the batch's images projected onto its placeholders. `images` (K, T, D)
        are the batch's K cache rows (an image, or a tile of one) as cached, in the order their placeholders
        appear (row by row, left to right); each becomes T' projected rows (`reduce_rows`), and the n-th
        placeholder of the batch takes projected row n (row n % T' of image n // T'), or, where the tiles are
        laid out otherwise (`image_index`, (positions,) int64: minivlm.training.layout, computed on the host),
        projected row image_index[n], -1 being the learned newline row. So a row holds any number of images, in
        any place, and a packed row holds its samples' images in turn."""
        h = self.model.embed_tokens(input_ids)  # (B, L, D)
        is_img = input_ids == self.image_token_id  # (B, L)
        if images is None:
            if input_ids.device.type == "cpu" and is_img.any():
                r = int(is_img.any(dim=1).nonzero()[0])
                raise ValueError(f"row {r} has {int(is_img[r].sum())} image placeholder tokens but images is None")
            return h
        if images.dim() != 3 or images.size(2) != self.image_dim:
            raise ValueError(f"images must be (K, T, {self.image_dim}), got {tuple(images.shape)}")
        K, T = images.size(0), self.cfg.image_tokens(images.size(1))  # T' placeholders each (shape arithmetic)
        if K == 0 and input_ids.device.type != "cpu":
            return h
        if input_ids.device.type == "cpu":  # a check that reads counts on the host would stall a CUDA step;
            counts = is_img.sum(dim=1)      # the data code builds every batch with K * T placeholders
            want = K * T if image_index is None else len(image_index)
            bad = counts % T != 0
            if image_index is None and bad.any():
                r = int(bad.nonzero()[0])
                raise ValueError(f"row {r} has {int(counts[r])} image placeholder tokens; expected a multiple of "
                                 f"T'={T}")
            if counts.sum() != want:
                raise ValueError(f"the batch has {int(counts.sum())} image placeholder tokens for {K} images of T'={T} "
                                 f"rows" + (f" laid out in {want} positions" if image_index is not None else "")
                                 + f"; expected {want}")
        proj = self.projector(reduce_rows(images.to(h.dtype), self.cfg)).to(h.dtype).flatten(0, 1)  # (K * T', D)
        if image_index is not None:  # the tiles laid out: base, grid rows, newlines (-1: the row appended last)
            proj = torch.cat((proj, self.image_newline[None].to(h.dtype)))[image_index]  # (positions, D)
        slot = (is_img.flatten().cumsum(0) - 1).clamp(min=0).view_as(input_ids)  # (B, L): the placeholder's row
        return torch.where(is_img.unsqueeze(-1), proj[slot], h)  # no boolean indexing: its size would need a sync

    def forward(self, input_ids, images=None, labels=None, kv_cache: KVCache | None = None, start_pos: int = 0,
                positions=None, cu_seqlens=None, image_index=None) -> VLMOutput:
        """input_ids (B, L); images (K, T, image_dim) as cached, for the batch's placeholders in order (`embed`); labels
        (B, L), -100 where not trained. Packed rows: `positions` (B, L), each sample counting 0, 1, 2, ...,
        and `cu_seqlens` = minivlm.training.attention.cu_seqlens_of(positions) from the host (flash-attn's
        sample offsets); without them every row is one sample starting at `start_pos`."""
        L = input_ids.size(1)
        if start_pos + L > self.cfg.max_seq_len:
            raise ValueError(f"sequence end {start_pos + L} exceeds model.max_seq_len={self.cfg.max_seq_len}; raise "
                             f"model.max_seq_len (a new run) or shorten the prompt")
        if kv_cache is not None and kv_cache.seq_len != start_pos:
            raise ValueError(f"start_pos={start_pos} but the KV cache holds {kv_cache.seq_len} positions")
        if positions is not None:
            if kv_cache is not None or start_pos != 0:
                raise ValueError("packed rows (positions) start at 0 and take no KV cache; generate row by row")
            check_packed(input_ids, positions, cu_seqlens)
        h, aux = self.model(self.embed(input_ids, images, image_index), start_pos, kv_cache, positions,
                            cu_seqlens)  # (B, L, D)
        logits = self.lm_head(h)  # (B, L, V)
        loss = None
        if labels is not None:
            targets = next_token_targets(labels, positions)  # (B, L - 1)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE) + aux
        return VLMOutput(logits, loss, aux)

    @classmethod
    def from_config(cls, config: VLMConfig) -> VLM:
        model = cls(config.model, config.vocab_size, config.image_dim, config.image_token_id,
                    newline=config.encoder.tiles == "anyres")
        model.config = config
        return model

    def save_pretrained(self, directory: str | Path, config: VLMConfig) -> None:
        """`model_config.json` then `model.safetensors` (its presence marks a complete save), each atomic."""
        assert (config.model, config.vocab_size, config.image_dim, config.image_token_id) == \
            (self.cfg, self.lm_head.out_features, self.image_dim, self.image_token_id), "config of another model"
        atomic_write_json(Path(directory) / CONFIG, {"format": MODEL_FORMAT, **asdict(config)})
        save_weights(Path(directory) / WEIGHTS, self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VLM:
        """A model saved by save_pretrained, in eval mode on the CPU, with its VLMConfig as `.config`."""
        path = Path(directory) / CONFIG
        if not (Path(directory) / WEIGHTS).is_file():
            raise FileNotFoundError(f"{directory} has no {WEIGHTS}: it is not a finished run "
                                    f"(train it to the end with stages/train.py first)")
        with reading(path, "train the run again to rewrite it"):
            config = VLMConfig.from_json(json.loads(path.read_text()), str(path))
        model = cls.from_config(config)
        load_weights(Path(directory) / WEIGHTS, model)
        return model.eval()


WEIGHTS, CONFIG = "model.safetensors", "model_config.json"


def next_token_targets(labels, positions=None):
    """labels (B, L) -> what logits[:, :-1] predict (B, L - 1): labels[:, 1:], except that in packed rows a
    sample's first token is never a target (its logit position holds the previous sample's last token)."""
    targets = labels[:, 1:]
    return targets if positions is None else targets.masked_fill(positions[:, 1:] == 0, IGNORE)


def freeze(model: VLM, level: int) -> None:
    """train.freeze_llm: 0 all trainable; 1 projector + first and last LM layers; 2 projector only."""
    if level not in (0, 1, 2):
        raise ValueError(f"train.freeze_llm must be 0, 1 or 2, got {level}")
    model.requires_grad_(level == 0)
    model.projector.requires_grad_(True)
    if hasattr(model, "image_newline"):  # the tiles' newline row is part of the image side, as in LLaVA-NeXT
        model.image_newline.requires_grad_(True)
    if level == 1:
        model.model.layers[0].requires_grad_(True)
        model.model.layers[-1].requires_grad_(True)


def param_groups(model: VLM, weight_decay: float) -> list[dict]:
    """AdamW groups over trainable parameters: no decay on norms, biases (ndim < 2) and embeddings."""
    emb = model.model.embed_tokens.weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2 and p is not emb]
    no_decay = [p for p in trainable if p.dim() < 2 or p is emb]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; tied tensors count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
