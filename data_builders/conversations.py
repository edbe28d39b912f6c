"""Normalises chat rows (OpenAI `messages` or ShareGPT `conversations`) into one checked form.

The normal form is `Conversation(messages=[{"role", "content"}], condition, images)`. Content
made of parts (`[{"type": "text", ...}, {"type": "image", "image": ...}]`) becomes text with an `<image>`
marker where each image part was, and its image values in order. ShareGPT/LLaVA rows (and `messages` rows in
ms-swift's form) put `<image>` markers in the text and the images in a row-level `images` list (or `image`);
TRL's form has `{"type": "image"}` parts with no value and the row-level list. The values stay unopened here
(`data_builders/images.py` checks and opens them); that the markers and images agree in number is checked where
the images are resolved (`data_builders/image_tokens.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_builders.bad_rows import BadRowError
from data_builders.images import is_raw_base64

ROLES = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"  # where an image goes in a message's text (LLaVA / ShareGPT / InternVL convention)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    condition: str | None = None
    images: list[Any] = field(default_factory=list)
    origin: str = ""
    row: int = -1


def detect_format(row: dict) -> Literal["messages", "sharegpt"] | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    return None


def normalize(
    row: Any,
    origin: str,
    index: int,
    fmt: Literal["auto", "messages", "sharegpt"] = "auto",
    system_prompt: str | None = None,
) -> Conversation:
    """Check and convert one row; raises BadRowError naming the offending field."""
    if not isinstance(row, dict):
        raise BadRowError(origin, index, "<row>", f"expected a JSON object, got {type(row).__name__}")
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind is None:
        raise BadRowError(origin, index, "messages", "no 'messages' (OpenAI) or 'conversations' (ShareGPT) field")
    if kind == "messages":
        messages, images = _openai_messages(row.get("messages"), origin, index)
    else:
        messages, images = _sharegpt_messages(row, origin, index)
    images = merge_images(images, row_images(row, origin, index), origin, index)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRowError(origin, index, kind, "no non-empty assistant message to train on")
    condition = row.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise BadRowError(origin, index, "condition", f"expected a string, got {type(condition).__name__}")
    return Conversation(messages, condition, images, origin, index)


def row_images(row: dict, origin: str, index: int) -> list:
    """The row-level image list: `images` (a list, or one value) or LLaVA's `image`; [] when neither."""
    for key in ("images", "image"):
        if key in row and row[key] is not None:
            value = row[key]
            return list(value) if isinstance(value, (list, tuple)) else [value]
    return []


def merge_images(part_images: list, listed: list, origin: str, index: int) -> list:
    """Images of content parts, or the row's list: parts without a value (TRL's `{"type": "image"}`) take the list."""
    if not part_images:
        return listed
    if all(v is None for v in part_images) and listed:
        return listed
    if listed:
        raise BadRowError(origin, index, "images", "images are given both in content parts and in the row's 'images' list; use one")
    if any(v is None for v in part_images):
        missing = next(j for j, v in enumerate(part_images) if v is None)
        raise BadRowError(origin, index, "images", f"image part {missing + 1} has no image value and the row has no 'images' list")
    return part_images


IMAGE_PARTS = ("image", "image_url")


def part_image(part: dict) -> Any:
    """The value of an image part: `image` (TRL, ms-swift), or OpenAI's `image_url` / `url`; None when it has none."""
    return part.get("image") or part.get("image_url") or part.get("url")


def content_text(content: Any, origin: str, index: int, field_name: str, images: list) -> str:
    """A message's content as text: a string as is; parts joined, an `<image>` marker per image part (its value to `images`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind in IMAGE_PARTS:
                images.append(part_image(part))
                texts.append(IMAGE_MARKER)
            else:
                raise BadRowError(origin, index, f"{field_name}[{j}].type", f"unsupported content part {kind!r}")
        return "".join(texts)
    raise BadRowError(origin, index, field_name, f"expected a string or a list of parts, got {type(content).__name__}")


def text_messages(messages: list[dict], origin: str, index: int, field_name: str = "messages") -> tuple[list[dict], list]:
    """{role, content} messages with text content (image parts become `<image>` markers) and their image values in order."""
    images: list = []
    out = [{"role": m["role"], "content": content_text(m["content"], origin, index, f"{field_name}[{i}].content", images)}
           for i, m in enumerate(messages)]  # fmt: skip
    return out, images


def with_image_parts(messages: list[dict], images: list, base_dir: Path, origin: str, index: int) -> list[dict]:
    """A prompt's messages with every image as an OpenAI part whose value stands on its own: `<image>` markers in text
    take the row's `images` in order, and a relative path becomes absolute (from `base_dir`, the data file's directory).

    Prompts travel beyond their file (into the rollout buffer, sampled preference rows, saved and read back), so an image
    is made self-contained once, where the row is read.
    """
    queue = list(images)

    def part_value(value: Any) -> Any:
        if isinstance(value, str) and not value.startswith("data:") and not is_raw_base64(value) and not Path(value).expanduser().is_absolute():
            return str(base_dir / value)
        return value

    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str) and IMAGE_MARKER in content:
            pieces = content.split(IMAGE_MARKER)
            parts: list[dict] = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
            for piece in pieces[1:]:
                if not queue:
                    raise BadRowError(origin, index, f"messages[{i}].content", f"more {IMAGE_MARKER} markers than images")
                parts.append({"type": "image", "image": part_value(queue.pop(0))})
                if piece:
                    parts.append({"type": "text", "text": piece})
            content = parts
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:  # TRL's valueless parts take the row's list
                    value = part_image(part)
                    part = {"type": "image", "image": part_value(value if value is not None else queue.pop(0) if queue else None)}
                parts.append(part)
            content = parts
        out.append({**m, "content": content})
    if queue:
        raise BadRowError(origin, index, "images", f"{len(images)} images but only {len(images) - len(queue)} {IMAGE_MARKER} markers or image parts")
    return out


def _openai_messages(messages: Any, origin: str, index: int) -> tuple[list[dict], list]:
    if not isinstance(messages, list) or not messages:
        raise BadRowError(origin, index, "messages", "expected a non-empty list of messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRowError(origin, index, f"messages[{i}]", "expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise BadRowError(origin, index, f"messages[{i}].role", f"expected one of {ROLES}, got {role!r}")
        if "content" not in m or m["content"] is None:
            raise BadRowError(origin, index, f"messages[{i}].content", "missing")
        out.append({"role": role, "content": content_text(m["content"], origin, index, f"messages[{i}].content", images)})
    return out, images


def _sharegpt_messages(row: dict, origin: str, index: int) -> tuple[list[dict], list]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRowError(origin, index, "conversations", "expected a non-empty list of turns")
    out, images = [], []
    if isinstance(row.get("system"), str) and row["system"]:
        out.append({"role": "system", "content": row["system"]})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRowError(origin, index, f"conversations[{i}]", "expected an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise BadRowError(origin, index, f"conversations[{i}].from", f"expected one of {sorted(SHAREGPT_ROLES)}, got {t.get('from')!r}")
        if not isinstance(t.get("value"), str):
            raise BadRowError(origin, index, f"conversations[{i}].value", "expected a string")
        out.append({"role": role, "content": t["value"]})
    return out, images
