"""What every converter shares: safe output folders, safe sample keys, safe image paths, image loading, and the skip log.

The converters read files other people wrote, so nothing in a source is trusted: sample keys are reduced to `[A-Za-z0-9_-]`
(webdataset splits key and extension at the first dot, and a `/` would make a sub-folder), image paths that are absolute
(unless the format allows it) or climb with `..` are refused, URLs are never fetched, and everything written lands in the
resolved output folder under fixed names. A record that cannot be converted is skipped, counted by reason, and written with its
id to `skipped.jsonl`, so nothing is lost silently; the counts go into the manifest.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from visprior.data.formats import SampleError
from visprior.data.shards import MANIFEST

log = logging.getLogger(__name__)

SKIP_LOG = "skipped.jsonl"
MAX_IMAGE_BYTES = 64 * 2**20  # a larger "image" is a mistake or an attack, not a photo
MAX_KEY_LENGTH = 96  # keeps tar member names inside the plain 100-byte ustar field
MAX_EXAMPLES = 20  # record ids kept per reason in the manifest; all of them are in skipped.jsonl
T = TypeVar("T")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# ----------------------------------------------------------------------------------------------------------------- output


def prepare_out(out: str | os.PathLike, name: str, sources: list[Path]) -> Path:
    """Resolve and create the output folder; refuse a shard name that could leave it or outputs that would clobber a source.

    `write_shards` deletes `{name}-*.tar` in the folder before writing, so a source shard living there under that name would be
    destroyed: that is refused too. A stale manifest is removed first, so a failed run never leaves one naming half-written shards.
    """
    if not _SAFE_NAME.match(name):
        raise ValueError(f"dataset name {name!r} must match {_SAFE_NAME.pattern} (it becomes the shard file prefix)")
    root = Path(out).resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    owned = {MANIFEST, SKIP_LOG}
    for src in sources:
        src = src.resolve()
        if src.parent == root and (
            src.name in owned or (src.name.startswith(f"{name}-") and src.name.endswith(".tar"))
        ):
            raise ValueError(f"--out {out} would overwrite the source {src}; choose another folder or --name")
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    return root


def finish_manifest(root: Path, manifest: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Add the conversion report to the manifest written by `write_shards` (same file format) and return it.

    `ShardWriter` opens its first tar before any sample arrives, so a conversion that kept nothing leaves an empty shard the
    manifest does not list: such unlisted `{name}-*.tar` files (ours by name, see `prepare_out`) are removed.
    """
    manifest = {**manifest, **extra}
    if manifest.get("mode") != "index":
        listed = {s["path"] for s in manifest["shards"]}
        for tar in root.glob(f"{manifest['name']}-*.tar"):
            if tar.name not in listed:
                tar.unlink()
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def default_name(src: str, fallback: str) -> str:
    """A shard prefix from the source file name (`train-00000-of-00010.parquet` -> `train-00000-of-00010`)."""
    stem = _UNSAFE_KEY_CHARS.sub("_", Path(src.split("*")[0]).name.split(".")[0]).strip("_-")[:64]
    return stem if stem and _SAFE_NAME.match(stem) else fallback


def expand_sources(src: str | os.PathLike) -> list[Path]:
    """One file or a glob of files (HF dumps come as many parquet/jsonl parts), sorted; none found is an error."""
    text = str(src)
    paths = [Path(p) for p in sorted(glob.glob(text))] if glob.has_magic(text) else [Path(text)]
    files = [p for p in paths if p.is_file()]
    if not files:
        raise FileNotFoundError(f"no source file matches {text}")
    return files


# ------------------------------------------------------------------------------------------------------------------- keys


class KeyMaker:
    """Turns source ids into safe, unique sample keys: unsafe characters (dots too) become `_`, repeats get `-1`, `-2`, ..."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._next: Counter[str] = Counter()

    def __call__(self, raw: object) -> str:
        base = _UNSAFE_KEY_CHARS.sub("_", str(raw))[:MAX_KEY_LENGTH] or "sample"
        key = base
        while key in self._seen:
            self._next[base] += 1
            key = f"{base}-{self._next[base]}"
        self._seen.add(key)
        return key


# ----------------------------------------------------------------------------------------------------------------- images


def resolve_image_path(ref: object, images: Path | None, *, allow_absolute: bool, key: str) -> Path:
    """The local file an image reference names, or `SampleError` (`unsafe_path`, `url_not_local`, `missing_image`, `schema`).

    Relative references are taken under `images` and may not contain `..` (symlinked dataset folders inside `images` are
    followed on purpose: LLaVA set-ups link `coco/` etc. into place). `file://` URLs are paths; other URLs are never fetched.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise SampleError("schema", f"image reference must be a non-empty string, got {ref!r}", key)
    if "\x00" in ref:
        raise SampleError("unsafe_path", f"image path {ref!r} contains a NUL byte", key)
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    elif _URL.match(ref):
        raise SampleError("url_not_local", f"{ref} is a URL and no local copy was given (no network)", key)
    parts = PurePosixPath(ref.replace("\\", "/")).parts
    if ".." in parts:
        raise SampleError("unsafe_path", f"image path {ref!r} climbs out with '..'", key)
    if ref.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", ref):
        if not allow_absolute:
            raise SampleError("unsafe_path", f"image path {ref!r} is absolute; give paths relative to --images", key)
        return Path(ref)
    if images is None:
        raise SampleError("missing_image", f"image path {ref!r} is relative but no --images folder was given", key)
    return images / ref


def load_image_bytes(data: bytes, key: str, what: str) -> Image.Image:
    """Decode fully now, as RGB: a truncated or hostile file is a counted `bad_image`, not a crash inside training."""
    if len(data) > MAX_IMAGE_BYTES:
        raise SampleError("bad_image", f"{what} is {len(data)} bytes (limit {MAX_IMAGE_BYTES})", key)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError("bad_image", f"{what} does not decode: {type(e).__name__}: {e}", key) from e


def load_image_file(path: Path, key: str) -> Image.Image:
    """Read a regular file (never a device or folder) and decode it; a missing file is `missing_image`."""
    if not path.is_file():
        raise SampleError("missing_image", f"image file {path} does not exist", key)
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise SampleError("bad_image", f"image file {path} is larger than {MAX_IMAGE_BYTES} bytes", key)
    return load_image_bytes(path.read_bytes(), key, f"image file {path}")


# --------------------------------------------------------------------------------------------------------------- skip log


class ConversionLog:
    """Counts converted and skipped records (and images dropped from kept documents), by reason, with every id in a jsonl file."""

    def __init__(self, root: Path, converter: str, sources: list[Path]):
        self.converter = converter
        self.sources = sources
        self.converted = 0
        self.skipped: Counter[str] = Counter()
        self.dropped_images: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._file = open(root / SKIP_LOG, "w", encoding="utf-8")  # noqa: SIM115 - closed in close(), used across a generator

    def __enter__(self) -> ConversionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _write(self, what: str, record: str, error: SampleError, source: str) -> None:
        row = {"what": what, "record": record, "reason": error.reason, "detail": error.detail, "source": source}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.examples.setdefault(error.reason, [])
        if len(self.examples[error.reason]) < MAX_EXAMPLES:
            self.examples[error.reason].append(record)

    def skip(self, record: str, error: SampleError, source: str = "") -> None:
        """A whole record is not converted."""
        self.skipped[error.reason] += 1
        self._write("record", record, error, source)
        log.debug("skipped %s: %s", record, error)

    def attempt(self, record: str, source: str, build: Callable[..., T], *args: Any) -> T | None:
        """`build(*args)` counted as converted, or None with `record` skipped and logged when it raises `SampleError`."""
        try:
            sample = build(*args)
        except SampleError as e:
            self.skip(record, e, source)
            return None
        self.converted += 1
        return sample

    def drop_image(self, record: str, error: SampleError, source: str = "") -> None:
        """One image of an interleaved document is left out; the rest of the document is kept."""
        self.dropped_images[error.reason] += 1
        self._write("image", record, error, source)

    def report(self) -> dict[str, Any]:
        """The manifest fields describing this conversion."""
        return {
            "converter": self.converter,
            "source": [str(p.resolve()) for p in self.sources]
            if len(self.sources) > 1
            else str(self.sources[0].resolve()),
            "converted": self.converted,
            "skipped": dict(sorted(self.skipped.items())),
            "num_skipped": sum(self.skipped.values()),
            "dropped_images": dict(sorted(self.dropped_images.items())),
            "skipped_examples": {k: v for k, v in sorted(self.examples.items())},
            "skip_log": SKIP_LOG,
        }


def iter_jsonl(path: Path, log_: ConversionLog) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line_number, object)` for each non-blank line; a line that is not a JSON object is skipped as `bad_json`."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                log_.skip(f"{path.name}:{n}", SampleError("bad_json", f"line {n}: {e}"), str(path))
                continue
            if not isinstance(obj, dict):
                log_.skip(f"{path.name}:{n}", SampleError("bad_json", f"line {n} is not an object"), str(path))
                continue
            yield n, obj


def iter_parquet(path: Path, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[tuple[int, dict]]:
    """`(row_number, row)` streamed in small batches, so a 1 GB part file never sits in memory at once."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names]
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        for row in batch.to_pylist():
            yield n, row
            n += 1
