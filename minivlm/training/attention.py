"""Attention within packed rows: several samples back to back in one row, none of them seeing another.

Design choices:
- A packed batch is described by `positions` (B, L) int64: a sample starts where the position is 0 and
  counts 0, 1, 2, ...; a row's padding tail is one more sample. The block mask, FlexAttention's document
  mask and the RoPE angles all derive from it on the device, so a step never reads a device value on the
  host. The one exception is flash-attn's `cu_seqlens`, a tensor as long as the batch has samples: a
  length only the host knows for free, so the data code computes it from its own copy of `positions`
  (`cu_seqlens_of`) and ships it with the batch; on the CPU the model checks the two agree.
- Backends (`attention_backend`, printed by the trainer at start): on CUDA, flash-attn's varlen kernel
  where the package is installed and the compute dtype is fp16/bf16 (its only dtypes); else FlexAttention
  with a document mask, unless attention dropout is on (FlexAttention has none); else SDPA with the
  (B, 1, L, L) block-diagonal causal mask. Off CUDA, `gather`: each layer gathers the samples' q, k and v
  into rows of their own, right-padded, for SDPA's causal kernel, one call per length class (samples of
  2^(c-1) <= length < 2^c padded to their class's longest), and reads the outputs back: attention costs
  less than padded rows cost, and every other layer runs on the packed tokens. The mask (SDPA's masked
  path: every score of every row computed and stored) measured slower than plain padding on CPU (P7 0.91
  on the SFT-like set), one SDPA call a sample pays the call's overhead per sample (0.35 on the demo's
  short captions), and one class for all pays the longest sample's length² for each (0.68). FlexAttention has no CPU backward (pytorch#148752); its CPU forward
  checks the CUDA path in the tests.
- flash-attn gets max_seqlen = L, the row length: an upper bound is all its launch grid needs (blocks past
  a sample's end return at once), and a static one needs neither the host nor a recompile under
  torch.compile.
- FlexAttention runs through torch.compile (eager flex materialises every score, and skips no block).
- The varlen layout flattens the batch to (B * L, heads, hd) rows, so cu_seqlens counts over all B rows:
  each row starts a sample, which is why a row must begin at position 0.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

try:  # optional (`pip install flash-attn`): CUDA, fp16/bf16
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

HAS_TRITON = importlib.util.find_spec("triton") is not None  # FlexAttention's CUDA kernels are Triton's


class Backend(NamedTuple):
    name: str    # "flash_attn", "flex", "sdpa" (the block mask) or "gather"
    reason: str  # one phrase, for the trainer's start line

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def attention_backend(device: str | torch.device, dtype: torch.dtype, dropout: float) -> Backend:
    """Which kernel keeps packed samples apart on `device`, with attention computed in `dtype` (the autocast
    dtype under autocast) and the model's attention `dropout`."""
    kind = torch.device(device).type
    if kind != "cuda":
        return Backend("gather", f"causal SDPA over the samples gathered into rows of their own on {kind}")
    if flash_attn_varlen_func is not None and dtype in (torch.float16, torch.bfloat16):
        return Backend("flash_attn", "flash-attn's varlen kernel")
    why = "flash-attn is not installed" if flash_attn_varlen_func is None else f"flash-attn cannot compute in {dtype}"
    if dropout > 0:
        return Backend("sdpa", f"SDPA with a block-diagonal mask: {why} and FlexAttention has no attention dropout")
    if not HAS_TRITON:
        return Backend("sdpa", f"SDPA with a block-diagonal mask: {why} and FlexAttention needs Triton")
    return Backend("flex", f"FlexAttention with a document mask; {why}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in for activations `x`: autocast's where it is on, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def cu_seqlens_of(positions) -> torch.Tensor:
    """(N + 1,) int32 start offsets of the N samples (padding tails included) of a packed batch flattened to
    B * L tokens, then B * L: flash-attn's `cu_seqlens`. For the data code, on the host copy of positions (B, L)."""
    flat = torch.as_tensor(positions).flatten()
    starts = (flat == 0).nonzero().flatten()  # (N,)
    return torch.cat((starts, starts.new_tensor([flat.numel()]))).to(torch.int32)


def check_packed(input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    """Shapes everywhere; values on the CPU only (reading them would stall a CUDA step): every row starts a
    sample, each sample counts 0, 1, 2, ..., and cu_seqlens is the one those positions give."""
    if positions.shape != input_ids.shape:
        raise ValueError(f"positions {tuple(positions.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}")
    if cu_seqlens is None:
        raise ValueError("positions come with cu_seqlens: pass minivlm.training.attention.cu_seqlens_of(positions), "
                         "computed on the batch's host positions")
    if input_ids.device.type != "cpu":
        return
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    bad = positions[:, 0] != 0
    if bad.any():
        r = int(bad.nonzero()[0])
        raise ValueError(f"positions row {r} starts at {int(positions[r, 0])}; each packed row starts a sample at 0")
    bad = (positions[:, 1:] != 0) & (positions[:, 1:] != positions[:, :-1] + 1)
    if bad.any():
        r, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"positions row {r} goes {int(positions[r, j])} -> {int(positions[r, j + 1])}; "
                         f"a sample counts 0, 1, 2, ... and the next one starts at 0")
    if cu_seqlens.dtype != torch.int32 or not torch.equal(cu_seqlens, cu_seqlens_of(positions)):
        raise ValueError("cu_seqlens does not match positions; build it with "
                         "minivlm.training.attention.cu_seqlens_of(positions) on the batch's host positions")


class PackedRows(NamedTuple):
    """What attention needs to keep a packed batch's samples apart; built once per forward for every layer."""
    backend: str
    dtype: torch.dtype                     # q, k and v meet in it, as SDPA's autocast casts them
    mask: torch.Tensor | BlockMask | None  # sdpa: (B, 1, L, L) bool; flex: BlockMask; else None
    cu_seqlens: torch.Tensor               # (N + 1,) int32, read by flash_attn
    slots: tuple[torch.Tensor, ...] = ()   # gather: per length class (n, w), the packed token of each slot
    back: torch.Tensor | None = None       # gather: (B * L,) the slot each packed token reads its output from


def packed_rows(positions: torch.Tensor, cu_seqlens: torch.Tensor, backend: str, dtype: torch.dtype) -> PackedRows:
    """positions (B, L) -> the chosen backend's mask: a query sees the keys of its own sample up to itself."""
    B, L = positions.shape
    if backend == "flash_attn":
        return PackedRows(backend, dtype, None, cu_seqlens)
    if backend == "gather":
        return PackedRows(backend, dtype, None, cu_seqlens, *length_classes(cu_seqlens.cpu(), positions.device))
    sample = (positions == 0).cumsum(dim=1)  # (B, L): the token's sample, counted within its row
    if backend == "flex":
        def same_sample_causal(b, h, q, kv):
            return (sample[b, q] == sample[b, kv]) & (kv <= q)
        return PackedRows(backend, dtype,
                          create_block_mask(same_sample_causal, B, None, L, L, device=positions.device), cu_seqlens)
    causal = torch.ones(L, L, dtype=torch.bool, device=positions.device).tril()  # (L, L)
    return PackedRows(backend, dtype, ((sample[:, :, None] == sample[:, None, :]) & causal).unsqueeze(1), cu_seqlens)


def length_classes(cu_seqlens: torch.Tensor, device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """`gather`'s index maps for samples at host offsets cu_seqlens: per length class the (n, w) packed tokens
    its samples' slots read (slots past a sample's end read later tokens, causal keys no real query of the
    sample sees), and for each packed token its slot in the classes' outputs laid end to end."""
    starts, lens = cu_seqlens[:-1].long(), cu_seqlens.diff().long()  # (N,) each
    total, classes = int(cu_seqlens[-1]), torch.frexp(lens.double())[1]  # 2^(c-1) <= length < 2^c
    slots, back, offset = [], torch.empty(total, dtype=torch.long), 0
    for c in classes.unique().tolist():
        members = (classes == c).nonzero().flatten()
        width = int(lens[members].max())
        cols = torch.arange(width)
        these = (starts[members, None] + cols).clamp(max=total - 1)  # (n, w)
        real = cols < lens[members, None]  # (n, w)
        back[these[real]] = offset + torch.arange(these.numel()).view_as(these)[real]
        slots.append(these.to(device))
        offset += these.numel()
    return tuple(slots), back.to(device)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once, on first use (not at import: compiling starts Dynamo). Inside a compiled
    model Dynamo traces flex_attention itself instead."""
    return torch.compile(flex_attention)


def packed_attention(q, k, v, rows: PackedRows, dropout_p: float) -> torch.Tensor:
    """q (B, H, L, hd), k and v (B, Hkv, L, hd), after RoPE -> (B, L, H * hd): causal attention within each
    sample of each row. Query head h reads KV head h // (H / Hkv) in every backend. Under autocast q and k
    can reach here in fp32 (qk_norm's fp32 weight) and v in bf16: every backend gets them in the compute
    dtype, as SDPA's autocast rule casts them (flash-attn takes nothing else)."""
    B, H, L, hd = q.shape
    q, k, v = q.to(rows.dtype), k.to(rows.dtype), v.to(rows.dtype)
    if rows.backend == "gather":
        q, k, v = (t.transpose(1, 2).reshape(B * L, t.size(1), hd) for t in (q, k, v))  # (B * L, heads, hd)
        out = []
        for slots in rows.slots:  # one length class: (n, w)
            cq, ck, cv = (t.index_select(0, slots.flatten()).view(*slots.shape, t.size(1), hd).transpose(1, 2)
                          for t in (q, k, v))  # (n, heads, w, hd)
            rep = H // ck.size(1)
            ck, cv = ck.repeat_interleave(rep, dim=1), cv.repeat_interleave(rep, dim=1)  # (n, H, w, hd)
            y = F.scaled_dot_product_attention(cq, ck, cv, dropout_p=dropout_p, is_causal=True)  # (n, H, w, hd)
            out.append(y.transpose(1, 2).reshape(-1, H * hd))
        return torch.cat(out).index_select(0, rows.back).view(B, L, H * hd)
    if rows.backend == "flash_attn":
        q, k, v = (t.transpose(1, 2).reshape(B * L, t.size(1), hd) for t in (q, k, v))  # (B * L, heads, hd)
        y = flash_attn_varlen_func(q, k, v, rows.cu_seqlens, rows.cu_seqlens, L, L, dropout_p=dropout_p,
                                   causal=True)  # (B * L, H, hd)
        return y.view(B, L, H * hd)
    if rows.backend == "flex":
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        y = flex(q, k, v, block_mask=rows.mask, enable_gqa=True)  # (B, H, L, hd)
    else:
        rep = H // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=rows.mask, dropout_p=dropout_p)  # (B, H, L, hd)
    return y.transpose(1, 2).reshape(B, L, H * hd)
