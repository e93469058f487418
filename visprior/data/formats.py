"""The four sample kinds visprior trains on, and their on-disk WebDataset schema.

Every source (toy world, LLaVA JSON, OBELICS, MMC4, img2dataset, plain text) is converted into one of these kinds. A sample is
stored as the members of one WebDataset key; `encode_sample` gives those members and `decode_sample` turns them back into a
validated sample, raising `SampleError` with a short machine-readable reason so readers can skip and count bad samples.

| kind         | members                                                                                  |
|--------------|------------------------------------------------------------------------------------------|
| text         | `txt`, optional `json` (`category`, `source`, ...)                                       |
| pair         | `jpg` or `png`, `txt`, optional `json` (img2dataset's layout, so its shards load as-is)  |
| interleaved  | `json` = `{"segments": [{"text": ...} or {"image": "img0.png"}, ...], ...}`, `img0.png`, ... |
| conversation | `json` = LLaVA record (`conversations: [{from: human/gpt, value}]`, `<image>` marks), `img0.jpg`, ... |
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

SCHEMA_VERSION = 1
IMAGE_MARK = "<image>"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_IMG_MEMBER = re.compile(r"^img(\d+)\.(jpg|jpeg|png|webp)$")


class SampleKind(str, Enum):
    TEXT = "text"
    PAIR = "pair"
    INTERLEAVED = "interleaved"
    CONVERSATION = "conversation"


class SampleError(ValueError):
    """A sample that cannot be used. `reason` is a short counter name (`bad_json`, `bad_image`, ...)."""

    def __init__(self, reason: str, detail: str, key: str | None = None):
        self.reason = reason
        self.detail = detail
        self.key = key
        where = f"sample {key!r}: " if key else ""
        super().__init__(f"{where}{reason}: {detail}")


@dataclass
class TextSample:
    key: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    kind = SampleKind.TEXT


@dataclass
class PairSample:
    key: str
    image: Image.Image
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    kind = SampleKind.PAIR


@dataclass
class InterleavedSample:
    """Text and images in document order; `segments` holds `str` and `PIL.Image` items."""

    key: str
    segments: list[Union[str, Image.Image]]
    meta: dict[str, Any] = field(default_factory=dict)
    kind = SampleKind.INTERLEAVED

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]


@dataclass
class ConversationSample:
    """A LLaVA-schema conversation; `images` fill the `<image>` marks in order. Text-only conversations have no images."""

    key: str
    conversations: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    kind = SampleKind.CONVERSATION


Sample = Union[TextSample, PairSample, InterleavedSample, ConversationSample]


# ---------------------------------------------------------------------------------------------------------------- encode


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fmt = "jpeg" if fmt in ("jpg", "jpeg") else fmt
    image.save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {"compress_level": 1}))
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")


def encode_sample(sample: Sample, image_format: str = "png") -> dict[str, bytes]:
    """Members (extension -> bytes) of one WebDataset key, without `__key__`."""
    ext = "jpg" if image_format in ("jpg", "jpeg") else image_format
    if isinstance(sample, TextSample):
        out = {"txt": sample.text.encode("utf-8")}
        if sample.meta:
            out["json"] = _json_bytes(sample.meta)
        return out
    if isinstance(sample, PairSample):
        out = {ext: encode_image(sample.image, ext), "txt": sample.text.encode("utf-8")}
        if sample.meta:
            out["json"] = _json_bytes(sample.meta)
        return out
    if isinstance(sample, InterleavedSample):
        out, segments, n = {}, [], 0
        for seg in sample.segments:
            if isinstance(seg, Image.Image):
                name = f"img{n}.{ext}"
                out[name] = encode_image(seg, ext)
                segments.append({"image": name})
                n += 1
            else:
                segments.append({"text": seg})
        out["json"] = _json_bytes({**sample.meta, "segments": segments})
        return out
    if isinstance(sample, ConversationSample):
        out = {f"img{i}.{ext}": encode_image(im, ext) for i, im in enumerate(sample.images)}
        out["json"] = _json_bytes({**sample.meta, "conversations": sample.conversations})
        return out
    raise TypeError(f"not a sample: {type(sample).__name__}")


# ---------------------------------------------------------------------------------------------------------------- decode


def decode_image(data: bytes, key: str, member: str) -> Image.Image:
    """Decode fully now (PIL is lazy), so a truncated file fails here and not inside a training step."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError("bad_image", f"member {member!r} does not decode: {e}", key) from e
    return im.convert("RGB")


def _decode_json(members: dict[str, bytes], key: str, required: bool) -> dict[str, Any]:
    if "json" not in members:
        if required:
            raise SampleError("missing_member", "no 'json' member", key)
        return {}
    try:
        obj = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("bad_json", f"member 'json' is not valid JSON: {e}", key) from e
    if not isinstance(obj, dict):
        raise SampleError("bad_json", f"member 'json' must be an object, got {type(obj).__name__}", key)
    return obj


def _decode_text(members: dict[str, bytes], key: str) -> str:
    if "txt" not in members:
        raise SampleError("missing_member", "no 'txt' member", key)
    try:
        text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_text", f"member 'txt' is not UTF-8: {e}", key) from e
    if not text.strip():
        raise SampleError("empty_text", "member 'txt' is empty", key)
    return text


def _numbered_images(members: dict[str, bytes], key: str) -> dict[str, Image.Image]:
    return {m: decode_image(b, key, m) for m, b in members.items() if _IMG_MEMBER.match(m)}


def decode_sample(kind: SampleKind | str, key: str, members: dict[str, bytes]) -> Sample:
    """Validate and decode the members of one key. Raises `SampleError` naming the key and the reason."""
    kind = SampleKind(kind)
    if kind is SampleKind.TEXT:
        return TextSample(key, _decode_text(members, key), _decode_json(members, key, required=False))

    if kind is SampleKind.PAIR:
        image_members = [m for m in IMAGE_EXTENSIONS if m in members]
        if not image_members:
            raise SampleError("missing_member", f"no image member (one of {IMAGE_EXTENSIONS})", key)
        image = decode_image(members[image_members[0]], key, image_members[0])
        return PairSample(key, image, _decode_text(members, key), _decode_json(members, key, required=False))

    if kind is SampleKind.INTERLEAVED:
        meta = _decode_json(members, key, required=True)
        raw = meta.pop("segments", None)
        if not isinstance(raw, list) or not raw:
            raise SampleError("schema", "'segments' must be a non-empty list", key)
        images = _numbered_images(members, key)
        segments: list[str | Image.Image] = []
        for i, seg in enumerate(raw):
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                segments.append(seg["text"])
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
                if seg["image"] not in images:
                    raise SampleError("image_count_mismatch", f"segment {i} names missing image {seg['image']!r}", key)
                segments.append(images[seg["image"]])
            else:
                raise SampleError("schema", f"segment {i} must be {{'text': str}} or {{'image': member}}", key)
        if not any(isinstance(s, str) and s.strip() for s in segments):
            raise SampleError("empty_text", "interleaved document has no text", key)
        return InterleavedSample(key, segments, meta)

    meta = _decode_json(members, key, required=True)
    conversations = meta.pop("conversations", None)
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("schema", "'conversations' must be a non-empty list", key)
    for i, turn in enumerate(conversations):
        if not (
            isinstance(turn, dict)
            and turn.get("from") in ("human", "gpt", "system")
            and isinstance(turn.get("value"), str)
        ):
            raise SampleError("schema", f"turn {i} must be {{'from': human|gpt|system, 'value': str}}", key)
    images = _numbered_images(members, key)
    ordered = [images[m] for m in sorted(images, key=lambda m: int(_IMG_MEMBER.match(m).group(1)))]
    if not ordered:  # LLaVA-style single image stored under a plain extension
        ordered = [decode_image(members[m], key, m) for m in IMAGE_EXTENSIONS if m in members][:1]
    marks = sum(t["value"].count(IMAGE_MARK) for t in conversations)
    if marks != len(ordered):
        raise SampleError("image_count_mismatch", f"{marks} '{IMAGE_MARK}' marks but {len(ordered)} images", key)
    return ConversationSample(key, conversations, ordered, meta)
