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
from collections.abc import Iterable, Iterator
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
    return ".." not in Path(name.replace("\\", "/")).parts


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


def _clean_end(f: BinaryIO, offset: int) -> bool:
    """True when an uncompressed tar ends properly at `offset` (a zero block), not in a cut or garbled header.

    tarfile treats a truncated or invalid header after the first member as a normal end of archive, which would silently drop the
    rest of a shard; this check turns that case into a counted `corrupt_tar`. Compressed tars are trusted as tarfile reads them.
    """
    f.seek(0)
    if f.read(2) == b"\x1f\x8b":
        return True
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


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
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    name = info.name
                    if not is_safe_member(name):
                        raise UnsafeTarMember(shard, name)
                    if not info.isreg() or _META_MEMBER.match(Path(name).name):
                        continue
                    base, _, ext = Path(name).name.partition(".")
                    prefix = str(Path(name).parent / base) if Path(name).parent != Path(".") else base
                    if prefix != key:  # a new key's header proves the previous sample complete: hand it out first
                        if key is not None:
                            yield key, members
                        key, members = prefix, {}
                    members[ext] = tar.extractfile(info).read()
                    tar.members = []  # stream mode keeps every TarInfo otherwise
                if not _clean_end(f, tar.offset):
                    raise tarfile.ReadError(f"archive ends in a truncated or invalid header at byte {tar.offset}")
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
