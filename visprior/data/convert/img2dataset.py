"""img2dataset WebDataset shards (`{key}.jpg`, `{key}.txt`, `{key}.json` per sample) -> a pair dataset.

Their layout already is our pair kind, so the default (`mode=index`) copies nothing: it reads every shard once with our own tar
reader, counts the complete pairs per shard (optionally decoding each image and caption with `validate`), and writes a
`manifest.json` that points at the original tars (relative when they sit inside `--out`, absolute otherwise). Re-writing
hundreds of millions of JPEGs would double the disk and re-encode every image for no gain, and bad samples left in place are
skipped and counted by the reader anyway. A shard with an unsafe member name is left out of the manifest, since the reader
refuses it. `mode=rewrite` decodes every sample and writes fresh shards with sanitised keys into `--out`: use it when the
dataset must be self-contained or when the original keys contain dots.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from visprior.data.convert.common import ConversionLog, KeyMaker, finish_manifest, prepare_out
from visprior.data.formats import IMAGE_EXTENSIONS, SCHEMA_VERSION, PairSample, SampleError, decode_sample
from visprior.data.shards import SkipCounter, UnsafeTarMember, iter_shard_members, resolve_shards, write_shards


def _pairs(shard: str, log: ConversionLog, decode: bool) -> Iterator[PairSample | str]:
    """The good samples of one shard (decoded, or just their keys); bad ones are logged. Raises `UnsafeTarMember`."""
    counter = SkipCounter()
    for key, members in iter_shard_members(shard, counter):
        where = f"{Path(shard).name}:{key}"
        try:
            if not decode and not any(ext in members for ext in IMAGE_EXTENSIONS):
                raise SampleError("missing_member", f"no image member (one of {IMAGE_EXTENSIONS})", key)
            if not decode and "txt" not in members:
                raise SampleError("missing_member", "no 'txt' member", key)
            yield decode_sample("pair", key, members) if decode else key
        except SampleError as e:
            log.skip(where, e, shard)
    for reason, n in counter.by_reason.items():
        for _ in range(n):
            log.skip(Path(shard).name, SampleError(reason, counter.examples.get(reason, "")), shard)


def _index(shards: list[str], root: Path, name: str, log: ConversionLog, validate: bool) -> dict:
    entries = []
    for shard in shards:
        try:
            count = sum(1 for _ in _pairs(shard, log, decode=validate))
        except UnsafeTarMember as e:
            log.skip(Path(shard).name, e, shard)
            continue
        path = Path(shard).resolve()
        entries.append(
            {"path": str(path.relative_to(root)) if path.is_relative_to(root) else str(path), "num_samples": count}
        )
        log.converted += count
    return {
        "name": name,
        "kind": "pair",
        "schema_version": SCHEMA_VERSION,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries,
        "seed": None,
        "mode": "index",
        "validated": validate,
    }


def convert_img2dataset(
    src: str,
    *,
    out: str,
    mode: Literal["index", "rewrite"] = "index",
    validate: bool = False,
    name: str = "pairs",
    image_format: Literal["jpg", "png"] = "jpg",
    maxcount: int = 1000,
) -> dict:
    """Make img2dataset shards a visprior pair dataset: index them in place (default) or rewrite them into `--out`.

    Args:
        src: a folder's shards as a glob or brace pattern (`dir/{00000..00099}.tar`, `dir/*.tar`), or one tar.
        out: folder for manifest.json and skipped.jsonl (and the shards, with `mode=rewrite`).
        mode: `index` points the manifest at the original tars; `rewrite` decodes and writes new shards with safe keys.
        validate: with `index`, decode every image and caption so the counts exclude undecodable samples (slower).
        name: dataset name (and shard prefix with `rewrite`).
        image_format: image encoding of rewritten shards.
        maxcount: samples per rewritten shard.
    """
    shards = resolve_shards(os.fspath(src))
    sources = [Path(s) for s in shards]
    root = prepare_out(out, name, sources)
    with ConversionLog(root, "img2dataset", sources) as log:
        if mode == "index":
            manifest = _index(shards, root, name, log, validate)
        else:
            keys = KeyMaker()

            def samples() -> Iterator[PairSample]:
                for shard in shards:
                    try:
                        for sample in _pairs(shard, log, decode=True):
                            sample.key = keys(sample.key)
                            log.converted += 1
                            yield sample
                    except UnsafeTarMember as e:
                        log.skip(Path(shard).name, e, shard)

            manifest = write_shards(
                samples(), root, name=name, kind="pair", maxcount=maxcount, image_format=image_format
            )
            manifest["mode"] = "rewrite"
    return finish_manifest(root, manifest, log.report())
