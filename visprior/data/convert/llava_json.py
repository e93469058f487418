"""LLaVA JSON (LLaVA-Pretrain 558K, LLaVA-Instruct-150K, llava_v1_5_mix665k) -> conversation shards.

The source is a JSON list (or JSON lines) of `{"id", "image"?: "coco/train2017/x.jpg" | [paths], "conversations": [{"from":
"human"|"gpt", "value": "<image>\\n..."}]}`. Images are read from `--images` + the relative path, decoded and stored in the sample;
text-only records (no `image`) stay text-only. A record whose `<image>` marks do not match its images, whose image is missing,
unsafe or undecodable, or whose turns break the schema is skipped whole and logged with its id: a conversation with a hole in it
would teach the wrong thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from visprior.data.convert.common import (
    ConversionLog,
    KeyMaker,
    default_name,
    finish_manifest,
    iter_jsonl,
    load_image_file,
    prepare_out,
    resolve_image_path,
)
from visprior.data.formats import IMAGE_MARK, ConversationSample, SampleError
from visprior.data.shards import write_shards

ROLES = ("human", "gpt", "system")


def _records(src: Path, log: ConversionLog) -> Iterator[tuple[int, Any]]:
    if src.suffix == ".jsonl":
        yield from iter_jsonl(src, log)
        return
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{src}: a LLaVA JSON file is a list of records, got {type(data).__name__}")
    yield from enumerate(data)


def _to_sample(record: Any, index: int, images: Path | None, keys: KeyMaker) -> ConversationSample:
    if not isinstance(record, dict):
        raise SampleError("schema", f"record {index} is not an object")
    rid = str(record.get("id", index))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError("schema", "'conversations' must be a non-empty list", rid)
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            raise SampleError("schema", f"turn {i} must be {{'from': human|gpt|system, 'value': str}}", rid)
    refs = record.get("image")
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    marks = sum(t["value"].count(IMAGE_MARK) for t in turns)
    if marks != len(refs):
        raise SampleError("image_count_mismatch", f"{marks} '{IMAGE_MARK}' marks but {len(refs)} images", rid)
    pixels = [load_image_file(resolve_image_path(r, images, allow_absolute=False, key=rid), rid) for r in refs]
    conversations = [{"from": t["from"], "value": t["value"]} for t in turns]
    meta = {"id": rid, **({"image": record["image"]} if refs else {})}
    return ConversationSample(keys(rid), conversations, pixels, meta)


def convert_llava_json(
    src: str,
    *,
    out: str,
    images: str | None = None,
    name: str | None = None,
    image_format: Literal["jpg", "png"] = "jpg",
    maxcount: int = 1000,
) -> dict:
    """Convert a LLaVA-schema JSON (or JSONL) file into conversation shards; bad records are skipped and logged by id.

    Args:
        src: the JSON list (e.g. llava_v1_5_mix665k.json, blip_laion_cc_sbu_558k.json) or a JSONL of the same records.
        out: output folder (shards, manifest.json, skipped.jsonl); nothing is written outside it.
        images: folder the records' relative `image` paths start from (absolute and `..` paths are refused).
        name: shard file prefix; default from the source file name.
        image_format: how images are stored in the shards (jpg keeps photo datasets small; png is lossless).
        maxcount: samples per shard.
    """
    sources = [Path(src)]
    if not sources[0].is_file():
        raise FileNotFoundError(f"no LLaVA JSON at {src}")
    name = name or default_name(src, "llava")
    root = prepare_out(out, name, sources)
    image_root = Path(images) if images else None
    keys = KeyMaker()
    with ConversionLog(root, "llava-json", sources) as log:

        def samples() -> Iterator[ConversationSample]:
            for index, record in _records(sources[0], log):
                rid = record.get("id", index) if isinstance(record, dict) else index
                sample = log.attempt(str(rid), str(src), _to_sample, record, index, image_root, keys)
                if sample is not None:
                    yield sample

        manifest = write_shards(
            samples(), root, name=name, kind="conversation", maxcount=maxcount, image_format=image_format
        )
    return finish_manifest(root, manifest, log.report())
