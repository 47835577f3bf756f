"""Autoregressive generation from a VLM: greedy, or sampling with temperature / top-k / top-p.

Design choices:
- All rows share one prompt length: there is no padding and no attention mask, so a batch of prompts
  must be built to the same length (e.g. one caption prompt per image). Rows that have finished (eos)
  keep being stepped with the rest; their extra tokens are cut off at the end.
- With the KV cache the prompt (with its image rows) is run once, then one token per step. Without it
  the whole sequence is recomputed each step; the two give identical tokens (a test holds us to it).
- The image placeholder token is never generated: a generated placeholder would have no image row.
- Runs under torch.inference_mode; putting the model in eval mode is the caller's job.
- `on_token` sees each step's tokens as they come (the view page streams captions with it); the result is the same.
"""
from __future__ import annotations

import torch

from minivlm.training.model import VLM


def sample_next(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p (never the 1st)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


@torch.inference_mode()
def generate(model: VLM, input_ids, images, max_new_tokens: int, eos_id: int | None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True, image_index=None,
             on_token=None) -> list[list[int]]:
    """input_ids (B, L) long, images (K, T, D) or None (the rows' images in order, `image_index` where their tiles
    are laid out otherwise: VLM.embed) -> new tokens per row, cut after the first eos. `on_token`, if given, is
    called with each step's (B,) new tokens as a list, as they are generated (rows past their eos included)."""
    B, L = input_ids.shape
    if L + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
                         f"{model.cfg.max_seq_len}")
    cache = model.new_cache() if use_cache else None
    seq, new = input_ids, []
    logits = model(input_ids, images, kv_cache=cache, image_index=image_index).logits[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        logits[:, model.image_token_id] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        new.append(nxt)
        if on_token is not None:
            on_token(nxt.tolist())
        if eos_id is not None:
            done |= nxt == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        seq = torch.cat((seq, nxt[:, None]), dim=1)  # (B, L + step + 1)
        if use_cache:
            logits = model(nxt[:, None], None, kv_cache=cache, start_pos=seq.size(1) - 1).logits[:, -1]
        else:
            logits = model(seq, images, image_index=image_index).logits[:, -1]
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(B)]  # (B, n_new)
    if eos_id is not None:
        rows = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows
