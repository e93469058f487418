"""Labelled images (pair shards whose `meta` holds an integer class) -> `{pixel_values, labels}` batches.

The training side reuses the language data path's machinery: one `ShardStream` (infinite, seeded pass order and in-shard
block shuffle, split by rank and worker, resumable) inside a `TrainStream` whose transform decodes the image with the
stage's own `image_transform` and reads the label, and whose row builder passes each sample through unchanged. A sample
without a valid label raises `SampleError("bad_label")` in the transform, which the stream turns into a counted skip (in
`batch["skips"]`, so `DataHealthCallback` logs it); more than `max_skip_rate` of them stops the run as a broken dataset.
The image transform and the number of classes come from the model (`connect`), as in `VisionLanguageDataModule`.

Validation is one pass over `val` in file order (rank r of W takes samples r, r+W, ...), the last batch possibly short.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from visprior.data.datamodule import EpochWindowLoader, FingerprintedData
from visprior.data.formats import SampleError, SampleKind
from visprior.data.shards import SkipCounter, iter_samples, read_manifest, resolve_shards
from visprior.data.stream import ShardStream, TrainStream

ImageTransform = Callable[[Image.Image], torch.Tensor]


def read_label(meta: dict[str, Any], key: str, label_key: str, num_classes: int | None) -> int:
    """`meta[label_key]` as a class index; anything else (missing, not an integer, out of range) is a `SampleError`."""
    if label_key not in meta:
        raise SampleError("bad_label", f"no {label_key!r} in meta (keys {sorted(meta)})", key=key)
    value = meta[label_key]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SampleError("bad_label", f"{label_key}={value!r} is not an integer", key=key)
    try:
        label = int(value)
    except ValueError:
        raise SampleError("bad_label", f"{label_key}={value!r} is not an integer", key=key) from None
    if label != value and str(label) != str(value).strip():
        raise SampleError("bad_label", f"{label_key}={value!r} is not an integer", key=key)
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError("bad_label", f"{label_key}={label} outside 0..{num_classes - 1}", key=key)
    return label


class LabelledImage:
    """Sample -> `[(pixels [C, H, W], label)]`; picklable for loader workers."""

    def __init__(self, image_transform: ImageTransform, label_key: str = "label", num_classes: int | None = None):
        self.image_transform = image_transform
        self.label_key = label_key
        self.num_classes = num_classes

    def __call__(self, sample: Any) -> list[tuple[torch.Tensor, int]]:
        image = getattr(sample, "image", None)
        if image is None:
            raise SampleError("no_image", f"a {sample.kind.value} sample has no single image", key=sample.key)
        label = read_label(sample.meta, sample.key, self.label_key, self.num_classes)
        return [(self.image_transform(image), label)]


class PassThrough:
    """Row builder: every labelled image is a row of its own (nothing to pack, no state)."""

    def push(self, item: Any) -> list[Any]:
        return [item]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def collate_labelled(rows: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([r[0] for r in rows]),  # [B, C, H, W]
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.long),  # [B]
    }


class ValidationPass(IterableDataset):
    """One in-order pass over `shards` (this rank's share), in batches; skips are counted and reported once at the end."""

    def __init__(
        self,
        shards: list[str],
        transform: LabelledImage,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.counter = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        return itertools.islice(batches, self.max_batches) if self.max_batches is not None else batches

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.counter = SkipCounter()
        rows: list[tuple[torch.Tensor, int]] = []
        samples = iter_samples(self.shards, SampleKind.PAIR, self.counter)
        for i, sample in enumerate(samples):
            if i % self.world_size != self.rank:
                continue
            try:
                rows.extend(self.transform(sample))
            except SampleError as e:
                self.counter.skip(e.reason, "val", str(e))
            if len(rows) == self.batch_size:
                yield collate_labelled(rows)
                rows = []
        if rows:
            yield collate_labelled(rows)
        if self.counter.skipped:
            warnings.warn(f"validation data: {self.counter.summary()}; e.g. {self.counter.examples}", stacklevel=2)


class ImageClassificationDataModule(FingerprintedData, pl.LightningDataModule):
    """Shard folder of labelled images -> shuffled endless training batches and one in-order validation pass."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        label_key: str = "label",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        batches_per_epoch: int = 100,
        val_batches: int | None = None,
        block_size: int = 64,
        max_skip_rate: float = 0.01,
    ):
        """
        Args:
            train: dataset folder of pair samples whose `meta[label_key]` is the class index.
            val: held-out folder, read once in order per validation; None: no validation.
            label_key: the meta field holding the class index.
            batch_size: images per batch on each rank.
            num_workers: loader processes per rank (resume needs the same number).
            seed: shard order and in-shard shuffle.
            batches_per_epoch: length of a Lightning epoch on the infinite stream.
            val_batches: cap on validation batches per rank (None: the whole pass).
            block_size: in-shard shuffle block (samples).
            max_skip_rate: a share of unusable samples above this stops the run (a broken dataset).
        """
        super().__init__()
        for path in (train, val):
            if path is not None:
                kind = read_manifest(path)["kind"]  # a missing folder or manifest fails now, naming the path
                if kind != SampleKind.PAIR.value:
                    raise ValueError(f"{path} holds {kind} samples; image classification reads pair samples")
        self.train, self.val, self.label_key = train, val, label_key
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.block_size, self.max_skip_rate = block_size, max_skip_rate
        self.image_transform: ImageTransform | None = None
        self.num_classes: int | None = None
        self.rank, self.world_size = 0, 1
        self._train_loader: EpochWindowLoader | None = None

    def connect(self, image_transform: ImageTransform, num_classes: int | None = None) -> None:
        """Take the model's image transform and class count (called by `setup`, or by hand)."""
        self.image_transform, self.num_classes = image_transform, num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            module = self.trainer.lightning_module
            self.connect(getattr(module, "image_transform", None), getattr(module, "num_classes", None))
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.image_transform is None:
            raise RuntimeError(
                "ImageClassificationDataModule has no image transform: run it under a Trainer or call connect() first"
            )

    def transform(self) -> LabelledImage:
        assert self.image_transform is not None, "call connect() or setup() first"
        return LabelledImage(self.image_transform, self.label_key, self.num_classes)

    def build_stream(self) -> TrainStream:
        stream = ShardStream(self.train, seed=self.seed, block_size=self.block_size, name="train")
        return TrainStream(
            {"train": stream},
            self.transform(),
            PassThrough(),
            self.batch_size,
            collate=collate_labelled,
            seed=self.seed,
            max_skip_rate=self.max_skip_rate,
            rank=self.rank,
            world_size=self.world_size,
        )

    def train_dataloader(self) -> EpochWindowLoader:
        if self._train_loader is None:
            self._train_loader = EpochWindowLoader(
                self.build_stream(), self.batches_per_epoch, num_workers=self.num_workers
            )
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        dataset = ValidationPass(
            resolve_shards(self.val), self.transform(), self.batch_size, self.rank, self.world_size, self.val_batches
        )
        return DataLoader(dataset, batch_size=None)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (the loader state is stored by Lightning itself)."""
        return {
            "train": self.train,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "block_size": self.block_size,
            "world_size": self.world_size,
        }

