"""VW-LMM: the visual-words KL (sign, zero point, gradients), logit alignment at image positions, pseudo image features."""

from __future__ import annotations

import pytest
import torch

from visprior.models.visual_words import pseudo_image_features, shifted_image_logits, visual_words_kl, vm_head

V, D = 11, 8


def test_kl_is_non_negative_and_reaches_lm_logits() -> None:
    head = vm_head(D, V)
    logits = torch.randn(6, V, requires_grad=True)
    loss = visual_words_kl(logits, torch.randn(6, D), head, temperature=2.0)
    assert loss.item() > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_kl_is_zero_when_distributions_match() -> None:
    head = vm_head(D, V)
    visual = torch.randn(2, 3, D)  # [N, K, D] is flattened row-major
    matching = head(visual.reshape(6, D)).detach() + 5.0  # a constant shift leaves the softmax unchanged
    loss = visual_words_kl(matching, visual, head)
    assert loss.abs().item() < 1e-6


def test_kl_direction_is_target_to_prediction() -> None:
    head = vm_head(D, V)
    visual, logits = torch.randn(4, D), torch.randn(4, V)
    target = torch.softmax(head(visual), -1)
    pred = torch.softmax(logits, -1)
    expected = (target * (target.log() - pred.log())).sum(-1).mean()
    torch.testing.assert_close(visual_words_kl(logits, visual, head), expected)


def test_detached_target_and_mask() -> None:
    head = vm_head(D, V)
    logits = torch.randn(3, V, requires_grad=True)
    keep = torch.tensor([True, False, True])
    loss = visual_words_kl(logits, torch.randn(3, D), head, mask=keep, detach_target=True)
    loss.backward()
    assert head.weight.grad is None
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    empty = visual_words_kl(logits, torch.randn(3, D), head, mask=torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="3 predicted positions but 4 visual embeddings"):
        visual_words_kl(logits, torch.randn(4, D), head)


def test_shifted_logits_align_with_image_tokens() -> None:
    logits = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).expand(2, 5, V)  # value = 5 * row + position
    image_mask = torch.tensor([[False, True, True, False, True], [True, True, False, False, False]])
    pred, keep = shifted_image_logits(logits, image_mask)
    assert pred.shape == (5, V)
    # image tokens (row, t): (0,1) (0,2) (0,4) (1,0) (1,1) -> predictors at t - 1; (1,0) has none
    torch.testing.assert_close(pred[:, 0], torch.tensor([0.0, 1.0, 3.0, 0.0, 5.0]))
    assert keep.tolist() == [True, True, True, False, True]


def test_pseudo_image_features() -> None:
    embedding = torch.randn(V, D)
    confident = torch.full((2, V), -1e4)
    confident[0, 3] = confident[1, 7] = 1e4
    torch.testing.assert_close(pseudo_image_features(confident, embedding), embedding[[3, 7]])
    uniform = pseudo_image_features(torch.zeros(1, V), embedding)
    torch.testing.assert_close(uniform[0], embedding.mean(0))


# ---------------------------------------------------------------------------------------------------- inside the VLM

IMAGE_ID = 2
K = 4  # image tokens per image


@pytest.fixture
def word_tokenizer(tmp_path):
    """A 46-token word-level tokenizer with the project's special tokens (`<image>` = id 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(40)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def vw_vlm(tok_dir, **visual_words):
    from visprior.models.connectors import ConnectorSpec
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.models.visual_words import VisualWordsSpec
    from visprior.models.vlm import VLMSpec, build_vlm

    lm = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64}  # fmt: skip
    tower = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vision_use_head": False}  # fmt: skip
    spec = VLMSpec(
        LanguageModelSpec(config=lm, tokenizer=str(tok_dir)),
        VisionTowerSpec(config=tower, feature_layer=-1),
        ConnectorSpec("mlp2x_gelu", K),
        VisualWordsSpec(**visual_words),
    )
    return build_vlm(spec).eval()


def test_vm_head_matches_the_release() -> None:
    head = vm_head(D, V, init_std=0.02)
    assert head.bias is None and head.weight.shape == (V, D)
    assert abs(float(head.weight.detach().std()) - 0.02) < 0.01


def test_zero_when_lm_logits_equal_the_target_and_only_image_positions_count(word_tokenizer) -> None:
    from visprior.models.visual_words import VisualWordsSpec, visual_words_loss

    head = vm_head(D, V)
    image_mask = torch.tensor([[False, True, True, False, False], [True, True, False, False, False]])
    features = torch.randn(2, 2, D)  # [N, K, D]: row 0's image, then row 1's
    logits = torch.randn(2, 5, V)
    with torch.no_grad():  # the LM's logit at t - 1 equals the target's logit at t (plus a constant)
        target = head(features.reshape(4, D))
        logits[0, 0], logits[0, 1], logits[1, 0] = target[0] + 3.0, target[1] - 1.0, target[3]
    logits.requires_grad_(True)
    spec = VisualWordsSpec()
    loss = visual_words_loss(logits, image_mask, features, head, spec)
    assert abs(loss.item()) < 1e-6
    other = logits.detach().clone()
    other[0, 3:] += torch.randn(2, V)  # rows that predict no image token: the loss does not see them
    other[1, 2:] += torch.randn(3, V)
    assert abs(visual_words_loss(other, image_mask, features, head, spec).item()) < 1e-6
    shifted = logits.detach().clone()
    shifted[0, 1] += torch.randn(V)
    loss = visual_words_loss(shifted.requires_grad_(True), image_mask, features, head, spec)
    loss.backward()
    touched = shifted.grad.abs().sum(-1) > 0  # [B, T]
    assert touched.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]


def test_inside_the_vlm_text_and_visual_losses_and_gradients(word_tokenizer) -> None:
    vlm = vw_vlm(word_tokenizer, weight=0.5).train()
    ids = torch.tensor([[6, 2, 2, 2, 2, 7, 8, 0]])
    labels = ids.clone()  # image labels left unmasked on purpose: the model keeps image positions out of the text loss
    pixels = torch.randn(1, 3, 32, 32)
    out = vlm(ids, labels=labels, pixel_values=pixels)
    assert int(out.num_supervised) == 3  # 7, 8, 0 after the image; never the image positions
    torch.testing.assert_close(out.loss, out.text_loss + 0.5 * out.visual_words_loss)
    assert out.visual_words_loss.item() > 0
    vlm.zero_grad()
    out.visual_words_loss.backward()
    grads = {name: module for name, module in vlm.named_children()}
    for name in ("connector", "vm_head"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grads[name].parameters()), name
    detached = vw_vlm(word_tokenizer, detach_target=True).train()
    detached(ids, labels=labels, pixel_values=pixels).visual_words_loss.backward()
    assert detached.vm_head.weight.grad is None
    assert all(p.grad is not None for p in detached.connector.parameters())  # through the LM's prediction side


def test_pseudo_image_features_lie_in_the_span_of_the_embedding_matrix(word_tokenizer) -> None:
    vlm = vw_vlm(word_tokenizer, pseudo_image_features=True)
    table = vlm.language_model.get_input_embeddings().weight
    with torch.no_grad():  # a rank-3 embedding matrix, so "in its span" is a real constraint in 32 dimensions
        table.copy_(torch.randn(table.shape[0], 3) @ torch.randn(3, table.shape[1]))
    ids = torch.tensor([[6, 2, 2, 2, 2, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        placed = vlm.embed(ids, pixels)[ids == IMAGE_ID]  # [K, D] what the LM reads at the image positions
        features = vlm.encode_images(pixels)[0]  # [K, D] the connector outputs

    def residual(x: torch.Tensor) -> float:
        basis = torch.linalg.svd(table.detach(), full_matrices=False).Vh[:3]  # [3, D] the row space of E
        return float((x - x @ basis.T @ basis).norm() / x.norm())

    assert residual(placed) < 1e-5 and residual(features) > 0.1
    expected = pseudo_image_features(vlm.vm_head(features), table.detach())
    torch.testing.assert_close(placed, expected)
    plain = vw_vlm(word_tokenizer)  # without the switch the LM reads the connector outputs
    with torch.no_grad():
        torch.testing.assert_close(plain.embed(ids, pixels)[ids == IMAGE_ID], plain.encode_images(pixels)[0])


def test_packed_batch_gives_each_sample_its_unpacked_visual_words_loss(word_tokenizer) -> None:
    """Three samples, two of them starting with their image (the first image token has no prediction, packed or not)."""
    from visprior.models.visual_words import VisualWordsSpec, visual_words_loss

    vlm = vw_vlm(word_tokenizer)
    docs = [[2, 2, 2, 2, 9, 10, 0], [6, 7, 2, 2, 2, 2, 8, 0], [2, 2, 2, 2, 11, 0]]
    pixels = torch.randn(3, 3, 32, 32)
    spec = VisualWordsSpec()
    alone = []
    with torch.no_grad():
        for i, doc in enumerate(docs):
            ids = torch.tensor([doc])
            out = vlm(ids, labels=ids, pixel_values=pixels[i : i + 1])
            per_token = visual_words_loss(
                out.logits, out.image_mask, out.image_features, vlm.vm_head, spec, None, "none"
            )
            alone.append(per_token)
        ids = torch.tensor([docs[0] + docs[1] + docs[2] + [1, 1]])
        document_ids = torch.tensor([[0] * 7 + [1] * 8 + [2] * 6 + [-1, -1]])
        position_ids = torch.tensor([list(range(7)) + list(range(8)) + list(range(6)) + [0, 0]])
        out = vlm(ids, labels=ids, position_ids=position_ids, document_ids=document_ids, pixel_values=pixels)
        packed = visual_words_loss(
            out.logits, out.image_mask, out.image_features, vlm.vm_head, spec, document_ids, "none"
        )
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert [int((a > 0).sum()) for a in alone] == [3, 4, 3]  # a sample's first image token has no prediction at t = 0
    batch_mean = torch.cat(alone).sum() / 10
    torch.testing.assert_close(out.visual_words_loss, batch_mean)  # batchmean over the 10 predicted image positions


# ---------------------------------------------------------------------------------------------------- in the stages


def test_stage_switch_trains_vm_head_and_logs_both_losses(toyworld_dir, tokenizer_dir) -> None:
    """`visual_words` in InstructionTuning: vm_head trains at the connector's rate, packed SFT rows, both losses logged."""
    import lightning.pytorch as pl

    from visprior.data.datamodule import SourceSpec, VisionLanguageDataModule
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.models.visual_words import VisualWordsSpec
    from visprior.stages import InstructionTuning, VisionLanguagePretraining

    lm = LanguageModelSpec(config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "intermediate_size": 128}, tokenizer=str(tokenizer_dir))  # fmt: skip
    tower = VisionTowerSpec(config={"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 16,
                                    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "intermediate_size": 128, "vision_use_head": False}, feature_layer=-1)  # fmt: skip
    stage = InstructionTuning(lm, tower, visual_words=VisualWordsSpec())
    assert stage.trainable == {"connector": 1e-3, "language_model": 2e-4, "vm_head": 1e-3}
    assert stage.hparams["visual_words"]["weight"] == 1.0
    head_before = stage.model.vm_head.weight.detach().clone()
    dm = VisionLanguageDataModule([SourceSpec(str(toyworld_dir / "sft"))], batch_size=2, seq_len=160, packing=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(stage, dm)
    metrics = trainer.callback_metrics
    assert {"train/text_loss", "train/visual_words_loss", "train/loss"} <= set(metrics)
    total = float(metrics["train/text_loss"]) + float(metrics["train/visual_words_loss"])
    assert float(metrics["train/loss"]) == pytest.approx(total, rel=1e-5)
    assert not torch.equal(stage.model.vm_head.weight, head_before)
    plain = VisionLanguagePretraining(lm, tower)
    assert plain.model.vm_head is None and "vm_head" not in plain.trainable
    frozen_head = VisionLanguagePretraining(lm, tower, visual_words=VisualWordsSpec(train_head=False))
    assert "vm_head" not in frozen_head.trainable and not frozen_head.model.vm_head.weight.requires_grad


def test_a_pseudo_feature_checkpoint_loads_for_evaluation(tmp_path, tokenizer_dir) -> None:
    """`load_vlm` rebuilds vm_head from the hyper-parameters, so a PIF model evaluates with the features it trained on."""
    import lightning.pytorch as pl

    from visprior.eval.load import load_vlm
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.models.visual_words import VisualWordsSpec
    from visprior.stages import VisionLanguagePretraining

    lm = LanguageModelSpec(config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 64}, tokenizer=str(tokenizer_dir))  # fmt: skip
    tower = VisionTowerSpec(config={"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 16,
                                    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64, "vision_use_head": False}, feature_layer=-1)  # fmt: skip
    stage = VisionLanguagePretraining(lm, tower, visual_words=VisualWordsSpec(pseudo_image_features=True)).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "vw.ckpt")
    loaded = load_vlm(tmp_path / "vw.ckpt")
    assert loaded.visual_words is not None and loaded.visual_words.pseudo_image_features
    image_id = stage.model.image_token_id
    ids = torch.tensor([[5, image_id, image_id, image_id, image_id, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(ids, pixels), stage.model.embed(ids, pixels))
