"""Shard writing and robust reading: round trips of every kind, counted skips, unsafe paths, missing shards, webdataset compat."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from visprior.data.formats import ConversationSample, InterleavedSample, PairSample, TextSample
from visprior.data.shards import (
    SkipCounter,
    UnsafeTarMember,
    iter_samples,
    read_manifest,
    resolve_shards,
    write_shards,
)


def image(seed: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def samples_of(kind: str) -> list:
    if kind == "text":
        return [TextSample(f"t{i}", f"text é {i}", {"category": "web"} if i % 2 else {}) for i in range(5)]
    if kind == "pair":
        return [PairSample(f"p{i}", image(i), f"a caption {i}", {"detailed": f"d{i}"}) for i in range(5)]
    if kind == "interleaved":
        return [
            InterleavedSample(f"d{i}", ["intro", image(i), "middle", image(i + 9), "end"], {"url": str(i)})
            for i in range(4)
        ]
    return [
        ConversationSample(
            f"c{i}",
            [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": f"a {i}"}],
            [image(i)],
            {"id": i},
        )
        for i in range(3)
    ] + [ConversationSample("c9", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "text only"}])]


def same(a, b) -> bool:
    if isinstance(a, Image.Image) or isinstance(b, Image.Image):
        return isinstance(a, Image.Image) and isinstance(b, Image.Image) and np.array_equal(pixels(a), pixels(b))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["text", "pair", "interleaved", "conversation"])
def test_every_kind_round_trips(tmp_path: Path, kind: str) -> None:
    original = samples_of(kind)
    manifest = write_shards(original, tmp_path, name=kind, kind=kind, maxcount=2, seed=11)
    assert manifest["num_samples"] == len(original) and len(manifest["shards"]) == (len(original) + 1) // 2
    counter = SkipCounter()
    back = list(iter_samples(resolve_shards(tmp_path), read_manifest(tmp_path)["kind"], counter))
    assert counter.seen == len(original) and counter.skipped == 0
    assert [s.key for s in back] == [s.key for s in original]
    fields = {
        "text": ("text",),
        "pair": ("image", "text"),
        "interleaved": ("segments",),
        "conversation": ("conversations", "images"),
    }
    for a, b in zip(original, back):
        for f in (*fields[kind], "meta"):
            assert same(getattr(a, f), getattr(b, f)), (kind, a.key, f)


def test_writing_is_byte_reproducible(tmp_path: Path) -> None:
    write_shards(samples_of("pair"), tmp_path / "a", name="p", kind="pair")
    write_shards(samples_of("pair"), tmp_path / "b", name="p", kind="pair")
    assert (tmp_path / "a/p-000000.tar").read_bytes() == (tmp_path / "b/p-000000.tar").read_bytes()


def _rewrite(shard: Path, edit) -> None:
    """Copy a tar member by member through `edit(name, data) -> data`."""
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src:
            data = edit(info.name, src.extractfile(info).read())
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    pairs = [PairSample(f"p{i}", image(i), f"caption {i}", {"i": i}) for i in range(12)]
    write_shards(pairs, tmp_path, name="p", kind="pair", maxcount=6)
    first, second = resolve_shards(tmp_path)

    def damage(name: str, data: bytes) -> bytes:
        if name == "p1.png":
            return data[:30]  # broken PNG
        if name == "p3.json":
            return b'{"i": '  # malformed JSON
        return data

    _rewrite(Path(first), damage)
    raw = Path(second).read_bytes()
    with tarfile.open(second) as t:
        cut = next(i for i in t if i.name == "p9.png").offset_data + 40  # inside p9's image data
    Path(second).write_bytes(raw[:cut])

    counter = SkipCounter()
    keys = [s.key for s in iter_samples([first, second], "pair", counter)]
    assert keys == ["p0", "p2", "p4", "p5", "p6", "p7", "p8"]  # everything before the cut comes out
    assert dict(counter.by_reason) == {"bad_image": 1, "bad_json": 1, "corrupt_tar": 1}
    assert counter.by_shard == {first: 2, second: 1} and counter.seen == 10
    assert "p1" in counter.examples["bad_image"] and second in counter.examples["corrupt_tar"]
    assert "3 skipped" in counter.summary()


def test_truncation_at_a_header_is_not_a_silent_end(tmp_path: Path) -> None:
    write_shards([TextSample(f"t{i}", f"x{i}") for i in range(4)], tmp_path, name="t", kind="text")
    (shard,) = resolve_shards(tmp_path)
    with tarfile.open(shard) as t:
        start = next(i for i in t if i.name == "t2.txt").offset
    Path(shard).write_bytes(Path(shard).read_bytes()[: start + 100])  # cut inside t2's header
    counter = SkipCounter()
    # t1 is dropped too: nothing after it proves it complete
    assert [s.key for s in iter_samples([shard], "text", counter)] == ["t0"]
    assert counter.by_reason == {"corrupt_tar": 1}


@pytest.mark.parametrize("member", ["../evil.txt", "/abs.txt", "a/../../b.txt"])
def test_unsafe_member_paths_are_refused(tmp_path: Path, member: str) -> None:
    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w") as t:
        for name, data in (("ok.txt", b"fine"), (member, b"gotcha")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeTarMember, match=rf"{member!r}.*{shard.name}|{shard.name}.*{member!r}") as err:
        list(iter_samples([str(shard)], "text"))
    assert err.value.reason == "unsafe_path"


def test_missing_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    write_shards(samples_of("text"), tmp_path, name="t", kind="text", maxcount=2)
    gone = tmp_path / "t-000001.tar"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        resolve_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere-000000.tar"):
        list(iter_samples([str(tmp_path / "nowhere-000000.tar")], "text"))


def test_keys_with_dots_are_refused_at_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a.b'"):
        write_shards([TextSample("a.b", "x")], tmp_path, name="t", kind="text")


def test_plain_webdataset_reads_our_shards(tmp_path: Path) -> None:
    write_shards(samples_of("pair"), tmp_path, name="p", kind="pair", maxcount=3)
    ds = wds.WebDataset(resolve_shards(tmp_path), shardshuffle=False).decode("pil")
    got = {s["__key__"]: s for s in ds}
    assert sorted(got) == [f"p{i}" for i in range(5)]
    for original in samples_of("pair"):
        s = got[original.key]
        assert s["txt"] == original.text and s["json"] == original.meta
        assert np.array_equal(pixels(s["png"]), pixels(original.image))


def test_gzipped_shards_read_through_tarfile(tmp_path: Path) -> None:
    write_shards(samples_of("text"), tmp_path, name="t", kind="text")
    (shard,) = resolve_shards(tmp_path)
    packed = gzip.compress(Path(shard).read_bytes(), mtime=0)
    whole, cut = tmp_path / "whole.tar.gz", tmp_path / "cut.tar.gz"
    whole.write_bytes(packed)
    cut.write_bytes(packed[: len(packed) // 2])
    assert [s.text for s in iter_samples([str(whole)], "text")] == [s.text for s in samples_of("text")]
    counter = SkipCounter()
    assert len(list(iter_samples([str(cut)], "text", counter))) < 5
    assert counter.by_reason == {"corrupt_tar": 1}
