"""Rows of tokenized samples: packing several documents per row (or one per row), and collation into batches.

`Packer` keeps a small buffer of samples and, once it is full, emits the fullest row a subset of the buffer can make (exact
subset-sum, see `best_fill`), so padding stays well under 5 %. Within a row every document restarts its position ids at 0
and carries its own document id (-1 for padding). That is all the data hands over: the attention mask and the rule that
a document's first token is never predicted from the previous document belong to the model (`visprior.models.attention`),
which builds them from `document_ids` in the form its attention backend takes. Labels stay as the tokenizer made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from visprior.data.formats import SampleError
from visprior.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class Row:
    """One training sequence, unpadded: `collate_rows` pads it. `document_ids` are 0, 1, 2, ... per document."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    document_ids: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, sample: TokenizedSample) -> None:
        doc = len(self.keys)
        n = len(sample.input_ids)
        self.input_ids.extend(sample.input_ids)
        self.labels.extend(sample.labels)
        self.position_ids.extend(range(n))
        self.document_ids.extend([doc] * n)
        self.images.extend(sample.images)
        self.keys.append(sample.key)


def _to_state(s: TokenizedSample) -> dict[str, Any]:
    return {
        "key": s.key,
        "input_ids": list(s.input_ids),
        "labels": list(s.labels),
        "images": list(s.images),
        "source": s.source,
    }


def _from_state(d: dict[str, Any]) -> TokenizedSample:
    return TokenizedSample(d["key"], list(d["input_ids"]), list(d["labels"]), list(d["images"]), d.get("source", ""))


def _check_length(sample: TokenizedSample, seq_len: int) -> None:
    if not sample.input_ids:
        raise SampleError("empty_text", "tokenized sample has no tokens", sample.key)
    if len(sample.input_ids) > seq_len:
        raise SampleError("too_long", f"{len(sample.input_ids)} tokens > seq_len {seq_len}", sample.key)


def best_fill(lengths: list[int], capacity: int) -> list[int]:
    """Indices (ascending) of a subset of `lengths` with the largest sum <= `capacity`, preferring earlier (older) items.

    Exact subset-sum over the buffer, with Python ints as bitsets of reachable sums: about 20 us per item at capacity 512.
    It beats first-fit-decreasing where FFD leaves gaps no single sample fills (toy SFT with 64 image tokens: 6.6 % -> 0.0 %
    padding), and preferring older items bounds how long a sample waits.
    """
    mask = (1 << (capacity + 1)) - 1
    reachable = [1]  # reachable[k]: bit s set if some subset of the first k items sums to s
    for n in lengths:
        reachable.append((reachable[-1] | (reachable[-1] << n)) & mask)
    total, chosen = reachable[-1].bit_length() - 1, []
    for k in range(len(lengths), 0, -1):  # walk back: keep item k-1 only when the sum is unreachable without it
        if not (reachable[k - 1] >> total) & 1:
            chosen.append(k - 1)
            total -= lengths[k - 1]
    return chosen[::-1]


class Packer:
    """RowBuilder that packs several samples per row: once `buffer_size` samples wait, emit the fullest row they can make.

    Deterministic (`best_fill`, ties to older samples). `flush()` empties the buffer at the end of finite data.
    """

    def __init__(self, seq_len: int, pad_id: int, buffer_size: int = 64):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.buffer_size = buffer_size
        self._buffer: list[TokenizedSample] = []

    def push(self, sample: TokenizedSample) -> list[Row]:
        """Buffer `sample`; return the row it completes, if the buffer is full."""
        _check_length(sample, self.seq_len)
        self._buffer.append(sample)
        return [self._emit()] if len(self._buffer) >= self.buffer_size else []

    def flush(self) -> list[Row]:
        """Pack everything still buffered into rows."""
        rows = []
        while self._buffer:
            rows.append(self._emit())
        return rows

    def _emit(self) -> Row:
        chosen = best_fill([len(s.input_ids) for s in self._buffer], self.seq_len)
        row = Row()
        for i in chosen:
            row.add(self._buffer[i])
        taken = set(chosen)
        self._buffer = [s for i, s in enumerate(self._buffer) if i not in taken]
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "buffer": [_to_state(s) for s in self._buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"packer state was saved with seq_len {state['seq_len']}, this packer has {self.seq_len}")
        self._buffer = [_from_state(d) for d in state["buffer"]]


class Padder:
    """RowBuilder with one sample per row (the unpacked baseline); stateless."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id

    def push(self, sample: TokenizedSample) -> list[Row]:
        _check_length(sample, self.seq_len)
        row = Row()
        row.add(sample)
        return [row]

    def flush(self) -> list[Row]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def collate_rows(rows: list[Row], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """The batch dict of docs/contracts.md, rows right-padded to the longest row (or to `pad_to`)."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    t = max(max(len(r) for r in rows), pad_to or 0)

    def stack(attr: str, fill: int) -> torch.Tensor:
        return torch.tensor([getattr(r, attr) + [fill] * (t - len(r)) for r in rows], dtype=torch.long)  # [B, T]

    images = [im for r in rows for im in r.images]
    return {
        "input_ids": stack("input_ids", pad_id),
        "labels": stack("labels", IGNORE_INDEX),
        "position_ids": stack("position_ids", 0),
        "document_ids": stack("document_ids", -1),
        "pixel_values": torch.stack(images) if images else None,  # [N, C, H, W]
        "keys": [k for r in rows for k in r.keys],
    }


def pack_sequences(samples: list[TokenizedSample], seq_len: int, pad_id: int, buffer_size: int = 64) -> dict[str, Any]:
    """Pack a finite list of samples into one batch (tests, evaluation)."""
    packer = Packer(seq_len, pad_id, buffer_size)
    rows = [row for s in samples for row in packer.push(s)] + packer.flush()
    return collate_rows(rows, pad_id)


def pad_sequences(samples: list[TokenizedSample], seq_len: int, pad_id: int) -> dict[str, Any]:
    """One sample per row, padded to the longest (evaluation, the unpacked baseline)."""
    padder = Padder(seq_len, pad_id)
    return collate_rows([row for s in samples for row in padder.push(s)], pad_id)


def padding_fraction(rows: list[Row], seq_len: int | None = None) -> float:
    """Fraction of pad tokens when every row is padded to `seq_len` (default: the longest row)."""
    t = seq_len or max(len(r) for r in rows)
    return 1.0 - sum(len(r) for r in rows) / (t * len(rows))


def unpack(batch: dict[str, Any]) -> list[tuple[str, list[int], list[int]]]:
    """`(key, input_ids, labels)` of every document of a batch, in order: the inverse of packing (for tests and debugging)."""
    out, keys = [], iter(batch["keys"])
    for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"]):
        for d in range(int(docs.max()) + 1):
            sel = docs == d
            out.append((next(keys), ids[sel].tolist(), labels[sel].tolist()))
    return out

