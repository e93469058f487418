"""MMC4 documents (JSON lines) -> interleaved shards.

A document has `text_list` (sentences), `image_info: [{image_name, raw_url, matched_text_index, matched_sim}]`, `url` and a
`similarity_matrix`. Following the MMC4 convention (and OpenFlamingo's loader), each image goes immediately before the sentence at
its `matched_text_index`; images matched to the same sentence keep their `image_info` order. Image files are read from
`--images/<image_name>` (MMC4 ships URLs only; downloading them is a separate step). A missing, unsafe or undecodable image, or one
whose index points past the text, is dropped and counted; the document keeps the rest. Sentences between images are joined with a
space, as OpenFlamingo does, because the tokenizer concatenates segments as they are. The similarity matrix is not kept.
"""

from __future__ import annotations

from collections import defaultdict
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
    load_image_file,
    prepare_out,
    resolve_image_path,
)
from visprior.data.formats import InterleavedSample, SampleError
from visprior.data.shards import write_shards

SENTENCE_JOINER = " "
KEPT_IMAGE_FIELDS = ("image_name", "raw_url", "matched_text_index", "matched_sim")


def to_sample(doc: dict[str, Any], key: str, images: Path, log: ConversionLog, where: str) -> InterleavedSample:
    """One document with its images placed before their matched sentences; a broken document raises `SampleError`."""
    sentences, infos = doc.get("text_list"), doc.get("image_info", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise SampleError("schema", "'text_list' must be a list of strings", key)
    if not isinstance(infos, list):
        raise SampleError("schema", "'image_info' must be a list", key)
    before: dict[int, list[tuple[Image.Image, dict[str, Any]]]] = defaultdict(list)
    for j, info in enumerate(infos):
        try:
            if not isinstance(info, dict):
                raise SampleError("schema", f"image_info[{j}] is not an object", key)
            index = info.get("matched_text_index")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(sentences):
                raise SampleError("bad_index", f"matched_text_index {index!r} is not a sentence index", key)
            path = resolve_image_path(info.get("image_name"), images, allow_absolute=False, key=key)
            before[index].append((load_image_file(path, key), {k: info.get(k) for k in KEPT_IMAGE_FIELDS}))
        except SampleError as e:
            log.drop_image(f"{where}/image_info[{j}]", e, where)
    segments: list[str | Image.Image] = []
    kept: list[dict[str, Any]] = []
    pending: list[str] = []
    for i, sentence in enumerate(sentences):
        if before.get(i):
            if pending:
                segments.append(SENTENCE_JOINER.join(pending))
                pending = []
            for image, info in before[i]:
                segments.append(image)
                kept.append(info)
        pending.append(sentence)
    if pending:
        segments.append(SENTENCE_JOINER.join(pending))
    if not any(isinstance(s, str) and s.strip() for s in segments):
        raise SampleError("empty_text", "document has no text", key)
    meta = {"source_row": where, "url": doc.get("url"), "image_info": kept}
    return InterleavedSample(key, segments, meta)


def convert_mmc4(
    src: str,
    *,
    out: str,
    images: str,
    name: str | None = None,
    image_format: Literal["jpg", "png"] = "jpg",
    maxcount: int = 1000,
) -> dict:
    """Convert MMC4 JSONL documents into interleaved shards, each image before the sentence it was matched to.

    Args:
        src: a docs_shard_*.jsonl file, or a quoted glob of them.
        out: output folder (shards, manifest.json, skipped.jsonl); nothing is written outside it.
        images: folder holding the downloaded images as `<image_name>` (absolute and `..` names are refused).
        name: shard file prefix; default from the (first) source file name.
        image_format: how images are stored in the shards (jpg keeps photos small; png is lossless).
        maxcount: documents per shard.
    """
    sources = expand_sources(src)
    name = name or default_name(src, "mmc4")
    root = prepare_out(out, name, sources)
    image_root = Path(images)
    keys = KeyMaker()
    with ConversionLog(root, "mmc4", sources) as log:

        def samples() -> Iterator[InterleavedSample]:
            for path in sources:
                for n, doc in iter_jsonl(path, log):
                    key, where = keys(f"{path.name.split('.')[0]}-{n:09d}"), f"{path.name}:{n}"
                    sample = log.attempt(where, str(path), to_sample, doc, key, image_root, log, where)
                    if sample is not None:
                        yield sample

        manifest = write_shards(
            samples(), root, name=name, kind="interleaved", maxcount=maxcount, image_format=image_format
        )
    return finish_manifest(root, manifest, log.report())
