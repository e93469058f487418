"""SampleTokenizer: supervision per kind, image-token runs, chunking, errors, and no image-token injection from data."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from visprior.data.formats import ConversationSample, InterleavedSample, PairSample, SampleError, TextSample
from visprior.data.shards import write_shards
from visprior.data.tokenize import IGNORE_INDEX, ChatFormat, SampleTokenizer
from visprior.data.tokenizer import train_tokenizer

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
    "what",
    "colour",
]
N_IMG = 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("world")
    texts = [TextSample(f"t{i}", " ".join(rng.choice(WORDS) for _ in range(40))) for i in range(60)]
    write_shards(texts, root / "text" / "web", name="web", kind="text")
    return AutoTokenizer.from_pretrained(train_tokenizer(root, root / "tok", vocab_size=300))


def transform(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 4, 4) + image.getpixel((0, 0))[0] / 255  # [C, H, W]


@pytest.fixture()
def st(tokenizer) -> SampleTokenizer:
    return SampleTokenizer(tokenizer, transform, num_image_tokens=N_IMG, max_length=128, source="unit")


def image(red: int = 255) -> Image.Image:
    return Image.new("RGB", (8, 8), (red, 0, 0))


def supervised_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_text_all_supervised_with_eos(st: SampleTokenizer, tokenizer) -> None:
    (out,) = st(TextSample("k", "the red circle"))
    assert out.input_ids == tokenizer.encode("the red circle") + [tokenizer.eos_token_id]
    assert out.labels == out.input_ids and out.images == [] and out.source == "unit" and out.key == "k"


def test_long_text_is_chunked(st: SampleTokenizer) -> None:
    text = " ".join(["red circle"] * 200)
    chunks = st(TextSample("k", text))
    assert len(chunks) > 1 and all(len(c.input_ids) <= 128 for c in chunks)
    assert [c.key for c in chunks] == [f"k#{i}" for i in range(len(chunks))]
    joined = [i for c in chunks for i in c.input_ids]
    assert joined == st.encode_text(text) + [st.eos_id]


def test_lone_trailing_token_is_dropped(tokenizer) -> None:
    n = len(SampleTokenizer(tokenizer, None, 0, 1000).encode_text("red circle " * 10))
    chunks = SampleTokenizer(tokenizer, None, 0, max_length=n)(TextSample("k", "red circle " * 10))
    assert [len(c.input_ids) for c in chunks] == [n]


def test_picklable_for_dataloader_workers(st: SampleTokenizer) -> None:
    sample = ConversationSample(
        "c", [{"from": "human", "value": "<image> what"}, {"from": "gpt", "value": "red"}], [image()]
    )
    again = pickle.loads(pickle.dumps(st))
    assert again(sample)[0].input_ids == st(sample)[0].input_ids


def test_pair_caption_supervised_image_masked(st: SampleTokenizer, tokenizer) -> None:
    (out,) = st(PairSample("p", image(), "a red square"))
    img = st.image_id
    assert out.input_ids[:N_IMG] == [img] * N_IMG and img not in out.input_ids[N_IMG:]
    assert out.labels[:N_IMG] == [IGNORE_INDEX] * N_IMG
    assert supervised_text(tokenizer, out.input_ids, out.labels) == "a red square<|endoftext|>"
    assert len(out.images) == 1 and out.images[0].shape == (3, 4, 4)


def test_interleaved_order_and_masks(st: SampleTokenizer, tokenizer) -> None:
    (out,) = st(InterleavedSample("i", ["the red", image(255), " circle", image(0), " is small"]))
    runs = [i for i, t in enumerate(out.input_ids) if t == st.image_id]
    assert len(runs) == 2 * N_IMG
    assert all(out.labels[i] == IGNORE_INDEX for i in runs)
    assert supervised_text(tokenizer, out.input_ids, out.labels) == "the red circle is small<|endoftext|>"
    assert [float(t[0, 0, 0]) for t in out.images] == [1.0, 0.0]  # images in document order


def test_conversation_only_assistant_supervised(st: SampleTokenizer, tokenizer) -> None:
    conv = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhat colour"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "what"},
        {"from": "gpt", "value": "a circle"},
    ]
    (out,) = st(ConversationSample("c", conv, [image()]))
    assert supervised_text(tokenizer, out.input_ids, out.labels) == "red<|im_end|>a circle<|im_end|>"
    assert out.input_ids.count(st.image_id) == N_IMG
    messages = [
        {"role": r, "content": t["value"]} for t, r in zip(conv, ["system", "user", "assistant", "user", "assistant"])
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = tokenizer.encode(rendered.replace("<image>", "<image>" * N_IMG))
    assert out.input_ids == expected  # same ids as the tokenizer's own ChatML template


def test_custom_chat_format_roles(tokenizer) -> None:
    st = SampleTokenizer(tokenizer, None, 0, 64, chat=ChatFormat(roles={"human": "Q", "gpt": "A", "system": "S"}))
    (out,) = st(ConversationSample("c", [{"from": "human", "value": "red"}, {"from": "gpt", "value": "blue"}]))
    assert tokenizer.decode(out.input_ids) == "<|im_start|>Q\nred<|im_end|>\n<|im_start|>A\nblue<|im_end|>\n"


def test_literal_image_mark_in_text_is_plain_text(st: SampleTokenizer, tokenizer) -> None:
    for sample in [
        TextSample("t", "see <image> and <|im_end|> here"),
        PairSample("p", image(), "a <image> caption"),
        InterleavedSample("i", ["text <image>", image()]),
    ]:
        (out,) = st(sample)
        assert out.input_ids.count(st.image_id) == N_IMG * len(out.images)
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in out.input_ids
    (out,) = st(TextSample("t", "see <image> here"))
    assert tokenizer.decode(out.input_ids) == "see <image> here<|endoftext|>"


def test_image_mark_count_must_match(st: SampleTokenizer) -> None:
    conv = [{"from": "human", "value": "<image> <image> what"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(SampleError) as e:
        st(ConversationSample("c", conv, [image()]))
    assert e.value.reason == "image_token_mismatch" and e.value.key == "c"


def test_too_long_multimodal(tokenizer) -> None:
    st = SampleTokenizer(tokenizer, transform, num_image_tokens=40, max_length=64)
    with pytest.raises(SampleError) as e:
        st(PairSample("p", image(), " ".join(["red circle"] * 20)))
    assert e.value.reason == "too_long"


def test_empty_results(st: SampleTokenizer) -> None:
    with pytest.raises(SampleError, match="empty_text"):
        st(TextSample("t", ""))
    with pytest.raises(SampleError, match="empty_text"):
        st(ConversationSample("c", [{"from": "human", "value": "only a question"}]))


def test_images_without_transform_is_config_error(tokenizer) -> None:
    st = SampleTokenizer(tokenizer, None, num_image_tokens=2, max_length=64)
    with pytest.raises(ValueError, match="no image_transform"):
        st(PairSample("p", image(), "red"))


def test_text_only_stage_needs_no_image_token(tokenizer) -> None:
    st = SampleTokenizer(tokenizer, None, 0, 8)
    assert st.image_id is None and all(len(c.input_ids) <= 8 for c in st(TextSample("t", "red " * 30)))


def test_tokenizer_without_chat_tokens_does_text_only(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    st = SampleTokenizer(plain, None, 0, 64)
    assert st(TextSample("t", "red"))[0].input_ids[-1] == plain.eos_token_id
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        st(ConversationSample("c", [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]))
