"""Labelled images -> `{pixel_values, labels}` batches, from three layouts:

- `pairs`: our pair shards (a folder with `manifest.json`) whose `meta[label_key]` is the class index (the toy shapes);
- `wds_cls`: WebDataset classification shards as the ImageNet / img2dataset convention writes them, an image member
  (`jpg`, `jpeg`, `png`, `webp`) and a `cls` member holding the class index as text (a folder of `.tar`, a glob or a brace
  pattern);
- `imagefolder`: the ImageNet layout `root/<class>/<image>`, classes indexed in sorted folder order (torchvision's
  `ImageFolder` rule); the validation folder uses the training folder's classes.

The training side reuses the language data path's machinery: a `ShardStream` (or `ImageFolderStream`, the same contract over
files: infinite seeded passes, split by rank and worker, position `{pass, offset}`) inside a `TrainStream` whose transform
decodes the image with the stage's `image_transform` (plus DeiT's augmentation when `augment` is set) and reads the label,
and whose row builder passes each sample through unchanged. A sample without a valid label raises
`SampleError("bad_label")`, a counted skip (in `batch["skips"]`, logged by `DataHealthCallback`); more than
`max_skip_rate` of them stops the run as a broken dataset. The image transform and the number of classes are handed over
by the stage (`connect`), as in `VisionLanguageDataModule`.

Validation is one pass over `val` in file order (rank r of W takes samples r, r+W, ...), the last batch possibly short.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from visprior.data.augment import AugmentSpec, TrainAugment
from visprior.data.datamodule import EpochWindowLoader, FingerprintedData, required_from, worker_skip_rate
from visprior.data.formats import IMAGE_EXTENSIONS, SampleError, SampleKind, decode_image
from visprior.data.shards import SkipCounter, iter_samples, iter_shard_members, read_manifest, resolve_shards
from visprior.data.stream import DataQualityError, ShardStream, Split, TrainStream, _permutation, current_split
from visprior.training.validation import check_path_exists

ImageTransform = Callable[[Image.Image], torch.Tensor]
Format = Literal["auto", "pairs", "wds_cls", "imagefolder"]
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list


@dataclass
class LabelledSample:
    """An image with its class index, read from a `cls` member or from its folder (`label=None`: read `meta`)."""

    key: str
    image: Image.Image
    label: int | None
    meta: dict[str, Any] = field(default_factory=dict)


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


def decode_cls_sample(key: str, members: dict[str, bytes]) -> LabelledSample:
    """A WebDataset classification sample: the first image member and the `cls` member (class index as text)."""
    image_members = [m for m in IMAGE_EXTENSIONS if m in members]
    if not image_members:
        raise SampleError("missing_member", f"no image member (one of {IMAGE_EXTENSIONS})", key)
    if "cls" not in members:
        raise SampleError("missing_member", f"no 'cls' member (members: {sorted(members)})", key)
    try:
        text = members["cls"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleError("bad_label", "the 'cls' member is not text", key) from None
    image = decode_image(members[image_members[0]], key, image_members[0])
    return LabelledSample(key, image, None, {"cls": text})


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
        if getattr(sample, "label", None) is not None:
            label = read_label({"label": sample.label}, sample.key, "label", self.num_classes)
        elif "cls" in sample.meta and isinstance(sample, LabelledSample):
            label = read_label(sample.meta, sample.key, "cls", self.num_classes)
        else:
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


# ------------------------------------------------------------------------------------------------ layouts


class ClsShardStream(ShardStream):
    """`ShardStream` over WebDataset classification shards (image + `cls`), which carry no manifest."""

    def __init__(self, shards: str | list[str], **kwargs: Any):
        super().__init__(shards, SampleKind.PAIR, **kwargs)

    def decode(self, key: str, members: dict[str, bytes]) -> LabelledSample:
        return decode_cls_sample(key, members)


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an ImageNet-layout folder: its sub-folders, sorted (torchvision's `ImageFolder` order)."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-folders (expected the ImageNet layout root/<class>/<image>)")
    return classes


def image_folder_files(root: str | os.PathLike, classes: list[str]) -> list[tuple[str, int]]:
    """`(path, label)` of every image under `root/<class>/`, sorted; a class folder unknown to `classes` is an error."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str, int]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if entry.name not in index:
            raise ValueError(f"{root}: class folder {entry.name!r} is not one of the training folder's classes")
        for dirpath, _, names in os.walk(entry.path):
            files.extend(
                (os.path.join(dirpath, n), index[entry.name])
                for n in sorted(names)
                if n.lower().endswith(FOLDER_EXTENSIONS)
            )
    if not files:
        raise FileNotFoundError(f"{root}: no images with extensions {FOLDER_EXTENSIONS} in its class folders")
    return files


def load_folder_image(path: str, label: int, root: str) -> LabelledSample:
    key = os.path.relpath(path, root)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise SampleError("bad_image", f"{type(e).__name__}: {e}", key) from None
    return LabelledSample(key, image, label)


class ImageFolderStream(IterableDataset):
    """Images of an ImageNet-layout folder, forever: pass p visits a permutation seeded by (seed, p), split by (rank,
    worker) by index; the position is `{pass, offset}`, so a resume skips what was handed out without reading it."""

    def __init__(
        self,
        root: str,
        classes: list[str],
        *,
        seed: int = 0,
        name: str = "train",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.root, self.files = root, image_folder_files(root, classes)
        self.seed, self.name, self.rank, self.world_size = seed, name, rank, world_size
        self.counter = SkipCounter()
        self.current_shard = root
        self.quality_check: Callable[[], None] | None = None
        self._pos = {"pass": 0, "offset": 0}
        self._split: Split | None = None

    def __iter__(self) -> Iterator[LabelledSample]:
        split = current_split(self.rank, self.world_size)
        if self._split is not None and self._split != split:
            raise ValueError(
                f"{self.name}: state was saved by split {self._split.index}/{self._split.count}, this reader is "
                f"{split.index}/{split.count}; resume with the same world size and num_workers"
            )
        self._split = split
        return self._samples(split)

    def _samples(self, split: Split) -> Iterator[LabelledSample]:
        while True:
            order = _permutation(len(self.files), self.seed, self._pos["pass"])[split.index :: split.count]
            if not order:
                raise ValueError(f"{self.root}: {len(self.files)} images cannot feed {split.count} readers")
            while self._pos["offset"] < len(order):
                path, label = self.files[order[self._pos["offset"]]]
                self._pos["offset"] += 1
                self.counter.seen += 1
                try:
                    yield load_folder_image(path, label, self.root)
                except SampleError as e:
                    self.counter.skip(e.reason, path, str(e))
                    if self.quality_check is not None:
                        self.quality_check()
            if self.counter.seen and self.counter.seen == self.counter.skipped:
                raise DataQualityError(f"{self.root}: every image of pass {self._pos['pass']} was unreadable")
            self._pos = {"pass": self._pos["pass"] + 1, "offset": 0}

    def state_dict(self) -> dict[str, Any]:
        split = (self._split.index, self._split.count) if self._split else None
        return {**self._pos, "split": split, "num_files": len(self.files), "seed": self.seed,
                "counter": self.counter.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("num_files", len(self.files)), ("seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"{self.name}: checkpoint has {key}={state[key]}, this folder stream has {mine}")
        self._pos = {"pass": int(state["pass"]), "offset": int(state["offset"])}
        self._split = Split(*state["split"]) if state["split"] is not None else None
        self.counter.load_state_dict(state["counter"])


def detect_format(path: str) -> str:
    """`pairs` (a folder with a manifest), `wds_cls` (a folder of .tar or a shard pattern) or `imagefolder`."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").exists():
            return "pairs"
        if any(p.glob("*.tar")) or any(p.glob("*.tar.gz")):
            return "wds_cls"
        if any(d.is_dir() for d in p.iterdir()):
            return "imagefolder"
        raise FileNotFoundError(f"{path}: neither a dataset with manifest.json, nor .tar shards, nor class folders")
    if ".tar" in str(path):
        return "wds_cls"
    raise FileNotFoundError(f"image classification data not found: {path}")


def cls_shards(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return sorted(str(s) for s in p.iterdir() if s.name.endswith((".tar", ".tar.gz")))
    return resolve_shards(path)


def iter_cls_samples(shards: list[str], counter: SkipCounter) -> Iterator[LabelledSample]:
    for shard in shards:
        for key, members in iter_shard_members(shard, counter):
            counter.seen += 1
            try:
                yield decode_cls_sample(key, members)
            except SampleError as e:
                counter.skip(e.reason, shard, str(e))


def iter_folder_samples(root: str, classes: list[str], counter: SkipCounter) -> Iterator[LabelledSample]:
    for path, label in image_folder_files(root, classes):
        counter.seen += 1
        try:
            yield load_folder_image(path, label, root)
        except SampleError as e:
            counter.skip(e.reason, path, str(e))


class ValidationPass(IterableDataset):
    """One in-order pass over `samples(counter)` (this rank's share), in batches; skips are reported once at the end."""

    def __init__(
        self,
        samples: Callable[[SkipCounter], Iterator[Any]],
        transform: LabelledImage,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ):
        self.samples, self.transform, self.batch_size = samples, transform, batch_size
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.counter = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        return itertools.islice(batches, self.max_batches) if self.max_batches is not None else batches

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.counter = SkipCounter()
        rows: list[tuple[torch.Tensor, int]] = []
        for i, sample in enumerate(self.samples(self.counter)):
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
    """Labelled images (pair shards, `cls` shards or an ImageNet folder) -> shuffled endless training batches and one
    in-order validation pass."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        format: Format = "auto",
        label_key: str = "label",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        batches_per_epoch: int = 100,
        val_batches: int | None = None,
        block_size: int = 64,
        max_skip_rate: float = 0.01,
        augment: AugmentSpec | None = None,
    ):
        """
        Args:
            train: training data: a pair-shard folder (`meta[label_key]` = class), `cls` shards (folder of .tar, glob or
                brace pattern) or an ImageNet-layout folder `root/<class>/<image>`.
            val: held-out data in the same format, read once in order per validation; None: no validation.
            format: `auto` (from what `train` holds), `pairs`, `wds_cls` or `imagefolder`.
            label_key: the meta field holding the class index (pair shards).
            batch_size: images per batch on each rank.
            num_workers: loader processes per rank (resume needs the same number).
            seed: shard / file order and in-shard shuffle.
            batches_per_epoch: length of a Lightning epoch on the infinite stream.
            val_batches: cap on validation batches per rank (None: the whole pass).
            block_size: in-shard shuffle block (samples).
            max_skip_rate: a share of unusable samples above this stops the run (a broken dataset).
            augment: DeiT's per-image training augmentation (random resized crop, flip, RandAugment, random erasing);
                None: the tower's preprocessing only.
        """
        super().__init__()
        if format not in ("auto", "pairs", "wds_cls", "imagefolder"):
            raise ValueError(f"format must be auto, pairs, wds_cls or imagefolder, got {format!r}")
        if format == "auto" and ".tar" not in str(train):  # a folder (a shard pattern names no single path)
            check_path_exists(train, "data.train", "dir")
        self.format = detect_format(train) if format == "auto" else format
        for key, path in (("data.train", train), ("data.val", val)):  # what is missing fails now, naming key and path
            if path is not None and self.format == "pairs":
                kind = read_manifest(check_path_exists(path, key, "dataset"))["kind"]
                if kind != SampleKind.PAIR.value:
                    raise ValueError(f"{key}: {path} holds {kind} samples; image classification reads pair samples")
            elif path is not None and self.format == "wds_cls":
                cls_shards(path)  # missing shards fail now, naming them
            elif path is not None:
                check_path_exists(path, key, "dir")
        self.classes = image_folder_classes(train) if self.format == "imagefolder" else None
        self.train, self.val, self.label_key = train, val, label_key
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.block_size, self.max_skip_rate = block_size, max_skip_rate
        self.augment = augment
        self.image_transform: ImageTransform | None = None
        self.num_classes: int | None = None
        self.rank, self.world_size = 0, 1
        self._train_loader: EpochWindowLoader | None = None

    def connect(self, image_transform: ImageTransform, num_classes: int | None) -> None:
        """Take the model's image transform and class count (called by `setup`, or by hand)."""
        if self.classes is not None and num_classes is not None and len(self.classes) != num_classes:
            raise ValueError(
                f"{self.train} has {len(self.classes)} class folders but the model has num_classes={num_classes}"
            )
        self.image_transform, self.num_classes = image_transform, num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            module = self.trainer.lightning_module
            self.connect(required_from(module, "image_transform", self), required_from(module, "num_classes", self))
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.image_transform is None:
            raise RuntimeError(
                "ImageClassificationDataModule has no image transform: run it under a Trainer or call connect() first"
            )

    def transform(self, train: bool = False) -> LabelledImage:
        assert self.image_transform is not None, "call connect() or setup() first"
        image_transform = self.image_transform
        if train and self.augment is not None:
            image_transform = TrainAugment(self.augment, image_transform)
        return LabelledImage(image_transform, self.label_key, self.num_classes)

    def build_stream(self) -> TrainStream:
        if self.format == "imagefolder":
            assert self.classes is not None
            stream: Any = ImageFolderStream(self.train, self.classes, seed=self.seed, name="train")
        elif self.format == "wds_cls":
            stream = ClsShardStream(cls_shards(self.train), seed=self.seed, block_size=self.block_size, name="train")
        else:
            stream = ShardStream(self.train, seed=self.seed, block_size=self.block_size, name="train")
        return TrainStream(
            {"train": stream},
            self.transform(train=True),
            PassThrough(),
            self.batch_size,
            collate=collate_labelled,
            seed=self.seed,
            max_skip_rate=worker_skip_rate(self),
            rank=self.rank,
            world_size=self.world_size,
        )

    def train_dataloader(self) -> EpochWindowLoader:
        if self._train_loader is None:
            self._train_loader = EpochWindowLoader(
                self.build_stream(), self.batches_per_epoch, num_workers=self.num_workers
            )
        return self._train_loader

    def val_samples(self) -> Callable[[SkipCounter], Iterator[Any]]:
        val = self.val
        assert val is not None
        if self.format == "imagefolder":
            classes = self.classes or []
            return lambda counter: iter_folder_samples(val, classes, counter)
        if self.format == "wds_cls":
            shards = cls_shards(val)
            return lambda counter: iter_cls_samples(shards, counter)
        shards = resolve_shards(val)
        return lambda counter: iter_samples(shards, SampleKind.PAIR, counter)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        dataset = ValidationPass(
            self.val_samples(), self.transform(), self.batch_size, self.rank, self.world_size, self.val_batches
        )
        return DataLoader(dataset, batch_size=None)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (the loader state is stored by Lightning itself)."""
        return {
            "train": self.train,
            "format": self.format,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "block_size": self.block_size,
            "world_size": self.world_size,
        }
