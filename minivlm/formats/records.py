"""Image-caption records: LLaVA JSON array or JSONL, and the turns every source shares.

Design choices:
- The whole file is validated before any work starts; an error names the file, the record (index or
  line, and id) and what is wrong, so a bad record at position 500,000 fails in seconds, not hours.
- An image key is the record's image path, normalised (`./a//b.jpg` -> `a/b.jpg`). Keys are the join
  between records and cache rows, so stage 1 and stage 2 must normalise identically: both call `load_records`.
- Turns are {"from","value"} (LLaVA) or {"role","content"} (MiniMind-V, OpenAI-style messages) in every
  source; a bare caption becomes an empty user turn (tokenizer.prompt at stage 2) and the caption as answer.
- A record holds any number of images; the k-th `<image>` tag (in any turn, anywhere in it; an image part of
  OpenAI-style content is a tag) is the k-th image, and the tags stay in the turns' text so stage 2 puts each
  image where its tag stands. Images without tags go, in order, where one image always went: the start of the
  first user turn (`with_tags`). `"image": []` is no image: without a tag, a text-only sample.
- A record that parses but cannot become a sample raises `Skip` (a ValueError with its reason): tags and images
  that differ in number ("mismatch", `"image": []` with a tag among them) and `video` records ("video": a
  video record with a tag would otherwise stop the file, one without would silently train its answer as
  text-only). A caller that passes `skip` counts it and goes on (a mix of a million records has some of each);
  without one (data.strict) the Skip is the one-line stop. A record that does not parse is always a stop.
- Resolving a key against the image root is separate (`resolve_image`), so a key that escapes the root
  (`../x`, an absolute path outside it, or a symlink out) is reported as a failure and never opened; an
  absolute path inside the root is that file.
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
    images: tuple[str, ...]           # normalised image keys in the order of their tags; () for text-only samples
    turns: tuple[tuple[str, str], ...]  # (role, text) with roles user / assistant / system; one <image> tag an image
    where: str                        # "train.json record 12 (id 0000012)" for error messages


class Skip(ValueError):
    """A record that cannot become a sample: skipped and counted under `reason`, or (data.strict) this line."""

    def __init__(self, reason: str, where: str, message: str):
        super().__init__(message)
        self.reason, self.where = reason, where


def normalize_key(image: str) -> str:
    key = posixpath.normpath(image.replace("\\", "/"))
    return key[2:] if key.startswith("./") else key


def _turn(turn, where: str, j: int) -> tuple[str, str]:
    """One turn as (role, text with its <image> tags), from {"from","value"} (LLaVA) or {"role","content"}
    (MiniMind-V, OpenAI-style messages; content a string or a list of text/image parts, an image part a tag)."""
    if isinstance(turn, dict):
        role, text = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"), turn.get("content"))
        if isinstance(text, list) and all(isinstance(p, dict) for p in text):  # [{"type": "image"}, {"type": "text", ...}]
            text = parts_text(text)
        if role in ROLES and isinstance(text, str):
            return ROLES[role], text.strip()
    raise ValueError(f"{where}: conversations[{j}] must be {{'from': human|gpt|system, 'value': str}} or "
                     f"{{'role': user|assistant|system, 'content': str}}, got {json.dumps(turn, default=str)[:80]}")


def parts_text(parts: list[dict]) -> str:
    """OpenAI-style content parts as text: an image part is a tag where it stands, followed by a newline unless
    the text after it starts with whitespace (LLaVA's `<image>\n` before a question; a tag inside a sentence stays
    inside it). The exported processor's chat template applies the same rule (minivlm.use.export)."""
    parts = [p for p in parts if p.get("type") == "image" or p.get("type") == "text" and isinstance(p.get("text"), str)]
    out = []
    for p, after in zip(parts, parts[1:] + [None]):
        spaced = after is not None and after.get("type") == "text" and after["text"][:1] in (" ", "\n", "\t")
        out.append(p["text"] if p.get("type") == "text" else IMAGE_TAG + ("" if spaced else "\n"))
    return "".join(out)


def parse_turns(conv, where: str) -> tuple[tuple[str, str], ...]:
    """The turns of a conversation, their <image> tags kept in place."""
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} or "
                         f"{{'role', 'content'}} turns")
    turns = tuple(_turn(t, where, j) for j, t in enumerate(conv))
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError(f"{where}: conversations has no gpt turn (an assistant answer): nothing to learn")
    return turns


def count_tags(turns) -> int:
    return sum(text.count(IMAGE_TAG) for _, text in turns)


def with_tags(turns, n_images: int, where: str) -> tuple[tuple[str, str], ...]:
    """The turns with one <image> tag per image: as they are when their tags match the images in number; with
    every tag at the start of the first user turn (where one image always went) when they have none."""
    tags = count_tags(turns)
    if tags == n_images:
        return tuple(turns)
    if tags:
        raise Skip("mismatch", where, f"{where}: {tags} <image> tag(s) for {n_images} image(s); each image needs "
                   f"one tag where it goes (or no tags at all: the images then open the first user turn)")
    lead = IMAGE_TAG + "\n"
    at = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if at is None:  # no user turn: open with one (tokenizer.prompt at stage 2)
        return (("user", lead * n_images),) + tuple(turns)
    return tuple((r, lead * n_images + t if i == at else t) for i, (r, t) in enumerate(turns))


def user_text(text: str) -> str:
    """A user turn's text without its tags (what a user asked, for reports)."""
    return text.replace(IMAGE_TAG, "").strip()


def caption_turns(caption: str) -> tuple[tuple[str, str], ...]:
    """A bare caption: an empty user turn (stage 2 puts tokenizer.prompt there) and the caption as the answer."""
    return ("user", ""), ("assistant", caption.strip())


def _parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with id, image and conversations, got {type(obj).__name__}")
    rid = str(obj.get("id", ""))
    if rid:
        where = f"{where} (id {rid})"
    image = obj.get("image", obj.get("images"))
    images = [image] if isinstance(image, str) else [] if image is None else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
        raise ValueError(f"{where}: 'image' must be a non-empty path string relative to data.image_root, or a list "
                         f"of them")
    turns = parse_turns(obj.get("conversations", obj.get("messages")), where)
    if obj.get("video") is not None:
        raise Skip("video", where, f"{where}: video records are not supported (a 'video' key: minivlm trains on "
                                   f"images); drop it, or set data.strict=false to skip and count such records")
    return Record(rid, tuple(normalize_key(i) for i in images), with_tags(turns, len(images), where), where)


def _parsed(obj, where: str, skip) -> Record | None:
    try:
        return _parse_record(obj, where)
    except Skip as e:
        if skip is None:
            raise
        skip(e.reason, e.where)
        return None


def load_records(path: str | Path | Url, skip=None) -> list[Record]:
    """Read and validate every record of a JSON array or JSONL file (local, or a URL). `skip(reason, where)`:
    called for each record that cannot become a sample (a `Skip`), which is then left out; None: a stop."""
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
            records.append(_parsed(obj, f"{path} record {i}", skip))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(_parsed(obj, f"{path} line {n}", skip))
    if not records:
        raise ValueError(f"{path}: no records")
    return [r for r in records if r is not None]  # all skipped: the caller names the skips


def image_keys(records: list[Record]) -> list[str]:
    """Sorted unique image keys: identical keys are embedded once however many records use them."""
    return sorted({k for r in records for k in r.images})


def first_record_with(records: list[Record], key: str) -> Record:
    return next(r for r in records if key in r.images)


def resolve_image(root: str | Path | Url, key: str) -> Path | Url | None:
    """The file for `key` under `root` (a folder or a URL), or None if it resolves outside the root (never read).
    An absolute local path is accepted where it lies inside the root."""
    if isinstance(root, Url) and posixpath.isabs(key) or key == ".." or key.startswith("../"):
        return None
    if isinstance(root, Url):
        return root.child(key)
    root = Path(root).resolve()
    path = (root / key).resolve()
    return path if path.is_relative_to(root) else None
