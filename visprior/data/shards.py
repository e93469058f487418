"""Writing and reading WebDataset shards, their manifests, and the skip-and-count policy for bad samples.

Writing goes through `webdataset.ShardWriter` with a fixed mtime, so the same samples give the same bytes. Reading walks each
tar with `webdataset.tar_file_iterator` (no pickle/torch decoders: members are decoded by `formats.decode_sample` only), refuses
members whose names are absolute or climb out with `..`, and turns every bad sample into a counted skip instead of a crash.
A shard that does not exist is an error that names it: that is a broken dataset, not noise.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds

from visprior.data.formats import SCHEMA_VERSION, Sample, SampleError, SampleKind, decode_sample, encode_sample

MANIFEST = "manifest.json"
_META_MEMBER = re.compile(r"^__[^/]*__$")  # webdataset-style metadata members, never sample data


class UnsafeTarMember(SampleError):
    def __init__(self, shard: str, member: str):
        super().__init__("unsafe_path", f"tar member {member!r} in {shard} is absolute or leaves the archive")


def is_safe_member(name: str) -> bool:
    """Tar members must be relative and stay inside the archive (no `/abs`, no `a/../../b`)."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in name.replace("\\", "/").split("/")


# ------------------------------------------------------------------------------------------------------------------ write


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    name: str,
    kind: SampleKind | str,
    maxcount: int = 1000,
    image_format: str = "png",
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` as `{out_dir}/{name}-000000.tar, ...` plus `manifest.json`; return the manifest.

    The manifest records the kind, schema version, per-shard counts, the seed that generated the data (if any) and `extra`.
    """
    kind = SampleKind(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}-*.tar"):
        old.unlink()
    counts: Counter[str] = Counter()
    pattern = str(out / f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, encoder=False, mtime=0.0) as sink:
        for sample in samples:
            if sample.kind is not kind:
                raise TypeError(f"dataset {name!r} is {kind.value}, got a {sample.kind.value} sample {sample.key!r}")
            if not sample.key or "." in sample.key or not is_safe_member(sample.key):
                raise ValueError(
                    f"sample key {sample.key!r} in {name!r}: keys must be non-empty, relative and dot-free "
                    "(WebDataset splits member names at the first dot)"
                )
            members = encode_sample(sample, image_format=image_format)
            sink.write({"__key__": sample.key, **members})
            counts[Path(sink.fname).name] += 1
    shards = sorted(counts)
    manifest = {
        "name": name,
        "kind": kind.value,
        "schema_version": SCHEMA_VERSION,
        "num_samples": sum(counts.values()),
        "shards": [{"path": s, "num_samples": counts[s]} for s in shards],
        "seed": seed,
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read `manifest.json` of a dataset folder (or the file itself), with shard paths made absolute."""
    p = Path(path)
    mfile = p / MANIFEST if p.is_dir() else p
    if not mfile.exists():
        raise FileNotFoundError(
            f"no {MANIFEST} in {p}: is this a visprior dataset folder? (see `visprior data --help`)"
        )
    manifest = json.loads(mfile.read_text())
    for s in manifest["shards"]:
        s["path"] = str((mfile.parent / s["path"]).resolve())
    return manifest


def resolve_shards(spec: str | os.PathLike | list[str]) -> list[str]:
    """Shard paths from a dataset folder (its manifest), a glob / brace pattern, or an explicit list. Missing ones raise."""
    if isinstance(spec, (list, tuple)):
        paths = [str(s) for s in spec]
    elif Path(spec).is_dir() or str(spec).endswith(MANIFEST):
        paths = [s["path"] for s in read_manifest(spec)["shards"]]
    else:
        paths = sorted(p for pat in wds.shardlists.expand_urls(str(spec)) for p in (glob.glob(pat) or [pat]))
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if not paths:
        raise FileNotFoundError(f"no shards match {spec}")
    return paths


# ------------------------------------------------------------------------------------------------------------------- read


@dataclass
class SkipCounter:
    """Counts of skipped samples by reason and by shard; `seen` counts every sample looked at (good or bad)."""

    seen: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_shard: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, reason: str, shard: str, detail: str) -> None:
        self.by_reason[reason] += 1
        self.by_shard[shard] += 1
        self.examples.setdefault(reason, f"{shard}: {detail}")

    def merge(self, other: SkipCounter) -> None:
        self.seen += other.seen
        self.by_reason.update(other.by_reason)
        self.by_shard.update(other.by_shard)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "by_reason": dict(self.by_reason),
            "by_shard": dict(self.by_shard),
            "examples": dict(self.examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.by_reason = Counter(state["by_reason"])
        self.by_shard = Counter(state["by_shard"])
        self.examples = dict(state["examples"])

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.seen} samples read, none skipped"
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.by_reason.items()))
        return f"{self.seen} samples read, {self.skipped} skipped ({reasons})"


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
_REGULAR_TYPES = (b"0", b"\0", b"7")
_TarEntry = tuple[
    str, bool, Callable[[], bytes]
]  # name, is a regular file, read its data (at most once, before moving on)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _plain_tar_entries(f: BinaryIO) -> Iterator[_TarEntry]:
    """Entries of an uncompressed tar (ustar, pax, GNU long names), about 5x faster than `tarfile` in stream mode.

    Unlike `tarfile`, a cut or garbled header anywhere is an error (`tarfile` treats it as a normal end and silently drops the
    rest of the shard); only a zero block ends the archive.
    """
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        at = f.tell()
        header = f.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"archive cut at byte {at + len(header)}: no end-of-archive block")
        if not any(header):
            return
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError(f"bad header checksum at byte {at}")
        size, kind = _octal(header[124:136]), header[156:157]
        padding = -size % tarfile.BLOCKSIZE
        if kind in (b"x", b"g", b"L"):
            data = f.read(size)
            if len(data) < size:
                raise tarfile.ReadError(f"archive cut inside the extended header at byte {at}")
            f.seek(padding, 1)
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if b"size" in pax:
            size = int(pax[b"size"])
            padding = -size % tarfile.BLOCKSIZE
        path = pax[b"path"].decode("utf-8", "surrogateescape") if b"path" in pax else long_name
        path = path if path is not None else name.decode("utf-8", "surrogateescape")
        long_name, pax = None, {}
        consumed = False

        def read(size: int = size, at: int = at, path: str = path) -> bytes:
            nonlocal consumed
            consumed = True
            data = f.read(size)
            if len(data) < size:
                raise tarfile.ReadError(f"archive cut inside member {path!r} (header at byte {at})")
            return data

        yield path, kind in _REGULAR_TYPES, read
        f.seek(padding if consumed else size + padding, 1)


def _tarfile_entries(f: BinaryIO) -> Iterator[_TarEntry]:
    """Entries of a compressed tar through `tarfile` (stream mode, so no seeking in the decompressed stream)."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            yield info.name, info.isreg(), lambda info=info: tar.extractfile(info).read()
            tar.members = []  # stream mode keeps every TarInfo otherwise


def iter_shard_members(shard: str, counter: SkipCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, members)` of one shard in file order, raw (nothing decoded).

    A corrupt or truncated tar yields the complete samples before the damage and counts one `corrupt_tar` skip for the sample
    being read when it broke (its members cannot be trusted). Unsafe member names raise `UnsafeTarMember`.
    """
    if not Path(shard).exists():
        raise FileNotFoundError(f"shard not found: {shard}")
    key: str | None = None
    members: dict[str, bytes] = {}
    with open(shard, "rb") as f:
        try:
            compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
            f.seek(0)
            for name, regular, read in _tarfile_entries(f) if compressed else _plain_tar_entries(f):
                if not is_safe_member(name):
                    raise UnsafeTarMember(shard, name)
                folder, _, basename = name.rpartition("/")  # string ops: pathlib costs more than the tar parsing here
                if not regular or _META_MEMBER.match(basename):
                    continue
                base, _, ext = basename.partition(".")
                prefix = f"{folder}/{base}" if folder else base
                if prefix != key:  # a new key's header proves the previous sample complete: hand it out first
                    if key is not None:
                        yield key, members
                    key, members = prefix, {}
                members[ext] = read()
        except UnsafeTarMember:
            raise  # a ValueError too, but a hostile archive is refused, not skipped
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            counter.seen += 1
            counter.skip("corrupt_tar", shard, f"{type(e).__name__}: {e}")
            return
    if key is not None:
        yield key, members


def iter_samples(shards: list[str], kind: SampleKind | str, counter: SkipCounter | None = None) -> Iterator[Sample]:
    """Decoded, validated samples from `shards` in order; bad ones are skipped and counted in `counter`."""
    counter = counter if counter is not None else SkipCounter()
    for shard in shards:
        for key, members in iter_shard_members(shard, counter):
            counter.seen += 1
            try:
                yield decode_sample(kind, key, members)
            except SampleError as e:
                counter.skip(e.reason, shard, str(e))
