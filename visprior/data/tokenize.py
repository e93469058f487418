"""Turn any decoded `Sample` into `TokenizedSample`s: chat template, `<image>` runs, label masking, image preprocessing.

One rule per kind decides what is supervised (text: everything; pair: the caption; interleaved: the text; conversation: the
assistant turns with their `<|im_end|>`), image runs are never supervised, and every document ends with the eos (conversations
end with `<|im_end|>\\n`). Only `<image>` marks of conversations become image tokens: in all other text, and in the content of
every turn, special-token strings (`<image>`, `<|im_end|>`, `<|endoftext|>`, ...) are encoded as the ordinary bytes they
are, so data cannot inject image tokens or fake a turn boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from visprior.data.formats import (
    IMAGE_MARK,
    ConversationSample,
    InterleavedSample,
    PairSample,
    Sample,
    SampleError,
    TextSample,
)
from visprior.data.tokenizer import IM_END, IM_START, image_token_id

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    key: str
    input_ids: list[int]
    labels: list[int]  # -100 where not supervised (image tokens, prompts, user turns, padding)
    images: list[torch.Tensor]  # [C, H, W] each, in the order of their image-token runs
    source: str = ""


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is laid out: `{start}{role}{separator}{content}{end}{separator}` per turn (ChatML by default).

    `roles` maps LLaVA's `from` values to the role names written in the template.
    """

    start: str = IM_START
    end: str = IM_END
    separator: str = "\n"
    roles: dict[str, str] = field(default_factory=lambda: {"human": "user", "gpt": "assistant", "system": "system"})
    supervised_roles: tuple[str, ...] = ("gpt",)


class _Builder:
    """Accumulates ids and labels of one document."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], supervised: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))


class SampleTokenizer:
    """Callable that turns one `Sample` into one or more `TokenizedSample`s (several only for long text).

    `image_transform` maps a PIL image to a [C, H, W] tensor; it may be None for text-only stages, in which case a sample with
    images is a configuration error (`ValueError`). `max_length` bounds every returned sample.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor] | None,
        num_image_tokens: int,
        max_length: int,
        chat: ChatFormat | None = None,
        source: str = "",
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; documents need one as separator")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.chat = chat or ChatFormat()
        self.source = source
        self.eos_id = tokenizer.eos_token_id
        self.image_id = image_token_id(tokenizer) if num_image_tokens > 0 else None
        self._turn_start = self._special_id(
            self.chat.start
        )  # None: this tokenizer cannot do chat (text stages are fine)
        self._turn_end = self._special_id(self.chat.end)
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise TypeError(f"tokenizer {tokenizer.name_or_path!r} is not a fast (tokenizers-backed) tokenizer")
        # A copy of the backend that treats special-token strings in data as plain text (no injection).
        self._plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True

    def _special_id(self, token: str) -> int | None:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings taken literally."""
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def __call__(self, sample: Sample) -> list[TokenizedSample]:
        if isinstance(sample, TextSample):
            return self._text(sample)
        if isinstance(sample, PairSample):
            b = _Builder()
            self._add_image(b, sample.key)
            b.add(self.encode_text(sample.text) + [self.eos_id], supervised=True)
            return [self._finish(sample.key, b, [sample.image])]
        if isinstance(sample, InterleavedSample):
            b = _Builder()
            for seg in sample.segments:
                if isinstance(seg, Image.Image):
                    self._add_image(b, sample.key)
                else:
                    b.add(self.encode_text(seg), supervised=True)
            b.add([self.eos_id], supervised=True)
            return [self._finish(sample.key, b, sample.images)]
        if isinstance(sample, ConversationSample):
            return [self._conversation(sample)]
        raise TypeError(f"not a sample: {type(sample).__name__}")

    def _text(self, sample: TextSample) -> list[TokenizedSample]:
        ids = self.encode_text(sample.text)
        if not ids:
            raise SampleError("empty_text", "text encodes to no tokens", sample.key)
        ids.append(self.eos_id)
        chunks = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks.pop()  # a lone trailing token has nothing before it to be predicted from
        keys = [sample.key] if len(chunks) == 1 else [f"{sample.key}#{i}" for i in range(len(chunks))]
        return [TokenizedSample(k, c, list(c), [], self.source) for k, c in zip(keys, chunks)]

    def _conversation(self, sample: ConversationSample) -> TokenizedSample:
        chat, b = self.chat, _Builder()
        if self._turn_start is None or self._turn_end is None:
            raise ValueError(
                f"tokenizer {self.tokenizer.name_or_path!r} lacks the chat tokens {chat.start!r} / {chat.end!r} as single "
                "special tokens: add them, or pass a ChatFormat whose start/end it has"
            )
        sep = self.encode_text(chat.separator)
        marks = 0
        for turn in sample.conversations:
            supervised = turn["from"] in chat.supervised_roles
            b.add([self._turn_start] + self.encode_text(chat.roles[turn["from"]]) + sep, supervised=False)
            for i, piece in enumerate(turn["value"].split(IMAGE_MARK)):
                if i > 0:
                    self._add_image(b, sample.key)
                    marks += 1
                b.add(self.encode_text(piece), supervised=supervised)
            b.add([self._turn_end], supervised=supervised)
            b.add(sep, supervised=False)
        if marks != len(sample.images):
            raise SampleError(
                "image_token_mismatch", f"{marks} '{IMAGE_MARK}' marks but {len(sample.images)} images", sample.key
            )
        return self._finish(sample.key, b, sample.images)

    def _add_image(self, b: _Builder, key: str) -> None:
        if self.image_id is None:
            raise SampleError("image_token_mismatch", "sample has images but num_image_tokens is 0", key)
        b.add([self.image_id] * self.num_image_tokens, supervised=False)

    def _finish(self, key: str, b: _Builder, images: list[Image.Image]) -> TokenizedSample:
        if all(label == IGNORE_INDEX for label in b.labels):
            raise SampleError("empty_text", "nothing to supervise", key)
        if len(b.ids) > self.max_length:
            raise SampleError("too_long", f"{len(b.ids)} tokens > max_length {self.max_length}", key)
        runs = b.ids.count(self.image_id) // self.num_image_tokens if self.image_id is not None else 0
        if runs != len(images):
            raise SampleError("image_token_mismatch", f"{runs} image-token runs but {len(images)} images", key)
        if images and self.image_transform is None:
            raise ValueError(f"sample {key!r} has images but SampleTokenizer was given no image_transform")
        pixels = [self.image_transform(im) for im in images] if images else []
        return TokenizedSample(key, b.ids, b.labels, pixels, self.source)
