"""Text side of a sample: tokenizer loading, prompt format, image placeholders and loss masks.

Design choices:
- The prompt follows the tokenizer's own chat template (MiniMind v1 `<s>user…`, v3 ChatML with an
  empty `<think>` block, the demo's ChatML); tokenizers without one get LLaVA-pretrain `plain`:
  image, caption, eos.
- The conversation is rendered turn by turn; each assistant answer is the difference between the
  template with and without it, so loss lands on the answer (and its end-of-turn token) only,
  whatever the template's markup.
- Each image is T' copies of one placeholder special token, where its `<image>` tag stands in the turns
  (`minivlm.formats.records`: untagged images open the first user turn). A tokenizer without the token
  (MiniMind v1) gets it added; the model's vocabulary is `len(tokenizer)`, so embeddings grow to match.
- Truncation cuts the tail after the last image and the first answer token, never into an image or the
  prompt; a sample whose images and prompt do not fit `tokenizer.max_len` is left out (`tokenize` says which,
  the caller counts them and names the first), never cut silently and never a stop at record 500,000.
- Training tokenizes every sample once, up front (`tokenize`), into flat arrays that hold each image as
  ONE placeholder; `collate` lays batches out and expands the placeholders to T' in a few vectorized NumPy
  ops. Rendering the template and tokenizing cost 0.15-0.25 ms a sample, 5-10x reading its cache row: done
  per batch they took the CPU the training step needed. Unexpanded, 558K LLaVA samples take ~5 bytes a text
  token (~125 MB) instead of ~5 bytes for each of the 196 placeholders too.
- A batch is padded (each sample a row, padded to the longest) or packed (`pack`: several samples a row,
  `positions` restarting at 0 for each, so the model keeps them apart): the same expansion serves both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from minivlm.config import TokenizerConfig
from minivlm.fileio import BUGS
from minivlm.formats.records import IMAGE_TAG, Record, user_text, with_tags
from minivlm.training.layout import Placement, place

IGNORE = -100


def load_tokenizer(cfg: TokenizerConfig, markers: list[str] = ()):
    """AutoTokenizer by hub id or directory, with the image placeholder guaranteed to be one special token, and
    each of a tiling's `markers` (minivlm.training.layout.markers) one too."""
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
    missing = [t for t in [cfg.image_token, *markers] if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:  # appended in this order, after every token the tokenizer had (the LM's rows stay its rows)
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tok(cfg.image_token, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError(f"tokenizer.image_token={cfg.image_token!r} does not encode to one token")
    return tok


@dataclass(frozen=True)
class TextFormat:
    tokenizer: object
    image_token: str
    image_token_id: int
    image_tokens: int          # T': placeholders per image (model.image_tokens of the cache's T rows)
    chat: bool                 # chat template (else plain)
    eos_id: int
    pad_id: int
    max_len: int
    prompt: str
    tiling: str = "none"       # the cache's encoder.tiles: how an image's tiles are laid out (minivlm.training.layout)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def text_format(tok, cfg: TokenizerConfig, image_tokens: int, tiling: str = "none") -> TextFormat:
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
                      eos, pad, cfg.max_len, cfg.prompt, tiling)


def placements(fmt: TextFormat, layouts) -> list[Placement]:
    """Each image's placement (minivlm.training.layout) from its layout (tile count, grid rows, grid cols, height,
    width: the cache's `image_tiles`); an untiled image is one run of T' whatever its layout."""
    return [place(fmt.tiling, tuple(int(x) for x in lay), fmt.image_tokens, fmt.image_token) for lay in layouts]


def _messages(fmt: TextFormat, turns, tags: list[str]) -> list[dict]:
    """Chat messages: the k-th <image> tag as tags[k] (its placement's text), tokenizer.prompt where a user turn
    asks nothing."""
    msgs, tags = [], iter(tags)
    for role, text in turns:
        if role == "user" and not user_text(text):  # a bare caption's (or an untagged image's) empty question
            text += fmt.prompt
        parts = text.split(IMAGE_TAG)
        msgs.append({"role": role, "content": "".join(p + next(tags) for p in parts[:-1]) + parts[-1]})
    return msgs


def _render(fmt: TextFormat, msgs: list[dict], generation_prompt: bool) -> str:
    return fmt.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _segments(fmt: TextFormat, record: Record, tags: list[str], prompts: dict) -> list[tuple[str, bool]]:
    """The sample as (text, is_answer) pieces, its images' tags as `tags`. `prompts` memoizes renders up to an
    answer: pretraining sets reuse a handful of prompts, so this halves the template renders."""
    if not fmt.chat:  # plain: the images, then every assistant answer (eos follows)
        answer = "\n".join(t for r, t in record.turns if r == "assistant")
        return [("".join(tags), False), (answer, True)]
    msgs, segments, done = _messages(fmt, record.turns, tags), [], ""
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
    (not an answer) that every padding position of a batch reads: sample i is [start[i]:end[i]], each run of
    image positions ONE placeholder token (an image, or a tile of a `split` image), expanding to `runs`."""
    ids: np.ndarray        # (N,) int32
    answer: np.ndarray     # (N,) bool: the loss is on this token
    start: np.ndarray      # (n,) int64
    end: np.ndarray        # (n,) int64: the sample's trailing pad token
    placeholders: np.ndarray  # (n,) int64: the sample's placeholder tokens
    runs: np.ndarray       # (P,) int64: the positions each placeholder token becomes, sample after sample
    length: np.ndarray     # (n,) int64: the sample's length in a batch (placeholders expanded, no pad)

    def __len__(self) -> int:
        return len(self.placeholders)

    def runs_of(self, ix: np.ndarray) -> np.ndarray:
        """The runs of samples `ix`' placeholder tokens, sample after sample, each sample's in order."""
        first = np.cumsum(self.placeholders) - self.placeholders
        n = self.placeholders[ix]
        return self.runs[np.arange(n.sum()) + np.repeat(first[ix] - (np.cumsum(n) - n), n)]


def _fit(fmt: TextFormat, ids: list[int], answer: list[bool], runs: list[int]) -> int | None:
    """How many of a sample's (unexpanded) tokens stay so that, expanded, it fits max_len: the tail is cut after
    its last image and its first answer token; None if even those do not fit."""
    at = [j for j, t in enumerate(ids) if t == fmt.image_token_id]
    extra = np.cumsum([0] + [r - 1 for r in runs])                # positions the placeholders before each add
    first = answer.index(True) if True in answer else len(ids)
    need = max(first + 1 + int(extra[sum(j < first for j in at)]), at[-1] + 1 + int(extra[-1]) if at else 0)
    return None if need > fmt.max_len else fmt.max_len - int(extra[-1])


def tokenize(fmt: TextFormat, records: list[Record], layouts: list | None = None,
             progress: bool = False) -> tuple[Tokens, np.ndarray]:
    """Every record's ids and answer mask, and which records fit tokenizer.max_len ((n,) bool): only those are
    in the Tokens, in order. `layouts`: per record, its images' layouts (the cache's `image_tiles`), for a tiled
    cache; None: untiled images."""
    ids, answer, lengths, counts, runs, prompts = [], [], [], [], [], {}
    fits = np.ones(len(records), bool)
    untiled = (1, 1, 1, 0, 0)
    chunk = 4096  # records per batched tokenizer call (the fast tokenizer encodes a list in one go)
    with tqdm(total=len(records), desc="tokenize", unit="sample", disable=not progress or None,
              mininterval=1.0) as bar:
        for lo in range(0, len(records), chunk):
            placed = [placements(fmt, layouts[i] if layouts is not None else [untiled] * len(records[i].images))
                      for i in range(lo, min(lo + chunk, len(records)))]
            pieces = [_segments(fmt, r, [p.text for p in ps], prompts) for r, ps in zip(records[lo:lo + chunk], placed)]
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
                sample_runs = [r for p in placed[k] for r in p.runs]
                if sid.count(fmt.image_token_id) != len(sample_runs):
                    raise ValueError(f"{records[i].where}: {sid.count(fmt.image_token_id)} image token(s) "
                                     f"{fmt.image_token!r} for {len(records[i].images)} image(s): the text holds the "
                                     f"token itself; remove it from the record, or set tokenizer.image_token to a "
                                     f"token the text lacks")
                keep = _fit(fmt, sid, sans, sample_runs)
                if keep is None:
                    fits[i] = False
                    continue
                chunk_ids += sid[:keep] + [fmt.pad_id]
                chunk_answer += sans[:keep] + [False]
                lengths.append(min(len(sid), keep) + 1)
                counts.append(len(sample_runs))
                runs += sample_runs
            ids.append(np.asarray(chunk_ids, np.int32))
            answer.append(np.asarray(chunk_answer, bool))
            bar.update(len(pieces))
    end = np.cumsum(np.asarray(lengths, np.int64)) - 1
    start = end - np.asarray(lengths, np.int64) + 1
    counts, runs = np.asarray(counts, np.int64), np.asarray(runs, np.int64)
    extra = np.zeros(len(counts), np.int64)                       # positions each sample's placeholders add
    np.add.at(extra, np.repeat(np.arange(len(counts)), counts), runs - 1)
    length = end - start + extra
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return Tokens(cat(ids, np.int32), cat(answer, bool), start, end, counts, runs, length), fits


TOKENS_FORMAT = 3  # bump when what tokenize returns for the same input changes (3: tiles laid out)


def format_key(fmt: TextFormat) -> str:
    """A hash of everything `tokenize` output depends on besides the records: tokenizer, template, format."""
    import tokenizers
    import transformers

    tok, h = fmt.tokenizer, hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)  # vocab, merges, normalizer, added tokens
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(repr((TOKENS_FORMAT, transformers.__version__, tokenizers.__version__, tok.chat_template,
                   fmt.image_token, fmt.image_token_id, fmt.image_tokens, fmt.tiling, fmt.chat, fmt.eos_id, fmt.pad_id,
                   fmt.max_len, fmt.prompt)).encode())
    return h.hexdigest()[:32]


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Positions into `lengths` grouped into rows of at most `capacity` tokens (first fit, longest first): a
    deterministic layout of a micro-batch's samples. A sample longer than capacity gets a row of its own."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([i])
            room.append(capacity - int(lengths[i]))
        else:
            rows[r].append(i)
            room[r] -= int(lengths[i])
    return rows


def collate(fmt: TextFormat, tokens: Tokens, ix: np.ndarray, rows: list[int], batches: list[int],
            packed: bool = False) -> list[tuple[np.ndarray, ...]]:
    """Samples `ix`, laid out in order as consecutive rows of `rows` samples each, as consecutive batches of
    `batches` rows each. Per batch: input_ids (R, L) int64, right-padded with pad_id to its longest row, labels
    (R, L) (IGNORE off the answers), each placeholder expanded to T' copies; with `packed`, also positions (R, L)
    int64: each sample's own positions from 0 (the row's padding one more such run). Every batch in a few
    whole-group ops: this runs for every sample of every epoch, and NumPy's per-call cost is paid once per group."""
    rows, batches = np.asarray(rows, np.int64), np.asarray(batches, np.int64)
    length, start = tokens.length[ix], tokens.start[ix]
    row_end = np.cumsum(rows)                                                # (R,) one past each row's last sample
    row_len = np.add.reduceat(length, row_end - rows)                        # (R,)
    longest = np.maximum.reduceat(row_len, np.cumsum(batches) - batches)     # (batches,) each batch's L
    seg = tokens.end[ix] - start + 1                                         # (N,) tokens + the trailing pad
    first = np.cumsum(seg) - seg                                             # (N,) where each sample's run starts
    src = np.arange(first[-1] + seg[-1]) + np.repeat(start - first, seg)     # (U,) flat index of every token
    count = np.ones(len(src), np.int64)                                      # (U,) positions each fills
    count[tokens.ids[src] == fmt.image_token_id] = tokens.runs_of(ix)        # a placeholder: its run
    pad = np.zeros(len(ix), np.int64)
    pad[row_end - 1] = np.repeat(longest, batches) - row_len                 # the row's last pad: up to its L
    count[first + seg - 1] = pad                                             # other samples' pads: none
    src = np.repeat(src, count)                                              # (sum of R*L,) batch after batch
    ids = tokens.ids[src].astype(np.int64)
    labels = np.where(tokens.answer[src], ids, IGNORE)
    if packed:  # runs: each sample, then each row's padding; a position counts from its run's start
        runs = np.stack([length, pad], 1).ravel()                            # (2N,)
        positions = np.arange(len(src)) - np.repeat(np.cumsum(runs) - runs, runs)
    out, a = [], 0
    for R, L in zip(batches.tolist(), longest.tolist()):
        part = (ids[a:a + R * L].reshape(R, L), labels[a:a + R * L].reshape(R, L))
        out.append(part + (positions[a:a + R * L].reshape(R, L),) if packed else part)
        a += R * L
    return out


def encode_sample(fmt: TextFormat, record: Record, layouts=None) -> tuple[list[int], list[int]]:
    """One record's ids and labels, exactly as a training batch holds them (without padding); `layouts`: its
    images' (tiled caches)."""
    tokens, fits = tokenize(fmt, [record], None if layouts is None else [layouts])
    if not fits[0]:
        raise ValueError(f"{record.where}: its images and prompt do not fit tokenizer.max_len={fmt.max_len}")
    (ids, labels), = collate(fmt, tokens, np.zeros(1, np.int64), [1], [1])
    return ids[0].tolist(), labels[0].tolist()


def prompt_ids(fmt: TextFormat, prompt: str = "", images: int = 1, layouts=None) -> list[int]:
    """The generation prompt for captioning, the same format training used, up to the answer: a user turn
    `prompt` (tokenizer.prompt if empty) with its `images`, at its <image> tags, or opening it if it has none;
    `layouts`: the images' (tiled encoders), each placed as training placed it."""
    placed = placements(fmt, layouts if layouts is not None else [(1, 1, 1, 0, 0)] * images)
    turns = with_tags((("user", prompt),), len(placed), "the prompt")
    tags = [p.text for p in placed]
    text = _render(fmt, _messages(fmt, turns, tags), True) if fmt.chat else "".join(tags)
    runs, out = iter(r for p in placed for r in p.runs), []
    for t in fmt.tokenizer(text, add_special_tokens=False)["input_ids"]:
        out += [t] * next(runs) if t == fmt.image_token_id else [t]
    return out


def decode(fmt: TextFormat, ids: list[int]) -> str:
    return fmt.tokenizer.decode([i for i in ids if i != fmt.eos_id], skip_special_tokens=True).strip()
