"""Image-caption records: LLaVA JSON array or JSONL, and the turns every source shares.

Design choices:
- The whole file is validated before any work starts; an error names the file, the record (index or
  line, and id) and what is wrong, so a bad record at position 500,000 fails in seconds, not hours.
- An image key is the record's image path, normalised (`./a//b.jpg` -> `a/b.jpg`). Keys are the join
  between records and cache rows, so stage 1 and stage 2 must normalise identically: both call `load_records`.
- Turns are {"from","value"} (LLaVA) or {"role","content"} (MiniMind-V, OpenAI-style messages) in every
  source; a bare caption becomes an empty user turn (tokenizer.prompt at stage 2) and the caption as answer.
- Resolving a key against the image root is separate (`resolve_image`), so a key that escapes the root
  (`../x`, absolute, or a symlink out) is reported as a failure and never opened.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from minivlm.fileio import read_utf8
from minivlm.formats.remote import Url

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None                 # normalised image key, None for text-only samples
    turns: tuple[tuple[str, str], ...]  # (role, text) with roles user / assistant / system; <image> removed
    where: str                        # "train.json record 12 (id 0000012)" for error messages


def normalize_key(image: str) -> str:
    key = posixpath.normpath(image.replace("\\", "/"))
    return key[2:] if key.startswith("./") else key


def _turn(turn, where: str, j: int) -> tuple[str, str, bool]:
    """One turn as (role, text without <image>, whether it held an image), from {"from","value"} (LLaVA) or
    {"role","content"} (MiniMind-V, OpenAI-style messages; content a string or a list of text/image parts)."""
    if isinstance(turn, dict):
        role, text = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"), turn.get("content"))
        if isinstance(text, list) and all(isinstance(p, dict) for p in text):  # [{"type": "text", "text": ...}, {"type": "image"}]
            image = any(p.get("type") == "image" for p in text)
            text = "".join(p["text"] for p in text if p.get("type") == "text" and isinstance(p.get("text"), str))
            text = IMAGE_TAG + text if image else text
        if role in ROLES and isinstance(text, str):
            return ROLES[role], text.replace(IMAGE_TAG, "").strip(), IMAGE_TAG in text
    raise ValueError(f"{where}: conversations[{j}] must be {{'from': human|gpt|system, 'value': str}} or "
                     f"{{'role': user|assistant|system, 'content': str}}, got {json.dumps(turn, default=str)[:80]}")


def parse_turns(conv, where: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    """The turns of a conversation and whether any of them carried an <image> tag."""
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} or "
                         f"{{'role', 'content'}} turns")
    parsed = [_turn(t, where, j) for j, t in enumerate(conv)]
    if not any(role == "assistant" for role, _, _ in parsed):
        raise ValueError(f"{where}: conversations has no gpt turn (an assistant answer): nothing to learn")
    return tuple((role, text) for role, text, _ in parsed), any(tagged for _, _, tagged in parsed)


def caption_turns(caption: str) -> tuple[tuple[str, str], ...]:
    """A bare caption: an empty user turn (stage 2 puts tokenizer.prompt there) and the caption as the answer."""
    return ("user", ""), ("assistant", caption.strip())


def _parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with id, image and conversations, got {type(obj).__name__}")
    rid = str(obj.get("id", ""))
    if rid:
        where = f"{where} (id {rid})"
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError(f"{where}: 'image' must be a non-empty path string relative to data.image_root")
    turns, _ = parse_turns(obj.get("conversations", obj.get("messages")), where)
    return Record(rid, normalize_key(image) if image else None, turns, where)


def load_records(path: str | Path | Url) -> list[Record]:
    """Read and validate every record of a JSON array or JSONL file (local, or a URL)."""
    path = path if isinstance(path, Url) else Path(path)
    if isinstance(path, Path) and not path.is_file():
        raise FileNotFoundError(f"records file {path} not found; set data.records (make demo-data writes the demo's)")
    text = read_utf8(path)
    records = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, obj in enumerate(items):
            records.append(_parse_record(obj, f"{path} record {i}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(_parse_record(obj, f"{path} line {n}"))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def image_keys(records: list[Record]) -> list[str]:
    """Sorted unique image keys: identical keys are embedded once however many records use them."""
    return sorted({r.image for r in records if r.image})


def first_record_with(records: list[Record], key: str) -> Record:
    return next(r for r in records if r.image == key)


def resolve_image(root: str | Path | Url, key: str) -> Path | Url | None:
    """The file for `key` under `root` (a folder or a URL), or None if it resolves outside the root (never read)."""
    if posixpath.isabs(key) or key == ".." or key.startswith("../"):
        return None
    if isinstance(root, Url):
        return root.child(key)
    root = Path(root).resolve()
    path = (root / key).resolve()
    return path if path.is_relative_to(root) else None
