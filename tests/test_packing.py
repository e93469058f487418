"""Packing: per-document positions, the model's boundary label rule, round trip, padding figure, resume, and loss equality in a
Llama (samples with and without a prompt, so the first label of a document is really supervised by the data)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from visprior.data.formats import SampleError
from visprior.data.packing import (
    Packer,
    Padder,
    best_fill,
    collate_rows,
    pack_sequences,
    pad_sequences,
    padding_fraction,
    unpack,
)
from visprior.data.tokenize import IGNORE_INDEX, TokenizedSample
from visprior.models.attention import block_causal_bias, block_causal_mask, mask_document_starts

PAD = 1


def sample(key: str, n: int, rng: random.Random, n_images: int = 0, prompt: int = 0) -> TokenizedSample:
    """n random tokens; the first `prompt` unsupervised; images are [3, 2, 2] tensors filled with a distinct value."""
    ids = [rng.randrange(5, 512) for _ in range(n)]
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    images = [torch.full((3, 2, 2), float(rng.random())) for _ in range(n_images)]
    return TokenizedSample(key, ids, labels, images)


def samples_of(lengths: list[int], seed: int = 0) -> list[TokenizedSample]:
    """Every third sample has no prompt: its first label is a real target that only the model's boundary rule masks."""
    rng = random.Random(seed)
    return [sample(f"s{i}", n, rng, n_images=i % 2, prompt=0 if i % 3 == 0 else n // 3) for i, n in enumerate(lengths)]


def test_positions_documents_and_labels() -> None:
    batch = pack_sequences(samples_of([5, 3, 4, 6]), seq_len=10, pad_id=PAD, buffer_size=8)
    trained = mask_document_starts(batch["labels"], batch["document_ids"])  # what the model supervises
    unmasked_starts = 0
    for pos, docs, ids, labels, targets in zip(
        batch["position_ids"], batch["document_ids"], batch["input_ids"], batch["labels"], trained
    ):
        for d in docs.unique().tolist():
            sel = docs == d
            if d >= 0:
                assert pos[sel].tolist() == list(range(int(sel.sum())))
                assert targets[sel][0] == IGNORE_INDEX  # never predicted across a document boundary
                unmasked_starts += int(labels[sel][0] != IGNORE_INDEX)
                assert torch.equal(targets[sel][1:], labels[sel][1:])  # the rule touches nothing else
        assert (ids[docs == -1] == PAD).all() and (labels[docs == -1] == IGNORE_INDEX).all()
    assert batch["document_ids"].max() >= 1  # something was packed
    assert unmasked_starts >= 1, "no document started with a supervised label: the rule was not exercised"


def test_pack_unpack_recovers_samples() -> None:
    samples = samples_of([rng_len for rng_len in random.Random(1).choices(range(3, 40), k=40)])
    batch = pack_sequences(samples, seq_len=64, pad_id=PAD, buffer_size=8)
    docs = {k: (ids, labels) for k, ids, labels in unpack(batch)}
    assert sorted(docs) == sorted(s.key for s in samples)
    for s in samples:
        ids, labels = docs[s.key]
        assert ids == s.input_ids and labels == s.labels  # the packer leaves labels as the tokenizer made them
    # images are stacked row-major in document order
    expected = torch.stack([im for k in batch["keys"] for s in samples if s.key == k for im in s.images])
    assert torch.equal(batch["pixel_values"], expected)


def test_padder_one_sample_per_row() -> None:
    samples = samples_of([5, 9, 2])
    batch = pad_sequences(samples, seq_len=16, pad_id=PAD)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["keys"] == ["s0", "s1", "s2"] and batch["document_ids"].max() == 0
    assert batch["pixel_values"].shape == (1, 3, 2, 2)
    assert pad_sequences(samples[:1], 16, PAD)["pixel_values"] is None
    assert Padder(16, PAD).state_dict() == {}


def test_block_causal_mask() -> None:
    docs = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    mask = block_causal_mask(docs)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal within a document
    assert not m[2, 1] and not m[2:5, :2].any()  # no cross-document attention
    assert m[4, 2:5].all()
    assert m[5].tolist() == [False] * 5 + [True]  # padding attends to itself only
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    bias = block_causal_bias(docs)
    assert (
        bias.dtype == torch.float32
        and (bias[mask] == 0).all()
        and (bias[~mask] == torch.finfo(torch.float32).min).all()
    )


def test_padding_fraction_on_realistic_mix() -> None:
    rng = random.Random(0)
    samples = [sample(f"s{i}", rng.randint(20, 300), rng) for i in range(2000)]
    packer = Packer(512, PAD, buffer_size=64)
    rows = [row for s in samples for row in packer.push(s)]
    frac = padding_fraction(rows, seq_len=512)
    print(f"packed padding fraction (lengths 20-300, seq_len 512, buffer 64): {frac:.4f} over {len(rows)} rows")
    assert frac <= 0.05
    assert padding_fraction([row for s in samples for row in Padder(512, PAD).push(s)], 512) > 0.6


def test_state_dict_round_trip_gives_same_rows() -> None:
    samples = samples_of(random.Random(2).choices(range(3, 30), k=60))
    a = Packer(48, PAD, buffer_size=6)
    for s in samples[:25]:
        a.push(s)
    state = a.state_dict()
    assert len(state["buffer"]) > 0
    b = Packer(48, PAD, buffer_size=6)
    b.load_state_dict(state)
    rows_a = [r for s in samples[25:] for r in a.push(s)] + a.flush()
    rows_b = [r for s in samples[25:] for r in b.push(s)] + b.flush()
    ca, cb = collate_rows(rows_a, PAD), collate_rows(rows_b, PAD)
    assert ca["keys"] == cb["keys"] and torch.equal(ca["input_ids"], cb["input_ids"])
    assert torch.equal(ca["pixel_values"], cb["pixel_values"])
    with pytest.raises(ValueError, match="seq_len"):
        Packer(64, PAD).load_state_dict(state)


def test_best_fill_is_the_optimum_and_prefers_older() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
        chosen = best_fill(lengths, 60)
        best = max(
            sum(n for i, n in enumerate(lengths) if m >> i & 1)
            for m in range(1 << len(lengths))
            if sum(n for i, n in enumerate(lengths) if m >> i & 1) <= 60
        )
        assert sum(lengths[i] for i in chosen) == best and chosen == sorted(set(chosen))
    assert best_fill([30, 30, 30], 60) == [0, 1]
    assert best_fill([70, 80], 60) == []


def test_too_long_sample_is_a_sample_error() -> None:
    with pytest.raises(SampleError, match="too_long"):
        Packer(8, PAD).push(samples_of([9])[0])


def _loss_per_document(logits: torch.Tensor, labels: torch.Tensor, docs: torch.Tensor) -> list[float]:
    """Mean shifted cross-entropy of each document, row-major order."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # [B, T-1]
    out = []
    for r in range(labels.shape[0]):
        for d in range(int(docs[r].max()) + 1):
            sel = (docs[r, 1:] == d) & (labels[r, 1:] != IGNORE_INDEX)
            out.append(nll[r][sel].mean().item())
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_loss_alone_in_llama(attn: str) -> None:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).eval()
    samples = samples_of([7, 12, 5, 20, 9, 3])
    batch = pack_sequences(samples, seq_len=32, pad_id=PAD, buffer_size=16)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=block_causal_bias(batch["document_ids"]),
            position_ids=batch["position_ids"],
        ).logits
        assert not logits.isnan().any()
        labels = mask_document_starts(batch["labels"], batch["document_ids"])
        inside_rows = (labels != batch["labels"])[:, 1:]
        assert inside_rows.any(), "no packed document after the first of a row started with a supervised label"
        packed = dict(zip(batch["keys"], _loss_per_document(logits, labels, batch["document_ids"])))
        for s in samples:
            ids, labels = torch.tensor([s.input_ids]), torch.tensor([s.labels])
            alone = _loss_per_document(model(input_ids=ids).logits, labels, torch.zeros_like(ids))[0]
            assert packed[s.key] == pytest.approx(alone, abs=1e-5)


def test_toyworld_sft_packs_with_masked_images_and_prompts(toyworld_dir, tokenizer_dir) -> None:
    """Real toy-world conversations, tokenized and packed: image and user positions unsupervised, little padding."""
    from transformers import AutoTokenizer

    from visprior.data.formats import ConversationSample
    from visprior.data.shards import iter_samples, resolve_shards
    from visprior.data.tokenize import SampleTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    st = SampleTokenizer(tok, lambda im: torch.zeros(3, 2, 2), num_image_tokens=64, max_length=512)
    conversations = [s for _, s in zip(range(200), iter_samples(resolve_shards(toyworld_dir / "sft"), "conversation"))]
    assert all(isinstance(s, ConversationSample) for s in conversations)
    tokenized = [t for s in conversations for t in st(s)]
    packer = Packer(512, tok.pad_token_id, buffer_size=32)
    rows = [r for t in tokenized for r in packer.push(t)]
    frac = padding_fraction(rows, 512)
    print(
        f"toy-world SFT: {len(tokenized)} conversations, mean {sum(len(t.input_ids) for t in tokenized) / len(tokenized):.0f} "
        f"tokens, packed padding {frac:.4f}"
    )
    assert frac <= 0.05
    batch = collate_rows(rows + packer.flush(), tok.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[ids == st.image_id] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] * 64 == int((ids == st.image_id).sum())
    by_key = {s.key: s for s in conversations}
    for key, doc_ids, doc_labels in unpack(batch):
        supervised = tok.decode([t for t, lab in zip(doc_ids, doc_labels) if lab != IGNORE_INDEX])
        gpt = [t["value"] for t in by_key[key].conversations if t["from"] == "gpt"]
        assert supervised == "".join(v + "<|im_end|>" for v in gpt)
