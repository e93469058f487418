"""The LightningDataModule every stage trains from: weighted shard sources -> tokenized, packed (or padded) batches.

Only data choices are configured here (sources and weights, batch, sequence length, packing, workers, seed). The tokenizer,
image transform and image-token count belong to the model, so `setup` hands them over from `trainer.lightning_module` to
`connect` (litgpt's `data.connect(...)`): they are never written twice in YAML and cannot disagree with the model. Every
value is required: a stage that lacks one is an error naming it, never a silent zero.

Exact resume: `TrainStream` is stateful per worker and is served by a `StatefulDataLoader`, whose `state_dict` Lightning 2.6
stores in the checkpoint (`loops.fit_loop.state_dict.combined_loader`) and restores before the first batch of a resumed run.
The stream is infinite; an "epoch" is a window of `batches_per_epoch` batches on it, and `EpochWindowLoader` keeps one
iterator alive across those windows so no epoch boundary restarts or drops anything (workers are never re-spawned, their
prefetched batches never discarded). Every rank sees the same number of batches because every rank's stream is endless.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from visprior.data.packing import Packer, Padder
from visprior.data.shards import read_manifest
from visprior.data.stream import ShardStream, TrainStream
from visprior.data.tokenize import SampleTokenizer
from visprior.training.validation import check_path_exists


@dataclass
class SourceSpec:
    """One dataset folder (with `manifest.json`; its kind comes from there) and its mixture weight."""

    path: str
    weight: float = 1.0
    """Relative share of samples drawn from this source (normalised over all sources)."""
    name: str | None = None
    """Name in logs and skip counters; default: the folder path relative to the common parent of all sources."""


def source_names(sources: list[SourceSpec]) -> list[str]:
    """Unique names: given ones, else the shortest path suffixes that tell the folders apart (`text/web`, `pairs`)."""
    paths = [Path(s.path) for s in sources]
    depth = 1
    while True:
        names = [s.name or "/".join(p.parts[-depth:]) for s, p in zip(sources, paths)]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            break
        depth += 1
    if len(set(names)) != len(names):
        raise ValueError(f"data sources have duplicate names {names}: give each a distinct `name`")
    return names


class EpochWindowLoader(StatefulDataLoader):
    """A `StatefulDataLoader` over an infinite batch stream, seen through epochs of `batches_per_epoch` batches.

    `iter()` yields the next `batches_per_epoch` batches of the live iterator, so a new epoch continues the stream; after
    `load_state_dict` the next `iter()` starts from the restored state as usual.
    """

    def __init__(self, dataset: IterableDataset, batches_per_epoch: int, num_workers: int = 0, **kwargs: Any):
        if num_workers > 0:
            kwargs.setdefault("persistent_workers", True)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self.batches_per_epoch = batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        live = self._iterator is not None and not self._iterator._finished
        if not (live and self.next_iter_state is None and not self._initial_iter_for_state_dict):
            super().__iter__()  # a fresh (or restored) iterator, kept in self._iterator
        return itertools.islice(self._iterator, self.batches_per_epoch)


class FixedBatches(IterableDataset):
    """The first `num_batches` batches of a freshly built stream: the same validation batches every time."""

    def __init__(self, build: Any, num_batches: int):
        self.build = build
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.islice(iter(self.build()), self.num_batches)


def required_from(module: Any, name: str, datamodule: Any) -> Any:
    """`module.<name>`, which the data module needs from the stage; its absence is an error naming both."""
    try:
        return getattr(module, name)
    except AttributeError:
        raise TypeError(
            f"{type(datamodule).__name__} needs `{name}` from the stage, but {type(module).__name__} does not provide it"
        ) from None


def worker_skip_rate(datamodule: Any) -> float | None:
    """The skip-rate threshold a loader worker applies itself: none when the run has a `DataHealthCallback` (which decides
    on every worker's and rank's counts together, on every rank at the same step), else the data module's own."""
    from visprior.training.data_health import DataHealthCallback

    trainer = getattr(datamodule, "_trainer", None) or getattr(datamodule, "trainer", None)
    if trainer is not None and any(isinstance(cb, DataHealthCallback) for cb in trainer.callbacks):
        return None
    return datamodule.max_skip_rate


class FingerprintedData:
    """Data-module checkpoint state: a fingerprint of the data config, refused on resume if it changed."""

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("fingerprint", {}), self.fingerprint()
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if changed:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume the data position exactly, the data config changed: {detail}")


class VisionLanguageDataModule(FingerprintedData, pl.LightningDataModule):
    """Weighted sources of any sample kind -> batches for the stage the trainer runs."""

    def __init__(
        self,
        sources: list[SourceSpec],
        batch_size: int = 8,
        seq_len: int = 256,
        packing: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        batches_per_epoch: int = 1000,
        val_sources: list[SourceSpec] | None = None,
        val_batches: int = 4,
        block_size: int = 64,
        pack_buffer: int = 64,
        max_skip_rate: float = 0.01,
        min_samples_for_skip_rate: int = 200,
    ):
        """
        Args:
            sources: training datasets and their weights, e.g. MM1's 45:45:10 pairs:interleaved:text.
            batch_size: rows per batch on each rank (global batch = batch_size x world size x accumulation).
            seq_len: tokens per row; longer multimodal samples are skipped (`too_long`), longer text is chunked.
            packing: pack several samples per row with per-document attention (text pre-training, SFT) instead of one
                padded sample per row.
            num_workers: loader processes per rank (resume needs the same number).
            seed: shard order, in-shard shuffle and mixture draws.
            batches_per_epoch: length of a Lightning epoch on the infinite stream (the same on every rank).
            val_sources: held-out datasets for validation (fixed batches, same every time); None: no validation.
            val_batches: validation batches per rank.
            block_size: in-shard shuffle block (samples).
            pack_buffer: samples the packer chooses from when filling a row.
            max_skip_rate: a source skipping more than this share of its samples stops the run (a broken dataset),
                counted over every loader worker of every rank (`DataHealthCallback`); a badly broken source stops
                before `min_samples_for_skip_rate` once its rate is clearly above it (see `data_health.should_stop`).
            min_samples_for_skip_rate: samples of a source (all workers, all ranks) before the plain rate applies.
        """
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty: give at least one dataset folder")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.packing = packing
        self.num_workers = num_workers
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.val_sources = list(val_sources or [])
        self.val_batches = val_batches
        self.block_size = block_size
        self.pack_buffer = pack_buffer
        self.max_skip_rate = max_skip_rate
        self.min_samples_for_skip_rate = min_samples_for_skip_rate
        self.tokenizer: Any = None
        self.image_transform: Any = None
        self.num_image_tokens = 0
        self.rank, self.world_size = 0, 1
        self._train_loader: EpochWindowLoader | None = None
        for group, specs in (("sources", self.sources), ("val_sources", self.val_sources)):
            for i, spec in enumerate(specs):  # a missing folder or manifest fails now, naming the key and the path
                read_manifest(check_path_exists(spec.path, f"data.{group}[{i}].path", "dataset"))

    # ------------------------------------------------------------------------------------------------ late binding

    def connect(self, tokenizer: Any, image_transform: Any, num_image_tokens: int) -> None:
        """Take the model's tokenizer, image transform (None for text only) and image-token count (0 for text only)."""
        self.tokenizer, self.image_transform, self.num_image_tokens = tokenizer, image_transform, num_image_tokens

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            module = self.trainer.lightning_module
            names = ("tokenizer", "image_transform", "num_image_tokens")
            self.connect(*(required_from(module, name, self) for name in names))
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.tokenizer is None:
            raise RuntimeError(
                "VisionLanguageDataModule has no tokenizer: run it under a Trainer or call connect() first"
            )

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def build_stream(self, sources: list[SourceSpec], seed: int, packing: bool | None = None) -> TrainStream:
        """A `TrainStream` over `sources` for this rank (workers split it further)."""
        names = source_names(sources)
        streams = {
            name: ShardStream(spec.path, seed=seed, block_size=self.block_size, name=name)
            for name, spec in zip(names, sources)
        }
        transform = SampleTokenizer(self.tokenizer, self.image_transform, self.num_image_tokens, self.seq_len)
        packing = self.packing if packing is None else packing
        builder = Packer(self.seq_len, self.pad_id, self.pack_buffer) if packing else Padder(self.seq_len, self.pad_id)
        return TrainStream(
            streams,
            transform,
            builder,
            self.batch_size,
            weights={name: spec.weight for name, spec in zip(names, sources)},
            pad_id=self.pad_id,
            seed=seed,
            max_skip_rate=worker_skip_rate(self),
            min_samples_for_skip_rate=self.min_samples_for_skip_rate,
            rank=self.rank,
            world_size=self.world_size,
        )

    # ------------------------------------------------------------------------------------------------ loaders

    def train_dataloader(self) -> EpochWindowLoader:
        if self._train_loader is None:
            self._train_loader = EpochWindowLoader(
                self.build_stream(self.sources, self.seed), self.batches_per_epoch, num_workers=self.num_workers
            )
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        dataset = FixedBatches(
            lambda: self.build_stream(self.val_sources, seed=self.seed + 1, packing=False), self.val_batches
        )
        return DataLoader(dataset, batch_size=None)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (the loader state is stored by Lightning itself)."""
        return {
            "sources": [[n, s.path, s.weight] for n, s in zip(source_names(self.sources), self.sources)],
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "world_size": self.world_size,
        }
