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
"""
from __future__ import annotations

from dataclasses import dataclass

from minivlm.config import TokenizerConfig
from minivlm.records import Record

IGNORE = -100


def load_tokenizer(cfg: TokenizerConfig):
    """AutoTokenizer by hub id or directory, with the image placeholder guaranteed to be one special token."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer.name_or_path={cfg.name_or_path!r}: cannot load a tokenizer "
                                f"({str(e).splitlines()[0]})") from None
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


def _ids(fmt: TextFormat, text: str) -> list[int]:
    """Token ids, with each image placeholder expanded to T' copies (tokenizing one is cheaper than 196)."""
    ids = fmt.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if fmt.image_token_id not in ids:
        return ids
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


def encode_sample(fmt: TextFormat, record: Record, with_image: bool) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (IGNORE outside answers) for one record; None if the prompt alone overflows."""
    segments: list[tuple[str, bool]] = []  # (text, is_answer)
    if fmt.chat:
        msgs = _messages(fmt, record.turns, with_image)
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = _render(fmt, msgs[:i], True)
            full = _render(fmt, msgs[:i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(f"{record.where}: the chat template does not render turns incrementally; "
                                 f"set tokenizer.template=plain")
            segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
    else:  # plain: image, then every assistant answer followed by eos
        answer = "\n".join(t for r, t in record.turns if r == "assistant")
        segments = [(fmt.image_token if with_image else "", False), (answer, True)]
    ids, labels = [], []
    for text, is_answer in segments:
        part = _ids(fmt, text)
        ids += part
        labels += part if is_answer else [IGNORE] * len(part)
    if not fmt.chat:
        ids.append(fmt.eos_id)
        labels.append(fmt.eos_id)
    first_answer = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
    if first_answer >= fmt.max_len:
        return None
    return ids[:fmt.max_len], labels[:fmt.max_len]


def prompt_ids(fmt: TextFormat, prompt: str = "", with_image: bool = True) -> list[int]:
    """The generation prompt for captioning: the same format training used, up to the answer."""
    if fmt.chat:
        return _ids(fmt, _render(fmt, [{"role": "user", "content": _user_text(fmt, prompt, with_image)}], True))
    return _ids(fmt, fmt.image_token if with_image else "")


def decode(fmt: TextFormat, ids: list[int]) -> str:
    return fmt.tokenizer.decode([i for i in ids if i != fmt.eos_id], skip_special_tokens=True).strip()
