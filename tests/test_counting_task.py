"""The counting task (visprior/data/toyworld/counting.py): toy-world scenes labelled by object count, as `cls` shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from visprior.data.shards import SkipCounter, iter_shard_members, resolve_shards
from visprior.data.toyworld.counting import write_counting_task


def test_scenes_are_labelled_by_their_object_count(toyworld_dir: Path, tmp_path: Path) -> None:
    summary = write_counting_task(toyworld_dir / "pairs", tmp_path, train=20, test=10)
    assert (summary["train"], summary["test"]) == (20, 10) and summary["num_classes"] == 4  # smoke: 1..4 objects
    counts = [len(json.loads(m["json"])["objects"]) for _, m in
              (x for s in resolve_shards(str(toyworld_dir / "pairs")) for x in iter_shard_members(s, SkipCounter()))]  # fmt: skip
    labels = []
    for split in ("train", "test"):
        for shard in sorted((tmp_path / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    assert labels == [c - 1 for c in counts[:30]]  # in order: train first, then test, nothing skipped


def test_the_data_module_reads_the_counting_shards(toyworld_dir: Path, tmp_path: Path) -> None:
    from visprior.data.classification import ImageClassificationDataModule

    write_counting_task(toyworld_dir / "pairs", tmp_path, train=16, test=8)
    data = ImageClassificationDataModule(str(tmp_path / "train"), str(tmp_path / "test"), batch_size=4)
    assert data.format == "wds_cls"


def test_too_few_scenes_is_a_clear_error(toyworld_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scenes, asked for"):
        write_counting_task(toyworld_dir / "pairs", tmp_path, train=10_000, test=10)
