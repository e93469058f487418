"""Converters from the real dataset formats to visprior shards, one module per source format.

Each converter is a typed function `convert_X(src, out, ...) -> manifest` that jsonargparse turns into
`visprior data convert <name>` (the docstring's `Args:` become `--help`). The returned manifest is the one `write_shards` writes,
plus the conversion report: `converter`, `source`, `converted`, `skipped` (by reason), `dropped_images` (by reason, for images
left out of kept documents), `skipped_examples` (record ids) and `skip_log` (every skipped record, in `skipped.jsonl`).
"""

from __future__ import annotations

from collections.abc import Callable

from visprior.data.convert.img2dataset import convert_img2dataset
from visprior.data.convert.llava_json import convert_llava_json
from visprior.data.convert.mmc4 import convert_mmc4
from visprior.data.convert.obelics import convert_obelics
from visprior.data.convert.text_jsonl import convert_text

CONVERT_COMMANDS: dict[str, Callable[..., dict]] = {
    "llava-json": convert_llava_json,
    "obelics": convert_obelics,
    "mmc4": convert_mmc4,
    "img2dataset": convert_img2dataset,
    "text": convert_text,
}

__all__ = [
    "CONVERT_COMMANDS",
    "convert_img2dataset",
    "convert_llava_json",
    "convert_mmc4",
    "convert_obelics",
    "convert_text",
]
