"""Plain text corpora (JSON lines with a `text` field, or parquet with a `text` column) -> text shards.

Each sample's json meta is `{"category", "source"}`: the category drives LSBS-style mixtures, so it is either given for the whole
file (`--category`), taken from a record's own `category` field, or `uncategorized`. Empty or non-string texts are skipped and
counted. Parquet is read column by column in small batches, so large parts stay out of memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from visprior.data.convert.common import (
    ConversionLog,
    KeyMaker,
    default_name,
    expand_sources,
    finish_manifest,
    iter_jsonl,
    iter_parquet,
    prepare_out,
)
from visprior.data.formats import SampleError, TextSample
from visprior.data.shards import write_shards

UNCATEGORIZED = "uncategorized"


def convert_text(
    src: str,
    *,
    out: str,
    category: str | None = None,
    text_field: str = "text",
    source: str | None = None,
    name: str | None = None,
    maxcount: int = 1000,
) -> dict:
    """Convert a text corpus (JSONL or parquet, one file or a glob) into text shards with `{category, source}` meta.

    Args:
        src: a .jsonl or .parquet file, or a quoted glob of them.
        out: output folder (shards, manifest.json, skipped.jsonl); nothing is written outside it.
        category: category of every sample; default: the record's own `category` field, else `uncategorized`.
        text_field: name of the text field / column.
        source: `source` written in each sample's meta; default: the dataset name.
        name: shard file prefix; default from the (first) source file name.
        maxcount: samples per shard.
    """
    sources = expand_sources(src)
    name = name or default_name(src, "text")
    root = prepare_out(out, name, sources)
    source = source or name
    keys = KeyMaker()
    with ConversionLog(root, "text", sources) as log:

        def samples() -> Iterator[TextSample]:
            for path in sources:
                columns = [text_field, "id", "category"]
                rows = iter_parquet(path, columns) if path.suffix == ".parquet" else iter_jsonl(path, log)
                for n, row in rows:
                    where = f"{path.name}:{n}"
                    text = row.get(text_field)
                    if not isinstance(text, str):
                        log.skip(where, SampleError("schema", f"{text_field!r} is missing or not a string"), str(path))
                        continue
                    if not text.strip():
                        log.skip(where, SampleError("empty_text", f"{text_field!r} is empty"), str(path))
                        continue
                    own = row.get("category")
                    cat = category or (own if isinstance(own, str) and own else UNCATEGORIZED)
                    key = keys(row["id"] if row.get("id") is not None else f"{path.name.split('.')[0]}-{n:09d}")
                    log.converted += 1
                    yield TextSample(key, text, {"category": cat, "source": source})

        manifest = write_shards(samples(), root, name=name, kind="text", maxcount=maxcount)
    return finish_manifest(root, manifest, log.report())
