"""OBELICS-style web documents (parquet or JSON lines) -> interleaved shards, document order kept.

A row holds `images: list[str | {bytes, path} | None]` and `texts: list[str | None]` aligned by position (exactly one of the two
is set at each position), plus `metadata` (a JSON string, one entry per position) and `general_metadata` (a JSON string: page
url, WARC location). An image entry may carry its bytes (HF `Image` feature dumps), be an absolute path, a path under `--images`,
or a URL. URLs are never fetched: such an image is dropped from its document and counted (`url_not_local`), as are missing,
unsafe or undecodable ones; the document keeps its other content. Consecutive texts are joined with a blank line, because the
tokenizer concatenates segments as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from visprior.data.convert.common import (
    ConversionLog,
    KeyMaker,
    default_name,
    expand_sources,
    finish_manifest,
    iter_jsonl,
    iter_parquet,
    load_image_bytes,
    load_image_file,
    prepare_out,
    resolve_image_path,
)
from visprior.data.formats import InterleavedSample, SampleError
from visprior.data.shards import write_shards

TEXT_JOINER = "\n\n"


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _load_entry(entry: Any, images: Path | None, allow_absolute: bool, key: str, what: str) -> Image.Image:
    if isinstance(entry, dict):
        if isinstance(entry.get("bytes"), (bytes, bytearray)) and entry["bytes"]:
            return load_image_bytes(bytes(entry["bytes"]), key, what)
        entry = entry.get("path")
    return load_image_file(resolve_image_path(entry, images, allow_absolute=allow_absolute, key=key), key)


def to_sample(
    row: dict[str, Any], key: str, images: Path | None, allow_absolute: bool, log: ConversionLog, where: str
) -> InterleavedSample:
    """One document; images that cannot be had are dropped and logged, a broken row raises `SampleError`."""
    imgs, texts = row.get("images"), row.get("texts")
    if not isinstance(imgs, list) or not isinstance(texts, list) or len(imgs) != len(texts):
        raise SampleError("schema", "'images' and 'texts' must be lists of the same length", key)
    per_position = _maybe_json(row.get("metadata"))
    per_position = per_position if isinstance(per_position, list) and len(per_position) == len(imgs) else None
    segments: list[str | Image.Image] = []
    kept_meta: list[Any] = []
    pending: list[str] = []
    for i, (img, txt) in enumerate(zip(imgs, texts)):
        if (img is None) == (txt is None):
            raise SampleError("schema", f"position {i}: exactly one of images[i] / texts[i] must be set", key)
        if txt is not None:
            if not isinstance(txt, str):
                raise SampleError("schema", f"texts[{i}] is not a string", key)
            pending.append(txt)
            continue
        try:
            image = _load_entry(img, images, allow_absolute, key, f"images[{i}]")
        except SampleError as e:
            log.drop_image(f"{where}/images[{i}]", e, where)
            continue
        if pending:
            segments.append(TEXT_JOINER.join(pending))
            pending = []
        segments.append(image)
        kept_meta.append(per_position[i] if per_position else None)
    if pending:
        segments.append(TEXT_JOINER.join(pending))
    if not any(isinstance(s, str) and s.strip() for s in segments):
        raise SampleError("empty_text", "document has no text left", key)
    meta: dict[str, Any] = {"source_row": where}
    if row.get("general_metadata") is not None:
        meta["general_metadata"] = _maybe_json(row["general_metadata"])
    if per_position is not None:
        meta["image_metadata"] = kept_meta
    return InterleavedSample(key, segments, meta)


def _rows(path: Path, log: ConversionLog) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        return iter_parquet(path)
    return iter_jsonl(path, log)


def convert_obelics(
    src: str,
    *,
    out: str,
    images: str | None = None,
    allow_absolute_paths: bool = True,
    name: str | None = None,
    image_format: Literal["jpg", "png"] = "jpg",
    maxcount: int = 1000,
) -> dict:
    """Convert OBELICS-schema documents (parquet or JSONL, one file or a glob) into interleaved shards, order kept.

    Args:
        src: a .parquet or .jsonl file, or a quoted glob of them (HF parts), with `images`/`texts` columns.
        out: output folder (shards, manifest.json, skipped.jsonl); nothing is written outside it.
        images: folder that relative image paths start from (`..` is refused).
        allow_absolute_paths: accept image entries that are absolute paths (set False for sources you do not trust).
        name: shard file prefix; default from the (first) source file name.
        image_format: how images are stored in the shards (jpg keeps photos small; png is lossless).
        maxcount: documents per shard.
    """
    sources = expand_sources(src)
    name = name or default_name(src, "obelics")
    root = prepare_out(out, name, sources)
    image_root = Path(images) if images else None
    keys = KeyMaker()
    with ConversionLog(root, "obelics", sources) as log:

        def samples() -> Iterator[InterleavedSample]:
            for path in sources:
                for n, row in _rows(path, log):
                    key, where = keys(f"{path.name.split('.')[0]}-{n:09d}"), f"{path.name}:{n}"
                    sample = log.attempt(
                        where, str(path), to_sample, row, key, image_root, allow_absolute_paths, log, where
                    )
                    if sample is not None:
                        yield sample

        manifest = write_shards(
            samples(), root, name=name, kind="interleaved", maxcount=maxcount, image_format=image_format
        )
    return finish_manifest(root, manifest, log.report())
