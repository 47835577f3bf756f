"""Text side of a sample: tokenizer loading, prompt format, image placeholders and loss masks.

Design choices:
- The prompt follows the tokenizer's own chat template (MiniMind v1 `<s>user…`, v3 ChatML with an
  empty `<think>` block, the demo's ChatML); tokenizers without one get LLaVA-pretrain `plain`:
  image, caption, eos.
- The conversation is rendered turn by turn; each assistant answer is the difference between the
  template with and without it, so loss lands on the answer (and its end-of-turn token) only,
  whatever the template's markup.
- The image is T' copies of one placeholder special token. A tokenizer without it (MiniMind v1) gets it
  added; the model's vocabulary is `len(tokenizer)`, so embeddings grow to match.
- Truncation cuts the answer's tail, never the image placeholders or the prompt.
- Training tokenizes every sample once, up front (`tokenize`), into flat arrays that hold the image as
  ONE placeholder; `collate` pads a batch and expands it to T' in a few vectorized NumPy ops. Rendering
  the template and tokenizing cost 0.15-0.25 ms a sample, 5-10x reading its cache row: done per batch
  they took the CPU the training step needed. Unexpanded, 558K LLaVA samples take ~5 bytes a text
  token (~125 MB) instead of ~5 bytes for each of the 196 placeholders too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from minivlm.config import TokenizerConfig
from minivlm.fileio import BUGS
from minivlm.formats.records import Record

IGNORE = -100


def load_tokenizer(cfg: TokenizerConfig):
    """AutoTokenizer by hub id or directory, with the image placeholder guaranteed to be one special token."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
    except Exception as e:  # the tokenizers library raises a bare Exception on a corrupt tokenizer.json
        if isinstance(e, BUGS):
            raise
        raise FileNotFoundError(f"tokenizer.name_or_path={cfg.name_or_path!r}: cannot load a tokenizer "
                                f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if tok.convert_tokens_to_ids(cfg.image_token) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if len(tok(cfg.image_token, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError(f"tokenizer.image_token={cfg.image_token!r} does not encode to one token")
    return tok


@dataclass(frozen=True)
class TextFormat:
    tokenizer: object
    image_token: str
    image_token_id: int
    image_tokens: int          # T': placeholders per image (the cache's rows per image)
    chat: bool                 # chat template (else plain)
    eos_id: int
    pad_id: int
    max_len: int
    prompt: str

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def text_format(tok, cfg: TokenizerConfig, image_tokens: int) -> TextFormat:
    has_template = bool(getattr(tok, "chat_template", None))
    if cfg.template == "chat" and not has_template:
        raise ValueError(f"tokenizer.template=chat but {cfg.name_or_path} has no chat template; use auto or plain")
    chat = cfg.template == "chat" or (cfg.template == "auto" and has_template)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {cfg.name_or_path} has no eos token; generation could never stop")
    if cfg.max_len <= image_tokens + 8:
        raise ValueError(f"tokenizer.max_len={cfg.max_len} leaves no room for text after {image_tokens} image tokens")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos  # pad positions are masked anyway
    return TextFormat(tok, cfg.image_token, tok.convert_tokens_to_ids(cfg.image_token), image_tokens, chat,
                      eos, pad, cfg.max_len, cfg.prompt)


def _expand(fmt: TextFormat, ids: list[int]) -> list[int]:
    """Each image placeholder as T' copies (tokenizing one is cheaper than 196)."""
    out = []
    for t in ids:
        out += [t] * fmt.image_tokens if t == fmt.image_token_id else [t]
    return out


def _user_text(fmt: TextFormat, text: str, with_image: bool) -> str:
    text = text or fmt.prompt
    return fmt.image_token + "\n" + text if with_image else text


def _messages(fmt: TextFormat, turns, with_image: bool) -> list[dict]:
    msgs, placed = [], not with_image
    for role, text in turns:
        if role == "user" and not placed:  # the image goes into the first user turn
            text, placed = _user_text(fmt, text, True), True
        msgs.append({"role": role, "content": text})
    if not placed:  # no user turn at all: open with one carrying the image
        msgs.insert(0, {"role": "user", "content": _user_text(fmt, "", True)})
    return msgs


def _render(fmt: TextFormat, msgs: list[dict], generation_prompt: bool) -> str:
    return fmt.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _segments(fmt: TextFormat, record: Record, with_image: bool, prompts: dict) -> list[tuple[str, bool]]:
    """The sample as (text, is_answer) pieces. `prompts` memoizes renders up to an answer: pretraining
    sets reuse a handful of prompts, so this halves the template renders."""
    if not fmt.chat:  # plain: image, then every assistant answer (eos follows)
        answer = "\n".join(t for r, t in record.turns if r == "assistant")
        return [(fmt.image_token if with_image else "", False), (answer, True)]
    msgs, segments, done = _messages(fmt, record.turns, with_image), [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        key = tuple((m["role"], m["content"]) for m in msgs[:i])
        prefix = prompts.get(key) or prompts.setdefault(key, _render(fmt, msgs[:i], True))
        full = _render(fmt, msgs[:i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(f"{record.where}: the chat template does not render turns incrementally; "
                             f"set tokenizer.template=plain")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


@dataclass(frozen=True)
class Tokens:
    """Samples tokenized once, flat, each cut to fit max_len once expanded and followed by one pad token
    (not an answer) that every padding position of a batch reads: sample i is [start[i]:end[i]], its
    image ONE placeholder."""
    ids: np.ndarray        # (N,) int32
    answer: np.ndarray     # (N,) bool: the loss is on this token
    start: np.ndarray      # (n,) int64
    end: np.ndarray        # (n,) int64: the sample's trailing pad token
    image_at: np.ndarray   # (n,) int64: the placeholder's index within its sample, -1 if text-only
    length: np.ndarray     # (n,) int64: the sample's length in a batch (placeholder expanded)

    def __len__(self) -> int:
        return len(self.image_at)


def tokenize(fmt: TextFormat, records: list[Record], with_image: list[bool], progress: bool = False) -> Tokens:
    """Every record's ids and answer mask; a prompt that leaves no room for the answer is an error."""
    ids, answer, lengths, image_at, prompts = [], [], [], np.full(len(records), -1, np.int64), {}
    chunk = 4096  # records per batched tokenizer call (the fast tokenizer encodes a list in one go)
    with tqdm(total=len(records), desc="tokenize", unit="sample", disable=not progress or None,
              mininterval=1.0) as bar:
        for lo in range(0, len(records), chunk):
            pieces = [_segments(fmt, r, w, prompts) for r, w in zip(records[lo:lo + chunk], with_image[lo:lo + chunk])]
            texts = [t for segs in pieces for t, _ in segs if t]
            encoded = iter(fmt.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
            chunk_ids, chunk_answer = [], []  # one array per chunk, not per sample (~100 B an array)
            for k, segs in enumerate(pieces):
                i, sid, sans = lo + k, [], []
                for text, is_answer in segs:
                    part = next(encoded) if text else []
                    sid += part
                    sans += [is_answer] * len(part)
                if not fmt.chat:
                    sid.append(fmt.eos_id)
                    sans.append(True)
                if fmt.image_token_id in sid:
                    image_at[i] = sid.index(fmt.image_token_id)
                first = sans.index(True) if True in sans else len(sid)
                if first + (fmt.image_tokens - 1 if 0 <= image_at[i] < first else 0) >= fmt.max_len:
                    raise ValueError(f"{records[i].where}: prompt longer than tokenizer.max_len={fmt.max_len}; "
                                     f"raise tokenizer.max_len")
                keep = fmt.max_len - (fmt.image_tokens - 1 if image_at[i] >= 0 else 0)  # the answer's tail goes
                chunk_ids += sid[:keep] + [fmt.pad_id]
                chunk_answer += sans[:keep] + [False]
                lengths.append(min(len(sid), keep) + 1)
            ids.append(np.asarray(chunk_ids, np.int32))
            answer.append(np.asarray(chunk_answer, bool))
            bar.update(len(pieces))
    end = np.cumsum(np.asarray(lengths, np.int64)) - 1
    start = end - np.asarray(lengths, np.int64) + 1
    length = end - start + np.where(image_at >= 0, fmt.image_tokens - 1, 0)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return Tokens(cat(ids, np.int32), cat(answer, bool), start, end, image_at, length)


TOKENS_FORMAT = 1  # bump when what tokenize returns for the same input changes


def format_key(fmt: TextFormat) -> str:
    """A hash of everything `tokenize` output depends on besides the records: tokenizer, template, format."""
    import tokenizers
    import transformers

    tok, h = fmt.tokenizer, hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)  # vocab, merges, normalizer, added tokens
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(repr((TOKENS_FORMAT, transformers.__version__, tokenizers.__version__, tok.chat_template,
                   fmt.image_token, fmt.image_token_id, fmt.image_tokens, fmt.chat, fmt.eos_id, fmt.pad_id,
                   fmt.max_len, fmt.prompt)).encode())
    return h.hexdigest()[:32]


def collate(fmt: TextFormat, tokens: Tokens, ix: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The samples `ix` as consecutive batches of `sizes` samples. Per batch: input_ids (B, L) int64,
    right-padded with pad_id to its longest sample, and labels (B, L), IGNORE off the answers; the image
    expanded to T' placeholders. Every batch in a few whole-group ops: this runs for every sample of
    every epoch, and NumPy's per-call cost is paid once per group."""
    length, start, at = tokens.length[ix], tokens.start[ix], tokens.image_at[ix]
    longest = np.maximum.reduceat(length, np.cumsum(sizes) - sizes)         # (batches,) each batch's L
    seg = tokens.end[ix] - start + 1                                        # (N,) tokens + the trailing pad
    first = np.cumsum(seg) - seg                                            # (N,) where each sample's run starts
    src = np.arange(first[-1] + seg[-1]) + np.repeat(start - first, seg)    # (U,) flat index of every token
    count = np.ones(len(src), np.int64)                                     # (U,) positions it fills in its row
    count[(first + at)[at >= 0]] = fmt.image_tokens                         # the placeholder: T' of them
    count[first + seg - 1] = np.repeat(longest, sizes) - length             # the pad token: up to the batch's L
    src = np.repeat(src, count)                                             # (sum of B*L,) batch after batch
    ids = tokens.ids[src].astype(np.int64)
    labels = np.where(tokens.answer[src], ids, IGNORE)
    out, a = [], 0
    for n, L in zip(sizes, longest.tolist()):
        out.append((ids[a:a + n * L].reshape(n, L), labels[a:a + n * L].reshape(n, L)))
        a += n * L
    return out


def encode_sample(fmt: TextFormat, record: Record, with_image: bool) -> tuple[list[int], list[int]]:
    """One record's ids and labels, exactly as a training batch holds them (without padding)."""
    (ids, labels), = collate(fmt, tokenize(fmt, [record], [with_image]), np.zeros(1, np.int64), [1])
    return ids[0].tolist(), labels[0].tolist()


def prompt_ids(fmt: TextFormat, prompt: str = "", with_image: bool = True) -> list[int]:
    """The generation prompt for captioning: the same format training used, up to the answer."""
    if not fmt.chat:
        return [fmt.image_token_id] * fmt.image_tokens if with_image else []
    text = _render(fmt, [{"role": "user", "content": _user_text(fmt, prompt, with_image)}], True)
    return _expand(fmt, fmt.tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(fmt: TextFormat, ids: list[int]) -> str:
    return fmt.tokenizer.decode([i for i in ids if i != fmt.eos_id], skip_special_tokens=True).strip()
