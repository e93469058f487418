"""Train the byte-level BPE tokenizer of a toy world and save it as a `PreTrainedTokenizerFast` folder.

Toy-scale language models need a tokenizer fitted to the toy world's vocabulary, so it is trained here (on `text/*`, the pair
captions and the SFT conversations) rather than borrowed. The folder loads offline with `AutoTokenizer.from_pretrained`.

Special tokens (ids 0..4, in this order): `<|endoftext|>` is the eos and the document separator (there is no bos: documents
are separated by the eos that ends each one, as in GPT-2), `<pad>` pads, `<image>` is the single image token that
`SampleTokenizer` repeats `num_image_tokens` times, and `<|im_start|>` / `<|im_end|>` frame ChatML turns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from visprior.data.formats import IMAGE_MARK, SampleKind
from visprior.data.shards import MANIFEST, SkipCounter, iter_samples, iter_shard_members, read_manifest, resolve_shards

EOS = "<|endoftext|>"
PAD = "<pad>"
IMAGE = IMAGE_MARK
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IMAGE, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Folders of a toy world whose text the tokenizer learns from (relative to the data dir); `text/*` is globbed.
_CORPORA = ("pairs", "interleaved", "sft", "sft_text")


def _dataset_dirs(data_dir: Path) -> list[Path]:
    """Dataset folders (those with a manifest) to train on: every `text/<category>/` plus the multimodal corpora present."""
    text = sorted(p for p in (data_dir / "text").glob("*") if (p / MANIFEST).exists())
    others = [data_dir / name for name in _CORPORA if (data_dir / name / MANIFEST).exists()]
    return text + others


def _texts(dataset_dir: Path) -> Iterator[str]:
    """The raw text of every sample of one dataset; image marks are dropped so they are not learned as ordinary text.

    Multimodal shards are read member by member without decoding their images (most of the reading time otherwise).
    """
    kind = SampleKind(read_manifest(dataset_dir)["kind"])
    shards = resolve_shards(dataset_dir)
    if kind is SampleKind.TEXT:
        yield from (sample.text for sample in iter_samples(shards, kind))
        return
    counter = SkipCounter()
    for shard in shards:
        for _, members in iter_shard_members(shard, counter):
            try:
                yield _member_text(kind, members)
            except (ValueError, AttributeError):  # bad JSON / UTF-8: the training readers skip these samples too
                continue


def _member_text(kind: SampleKind, members: dict[str, bytes]) -> str:
    """The text of one multimodal sample from its `txt` / `json` members; malformed ones raise ValueError."""
    if kind is SampleKind.PAIR:
        return members["txt"].decode("utf-8") if "txt" in members else ""
    meta = json.loads(members.get("json", b"{}").decode("utf-8"))
    items = meta.get("segments" if kind is SampleKind.INTERLEAVED else "conversations", [])
    field = "text" if kind is SampleKind.INTERLEAVED else "value"
    texts = [t[field] for t in items if isinstance(t, dict) and isinstance(t.get(field), str)]
    return ("" if kind is SampleKind.INTERLEAVED else "\n").join(texts).replace(IMAGE_MARK, "")


def train_tokenizer(data_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 8192) -> Path:
    """Train a byte-level BPE on the toy world in `data_dir`, save it to `out_dir` and return `out_dir`.

    Deterministic for the same data (the trainer is run single-threaded over the samples in shard order).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dirs = _dataset_dirs(data_dir)
    if not dirs:
        raise FileNotFoundError(
            f"no text datasets under {data_dir} (expected text/<category>/{MANIFEST}): run `visprior data toyworld` first"
        )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for d in dirs for t in _texts(d)), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IMAGE, IM_START, IM_END],
        model_max_length=1_000_000,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    world = world_identity(data_dir)
    if world is not None:
        (out_dir / TRAINED_ON).write_text(json.dumps({**world, "vocab_size": vocab_size}, indent=1) + "\n")
    return out_dir


TRAINED_ON = "trained_on.json"
"""Written beside a tokenizer trained on a toy world: that world's identity, so a regenerated world (another preset,
seed or version) is never read through the old world's tokenizer."""


def world_identity(data_dir: str | os.PathLike) -> dict[str, object] | None:
    """The version, preset and seed of the toy world in `data_dir` (its world.json), or None for other data."""
    path = Path(data_dir) / "world.json"
    if not path.is_file():
        return None
    world = json.loads(path.read_text())
    return {k: world.get(k) for k in ("version", "preset", "seed")}


def trained_on(tokenizer_dir: str | os.PathLike) -> dict[str, object] | None:
    """The world identity a toy tokenizer records (`TRAINED_ON`), or None when it records none."""
    path = Path(tokenizer_dir) / TRAINED_ON
    return json.loads(path.read_text()) if path.is_file() else None


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<image>`; raises if the tokenizer lacks it as one token (it would silently split into bytes otherwise)."""
    ids = tokenizer.encode(IMAGE_MARK, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != IMAGE_MARK:
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {where!r} encodes {IMAGE_MARK!r} as {len(ids)} tokens {ids}; a vision-language model needs it to be one "
            f"special token. Train it with `visprior data tokenizer`, or add it with "
            f"`tokenizer.add_special_tokens({{'extra_special_tokens': ['{IMAGE_MARK}']}})` and resize the embeddings."
        )
    return ids[0]
