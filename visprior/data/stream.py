"""Infinite, split, resumable sample streams and the training dataset that turns them into batches.

`ShardStream` reads one dataset forever in passes. Pass p visits the shards in a permutation seeded by (seed, p) and shuffles
samples inside aligned blocks of `block_size` with a generator seeded by (seed, p, shard, block), so its whole position is three
integers: resuming re-reads the shard's raw members up to the block (no image decode), regenerates the block's permutation and
skips what was already handed out; no shuffle buffer goes into the checkpoint. Streams are split across (rank, worker): by shard
when there are at least as many shards as splits, otherwise by sample index modulo the number of splits.

`TrainStream` draws sources with a seeded `Mixture`, tokenizes (a `SampleError` is a counted skip), feeds a row builder
(`packing.Packer` / `Padder`) and yields whole batches, each with the skips since the worker's previous batch. Use it with
`StatefulDataLoader(ds, batch_size=None, num_workers=W)`: torchdata calls `load_state_dict` on each worker's copy before `iter`
and `state_dict` after every batch, so the loader's state is the exact data position. Streams never end, so every rank yields
as many batches as asked for; an epoch is a fixed number of batches chosen by the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import os
import random
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from visprior.data.formats import Sample, SampleError, SampleKind, decode_sample
from visprior.data.mixture import Mixture
from visprior.data.shards import SkipCounter, iter_shard_members, read_manifest, resolve_shards


class DataQualityError(RuntimeError):
    """Too many samples of a source are unusable: the data is broken, training on the rest would be silently biased."""


class RowBuilder(Protocol):
    def push(self, sample: Any) -> list[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Split:
    """This reader's share of the data: `index` in `0..count-1`, with `count = world_size * num_workers`."""

    index: int
    count: int


def current_split(rank: int | None = None, world_size: int | None = None) -> Split:
    """(rank, worker) of the calling process; rank/world from torch.distributed when initialised unless given explicitly."""
    if rank is None or world_size is None:
        dist = torch.distributed
        live = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if live else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if live else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Split(rank * workers + worker, world_size * workers)


class ShardStream(IterableDataset):
    """Decoded samples of one dataset, forever, shuffled per pass, split by (rank, worker), resumable from `state_dict`.

    Iterating again continues where the stream stopped (it is infinite); bad samples are skipped and counted in `counter`.
    """

    def __init__(
        self,
        shards: str | os.PathLike | list[str],
        kind: SampleKind | str | None = None,
        *,
        seed: int = 0,
        block_size: int = 64,
        name: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        manifest = read_manifest(shards) if _is_dataset(shards) else None
        if kind is None and manifest is None:
            raise ValueError(f"kind is required for shards without a manifest: {shards}")
        self.kind = SampleKind(kind if kind is not None else manifest["kind"])
        self.shards = resolve_shards(shards)
        self.name = name or (manifest["name"] if manifest else Path(self.shards[0]).parent.name)
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.seed, self.block_size = seed, block_size
        self.rank, self.world_size = rank, world_size
        self.counter = SkipCounter()
        self.current_shard = ""
        self.quality_check: Callable[[], None] | None = None
        self._pos = {"pass": 0, "shard": 0, "offset": 0, "base": 0}
        self._split: Split | None = None

    # ---------------------------------------------------------------------------------------------------------- order

    def plan(self, pass_index: int, split: Split) -> tuple[list[int], int | None]:
        """Shard indices this split reads in `pass_index`, and the sample modulo it keeps (None: every sample)."""
        perm = _permutation(len(self.shards), self.seed, pass_index)
        if len(self.shards) >= split.count:
            return perm[split.index :: split.count], None
        return perm, split.index

    def _selected(
        self, path: str, modulo: int | None, split: Split, base: int, corrupt: SkipCounter, total: list[int]
    ) -> Iterator[tuple[str, dict]]:
        """Raw members of this split's samples in `path`; `base` is the pass's sample count before this shard.

        A broken tar's skip is kept only by the split owning the broken sample; `total` gets the shard's sample count.
        """
        raw = SkipCounter()
        n = 0
        for n, item in enumerate(iter_shard_members(path, raw), start=1):
            if modulo is None or (base + n - 1) % split.count == modulo:
                yield item
        if raw.skipped:
            n += 1
            if modulo is None or (base + n - 1) % split.count == modulo:
                corrupt.merge(raw)
        total.append(n)

    # ---------------------------------------------------------------------------------------------------------- iterate

    def __iter__(self) -> Iterator[Sample]:
        split = current_split(self.rank, self.world_size)
        if self._split is not None and self._split != split:
            raise ValueError(
                f"{self.name}: state was saved by split {self._split.index}/{self._split.count}, this reader is "
                f"{split.index}/{split.count}; resume with the same world size and num_workers"
            )
        self._split = split
        return self._samples(split)

    def _samples(self, split: Split) -> Iterator[Sample]:
        while True:
            p = self._pos
            fresh_pass = p["shard"] == 0 and p["offset"] == 0
            seen0, skipped0 = self.counter.seen, self.counter.skipped
            shard_ids, modulo = self.plan(p["pass"], split)
            while p["shard"] < len(shard_ids):
                size = yield from self._shard_samples(shard_ids[p["shard"]], modulo, split)
                p["shard"], p["offset"], p["base"] = p["shard"] + 1, 0, p["base"] + size
            if fresh_pass:
                self._check_pass(split, self.counter.seen - seen0, self.counter.skipped - skipped0)
            p["pass"], p["shard"], p["base"] = p["pass"] + 1, 0, 0

    def _check_pass(self, split: Split, seen: int, skipped: int) -> None:
        where = f"dataset {self.name!r} (split {split.index}/{split.count}, {len(self.shards)} shards)"
        if seen == 0:
            raise ValueError(f"{where} has no samples for this reader in pass {self._pos['pass']}")
        if seen == skipped:
            raise DataQualityError(
                f"{where}: every sample of pass {self._pos['pass']} was skipped; {self.counter.summary()}"
            )

    def _shard_samples(self, shard_id: int, modulo: int | None, split: Split) -> Generator[Sample, None, int]:
        """This split's decoded samples of one shard, block-shuffled, from the saved offset; returns the shard's size."""
        path = self.shards[shard_id]
        self.current_shard = path
        k, p = self.block_size, self._pos
        corrupt, total = SkipCounter(), []
        raw = self._selected(path, modulo, split, p["base"], corrupt, total)
        block_index, skip = divmod(p["offset"], k)
        for _ in itertools.islice(raw, block_index * k):  # fast-forward: raw bytes only, nothing decoded
            pass
        while True:
            block = list(itertools.islice(raw, k))
            if (
                corrupt.skipped
            ):  # the tar broke while reading this block: count it unless it was counted before a resume
                if skip == 0:
                    self.counter.merge(corrupt)
                    self._on_skip()
                corrupt = SkipCounter()
            order = _permutation(len(block), self.seed, p["pass"], shard_id, block_index)
            for j in order[skip:]:
                key, members = block[j]
                p["offset"] += 1
                self.counter.seen += 1
                try:
                    sample = self.decode(key, members)
                except SampleError as e:
                    self.counter.skip(e.reason, path, str(e))
                    self._on_skip()
                    continue
                yield sample
            if len(block) < k:
                return total[0]
            skip, block_index = 0, block_index + 1

    def decode(self, key: str, members: dict[str, bytes]) -> Any:
        """One sample from its raw members (a `SampleError` is a counted skip); subclasses read other layouts."""
        return decode_sample(self.kind, key, members)

    def _on_skip(self) -> None:
        if self.quality_check is not None:
            self.quality_check()

    # ---------------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._pos,
            "split": dataclasses.astuple(self._split) if self._split else None,
            "num_shards": len(self.shards),
            "block_size": self.block_size,
            "seed": self.seed,
            "counter": self.counter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field, mine in (("num_shards", len(self.shards)), ("block_size", self.block_size), ("seed", self.seed)):
            if state[field] != mine:
                raise ValueError(f"{self.name}: checkpoint has {field}={state[field]}, this stream has {mine}")
        self._pos = {k: int(state[k]) for k in ("pass", "shard", "offset", "base")}
        self._split = Split(*state["split"]) if state["split"] is not None else None
        self.counter.load_state_dict(state["counter"])


def _permutation(n: int, *seed: int) -> list[int]:
    """A permutation of range(n) fixed by `seed`: a string seed is hashed with SHA-512, the same in every process and run."""
    order = list(range(n))
    random.Random("/".join(map(str, seed))).shuffle(order)
    return order


def _snapshot(counter: SkipCounter | None) -> dict[str, Any]:
    """What a worker has already reported of a source's counter."""
    if counter is None:
        return {"seen": 0, "by_reason": {}, "by_shard": {}, "examples": []}
    return {"seen": counter.seen, "by_reason": dict(counter.by_reason), "by_shard": dict(counter.by_shard),
            "examples": sorted(counter.examples)}  # fmt: skip


def _snapshot_from_state(state: dict[str, Any]) -> dict[str, Any]:
    if "by_reason" not in state:  # checkpoints before `reads`: only the reason counts were recorded
        return {**_snapshot(None), "by_reason": dict(state)}
    return {**_snapshot(None), **state}


def _is_dataset(spec: Any) -> bool:
    return not isinstance(spec, (list, tuple)) and (Path(spec).is_dir() or str(spec).endswith("manifest.json"))


# -------------------------------------------------------------------------------------------------------- rows in state


def _row_to_state(row: Any) -> Any:
    """Rows are dataclasses (`packing.Row`): store their class path and fields so the checkpoint holds plain data."""
    if dataclasses.is_dataclass(row):
        cls = type(row)
        fields = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
        return {"row_class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    return row


def _row_from_state(state: Any) -> Any:
    if isinstance(state, dict) and "row_class" in state:
        module, _, qualname = state["row_class"].partition(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**state["fields"])
    return state


def _default_collate(pad_id: int) -> Callable[[list[Any]], dict[str, Any]]:
    from visprior.data.packing import collate_rows

    return partial(collate_rows, pad_id=pad_id)


# ------------------------------------------------------------------------------------------------------------ training


class TrainStream(IterableDataset):
    """Batches from several weighted sources: mixture -> transform -> row builder -> collate, resumable per worker.

    Each batch dict also holds `skips: {source: {reason: count}}` and `reads: {source: {seen, shards, examples}}`, what this
    worker read and skipped since its previous batch. With `max_skip_rate` set, a source whose skip rate in this reader
    exceeds it after `min_samples_for_skip_rate` samples raises `DataQualityError`; the data modules switch that off when
    the run has a `DataHealthCallback`, which decides on the counts of every worker of every rank at once.
    """

    def __init__(
        self,
        sources: Mapping[str, ShardStream],
        transform: Callable[[Sample], list[Any]],
        row_builder: RowBuilder,
        batch_size: int,
        *,
        weights: Mapping[str, float] | None = None,
        collate: Callable[[list[Any]], dict[str, Any]] | None = None,
        pad_id: int = 0,
        seed: int = 0,
        max_skip_rate: float | None = 0.01,
        min_samples_for_skip_rate: int = 200,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sources = dict(sources)
        self.weights = dict(weights) if weights is not None else dict.fromkeys(self.sources, 1.0)
        if set(self.weights) != set(self.sources):
            raise ValueError(f"weights name {sorted(self.weights)} but sources are {sorted(self.sources)}")
        Mixture(self.weights)  # validate now, not in a worker
        self.transform, self.row_builder, self.batch_size = transform, row_builder, batch_size
        self.collate = collate if collate is not None else _default_collate(pad_id)
        self.seed = seed
        self.max_skip_rate, self.min_samples_for_skip_rate = max_skip_rate, min_samples_for_skip_rate
        self.rank, self.world_size = rank, world_size
        for name, stream in self.sources.items():
            if rank is not None or world_size is not None:  # an explicit split applies to every source alike
                stream.rank, stream.world_size = rank, world_size
            stream.quality_check = partial(self.check_quality, name)
        self._mixture: Mixture | None = None
        self._mixture_state: dict[str, Any] | None = None
        self._split: Split | None = None
        self._pending: list[Any] = []
        self._reported: dict[str, dict[str, Any]] = {name: _snapshot(None) for name in self.sources}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        split = current_split(self.rank, self.world_size)
        if self._split is not None and self._split != split:
            raise ValueError(
                f"state was saved by split {self._split.index}/{self._split.count}, this reader is {split.index}/"
                f"{split.count}; resume with the same world size and num_workers"
            )
        self._split = split
        if self._mixture is None:
            self._mixture = Mixture(self.weights, seed=[self.seed, split.index])
            if self._mixture_state is not None:
                self._mixture.load_state_dict(self._mixture_state)
        iterators = {name: iter(stream) for name, stream in self.sources.items()}
        return self._batches(self._mixture, iterators)

    def _batches(self, mixture: Mixture, iterators: dict[str, Iterator[Sample]]) -> Iterator[dict[str, Any]]:
        while True:
            while len(self._pending) < self.batch_size:
                name = mixture.draw()
                sample = next(iterators[name])
                self._add(name, sample)
            rows, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
            batch = self.collate(rows)
            batch["skips"], batch["reads"] = self._skip_delta()
            yield batch

    def _add(self, name: str, sample: Sample) -> None:
        stream = self.sources[name]
        try:
            for tokenized in self.transform(sample):
                if hasattr(tokenized, "source") and not tokenized.source:
                    tokenized.source = name
                self._pending.extend(self.row_builder.push(tokenized))
        except SampleError as e:  # rows already built from earlier chunks of this sample stay: they are valid
            stream.counter.skip(e.reason, stream.current_shard, str(e))
            self.check_quality(name)

    def check_quality(self, name: str) -> None:
        """Raise `DataQualityError` when source `name` skips more than `max_skip_rate` of enough samples."""
        c = self.sources[name].counter
        if self.max_skip_rate is None:  # the run checks all workers and ranks together (DataHealthCallback)
            return
        if c.seen < self.min_samples_for_skip_rate or c.skipped <= self.max_skip_rate * c.seen:
            return
        shard, shard_skips = c.by_shard.most_common(1)[0]
        reason, reason_count = c.by_reason.most_common(1)[0]
        raise DataQualityError(
            f"source {name!r}: {c.skipped} of {c.seen} samples skipped ({c.skipped / c.seen:.1%} > max_skip_rate "
            f"{self.max_skip_rate:.1%}); worst shard {shard} ({shard_skips} skips); most common reason {reason!r} "
            f"({reason_count}), e.g. {c.examples.get(reason, '?')}"
        )

    def _skip_delta(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
        """Since this worker's previous batch: `skips {source: {reason: n}}` and `reads {source: {seen, shards, examples}}`
        (samples read, skips per shard, an example of each newly seen reason), so the main process of every rank can
        add up every worker's counts (`DataHealthCallback`)."""
        skips: dict[str, dict[str, int]] = {}
        reads: dict[str, dict[str, Any]] = {}
        for name, stream in self.sources.items():
            c, before = stream.counter, self._reported[name]
            reasons = {
                r: n - before["by_reason"].get(r, 0)
                for r, n in c.by_reason.items()
                if n != before["by_reason"].get(r, 0)
            }
            shards = {
                sh: n - before["by_shard"].get(sh, 0)
                for sh, n in c.by_shard.items()
                if n != before["by_shard"].get(sh, 0)
            }
            examples = {r: e for r, e in c.examples.items() if r not in before["examples"]}
            if reasons:
                skips[name] = reasons
            if c.seen != before["seen"] or shards or examples:
                reads[name] = {"seen": c.seen - before["seen"], "shards": shards, "examples": examples}
            self._reported[name] = _snapshot(c)
        return skips, reads

    def skip_counters(self) -> dict[str, SkipCounter]:
        """This reader's cumulative skip counters per source."""
        return {name: stream.counter for name, stream in self.sources.items()}

    # ---------------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """A deep copy: torchdata pickles worker states asynchronously, so live lists would be read after they changed."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict[str, Any]:
        return {
            "split": dataclasses.astuple(self._split) if self._split else None,
            "sources": {name: stream.state_dict() for name, stream in self.sources.items()},
            "mixture": self._mixture.state_dict() if self._mixture is not None else self._mixture_state,
            "row_builder": self.row_builder.state_dict(),
            "pending": [_row_to_state(r) for r in self._pending],
            "reported": copy.deepcopy(self._reported),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["sources"]) != set(self.sources):
            raise ValueError(f"checkpoint sources {sorted(state['sources'])} differ from {sorted(self.sources)}")
        for name, stream in self.sources.items():
            stream.load_state_dict(state["sources"][name])
        self._split = Split(*state["split"]) if state["split"] is not None else None
        self._mixture, self._mixture_state = None, state["mixture"]
        state = copy.deepcopy(state)
        self.row_builder.load_state_dict(state["row_builder"])
        self._pending = [_row_from_state(r) for r in state["pending"]]
        self._reported = {name: _snapshot_from_state(state["reported"].get(name, {})) for name in self.sources}
