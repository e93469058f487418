"""One process, fast: activation checkpointing is the stage's single switch and really recomputes; text-only batches keep
the vision path in the graph without changing a number; the atomic publishing of sharded checkpoint folders."""

from __future__ import annotations

import os

import pytest
import torch

from visprior.models import LanguageModelSpec, VisionTowerSpec
from visprior.plan import StageConfig, activation_bytes, meta_components
from visprior.stages import VisionLanguagePretraining
from visprior.stages.parallelize import (
    FSDP2Strategy,
    publish_folder,
    remove_published,
    remove_stale_temporaries,
    transformer_blocks,
)

LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
TOWER = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 3,
         "num_attention_heads": 4, "intermediate_size": 64}  # fmt: skip


def stage(tokenizer_dir, **kwargs) -> VisionLanguagePretraining:
    torch.manual_seed(0)
    return VisionLanguagePretraining(
        LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=TOWER), **kwargs
    )


def image_batch(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (2, 40), generator=g)
    ids[:, 1 : 1 + model.num_image_tokens] = model.image_token_id
    return ids, ids.masked_fill(ids == model.image_token_id, -100), torch.randn(2, 3, 32, 32, generator=g)


def saved_bytes(model, ids, labels, pv) -> tuple[int, torch.Tensor]:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels, pixel_values=pv).loss
    return sum(seen.values()), loss


def test_activation_checkpointing_is_the_stages_one_switch(tokenizer_dir):
    trainable = {"vision_tower": 1e-3, "connector": 1e-3, "language_model": 1e-3}
    plain, ckpt = (
        stage(tokenizer_dir, trainable=trainable),
        stage(tokenizer_dir, trainable=trainable, activation_checkpointing=True),
    )
    for s in (plain, ckpt):
        s.configure_model()  # no trainer: the single-device path
        s.train()
    blocks = transformer_blocks(ckpt.model.language_model) + transformer_blocks(ckpt.model.vision_tower)
    assert len(blocks) == 5 and all(b.gradient_checkpointing for b in blocks)
    assert not any(getattr(b, "gradient_checkpointing", False) for b in transformer_blocks(plain.model.language_model))
    ids, labels, pv = image_batch(plain.model)
    full, loss_a = saved_bytes(plain.model, ids, labels, pv)
    recomputed, loss_b = saved_bytes(ckpt.model, ids, labels, pv)
    # every block keeps only its input (the tower's blocks too, though VisionTower calls them one by one): what the
    # recomputation saves is what the plan counts inside the blocks minus their inputs
    config = StageConfig("x", "X", {"config": {**LM, "vocab_size": plain.model.language_model.config.vocab_size}},
                         {"config": TOWER}, {"name": "mlp2x_gelu"}, trainable, micro_batch=2, seq_len=40, param_dtype="float32")  # fmt: skip
    act = activation_bytes(config, meta_components(config))
    assert full - recomputed == pytest.approx(act.layered - act.block_inputs, rel=0.02)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(TypeError):
        FSDP2Strategy(activation_checkpointing=True)  # no second switch on the strategy


def test_a_text_only_batch_keeps_the_vision_path_without_changing_the_loss(tokenizer_dir):
    s = stage(tokenizer_dir, trainable={"connector": 1e-3})  # only the connector trains: autograd needs a path to it
    ids = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    out = s.model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in s.model.connector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)  # in the graph, with a zero gradient
    s.model.vision_on_text_batches = False
    with torch.no_grad():
        assert torch.equal(s.model(ids, labels=ids).loss, out.loss.detach())


def test_publishing_a_folder_swaps_one_link(tmp_path):
    name = tmp_path / "last.ckpt"
    name.mkdir()  # a folder Lightning's own save wrote in place
    (name / "meta.pt").write_text("old")
    for i in range(2):
        tmp = tmp_path / f"last.ckpt.tmp-{i}"
        tmp.mkdir()
        (tmp / "meta.pt").write_text(f"new{i}")
        publish_folder(tmp, name)
        assert name.is_symlink() and (name / "meta.pt").read_text() == f"new{i}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", f"last.ckpt.d-{i}"]  # the old target is gone
    stale = tmp_path / "last.ckpt.tmp-dead"
    stale.mkdir()
    remove_stale_temporaries(name)
    assert not stale.exists() and (name / "meta.pt").read_text() == "new1"
    remove_published(name)
    assert os.listdir(tmp_path) == []
