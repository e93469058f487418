"""The toy-world tokenizer: special tokens, ChatML template, corpora it learns from, offline reload, clear errors."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from visprior.data.formats import ConversationSample, PairSample, TextSample
from visprior.data.shards import write_shards
from visprior.data.tokenizer import SPECIAL_TOKENS, image_token_id, train_tokenizer

WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "is",
    "above",
    "below",
    "left",
    "of",
    "small",
    "big",
    "near",
]


def make_world(root: Path, seed: int = 0) -> Path:
    """A few text, pair and sft shards in the toy-world layout; 'quokka' only in captions, 'wombat' only in sft."""
    rng = random.Random(seed)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    texts = [TextSample(f"t{i}", sentence(40), {"category": "web"}) for i in range(60)]
    write_shards(texts, root / "text" / "web", name="web", kind="text")
    image = Image.new("RGB", (8, 8), "red")
    pairs = [PairSample(f"p{i}", image, f"a quokka {sentence(5)}") for i in range(30)]
    write_shards(pairs, root / "pairs", name="pairs", kind="pair")
    convs = [
        ConversationSample(
            f"c{i}",
            [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": f"wombat {sentence(4)}"}],
            [image],
        )
        for i in range(30)
    ]
    write_shards(convs, root / "sft", name="sft", kind="conversation")
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_world(tmp_path_factory.mktemp("world"))
    return train_tokenizer(root, root / "tokenizer", vocab_size=400)


def test_special_tokens_and_reload(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.bos_token is None
    assert tok.encode("red circle") == tok.encode("red circle", add_special_tokens=False)  # no bos/eos added
    assert image_token_id(tok) == 2
    assert 300 < len(tok) <= 400  # fewer when the corpus runs out of merges: size models by len(tok)
    assert tok.decode(tok.encode("a red circle is above")) == "a red circle is above"


def test_chatml_template(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"


def test_learns_captions_and_conversations(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok.encode(" quokka")) == 1
    assert len(tok.encode("wombat")) == 1


def test_deterministic(tmp_path: Path, tok_dir: Path) -> None:
    root = make_world(tmp_path / "w")
    again = train_tokenizer(root, tmp_path / "tok", vocab_size=400)
    assert (again / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()


def test_image_token_id_error_names_tokenizer(tmp_path: Path) -> None:
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain.*one\s+special token"):
        image_token_id(AutoTokenizer.from_pretrained(tmp_path / "plain"))


def test_missing_text_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no text datasets"):
        train_tokenizer(tmp_path, tmp_path / "tok")


def test_toyworld_tokenizer_round_trips_every_category(toyworld_dir: Path, tokenizer_dir: Path) -> None:
    from visprior.data.shards import iter_samples, resolve_shards

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert image_token_id(tok) == 2 and len(tok) <= 2048
    categories = sorted(p.name for p in (toyworld_dir / "text").iterdir())
    assert len(categories) == 7
    for category in categories:
        sample = next(iter_samples(resolve_shards(toyworld_dir / "text" / category), "text"))
        ids = tok.encode(sample.text)
        assert tok.decode(ids) == sample.text
        assert len(ids) < len(sample.text.encode()) / 2  # learned merges, not bytes


def test_broken_multimodal_sample_is_skipped(tmp_path: Path) -> None:
    root = make_world(tmp_path / "w")
    shard = next((root / "sft").glob("*.tar"))
    with tarfile.open(shard, "a") as tar:
        data = b"{not json"
        info = tarfile.TarInfo("broken.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tok = AutoTokenizer.from_pretrained(train_tokenizer(root, tmp_path / "tok", vocab_size=400))
    assert len(tok.encode("wombat")) == 1
