"""Stages that train the VisionLanguageModel with next-token loss: alignment / pre-training and instruction tuning.

They differ only in data and in which components train by default, so they are one constructor with two defaults:
`VisionLanguagePretraining` takes any weighted mixture of pairs, interleaved documents and text (MM1's 45:45:10 is a
weight vector in the data module) and by default trains the connector only (LLaVA's alignment); `InstructionTuning`
trains on LLaVA-schema conversations, optionally re-blended with text-only conversations (VILA), and by default trains the
connector and the LM. Either adds VW-LMM's visual-words loss with `visual_words` (`visprior.models.visual_words`): the
text and visual-words losses are logged separately.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.models.visual_words import VisualWordsSpec
from visprior.models.vlm import VisionLanguageModel, VLMSpec, build_vlm
from visprior.stages.base import Stage, StepOutput, coerce
from visprior.stages.flops import flops_factor, transformer_flops_per_token
from visprior.stages.init_from import resolve_model_specs


class VLMStage(Stage):
    """Next-token loss on any batch of the contract (packed or padded, with or without images)."""

    model: VisionLanguageModel

    def __init__(self, spec: VLMSpec, loss_average: Literal["token", "turn"] = "token", **stage_args: Any):
        """
        Args:
            spec: the model: language model, vision tower (None for text only), connector, visual words.
            loss_average: `token` (mean over supervised tokens) or `turn` (every answer turn weighs the same).
            stage_args: the shared options of `Stage` (trainable, init_from, warmup_steps, peak_flops, ...).
        """
        if loss_average not in ("token", "turn"):
            raise ValueError(f"loss_average must be 'token' or 'turn', got {loss_average!r}")
        model = build_vlm(spec)
        super().__init__(model, **stage_args)
        self.loss_average = loss_average
        model.vision_on_text_batches = True  # same modules on every rank every step (DDP, FSDP2); see the model
        self.tokenizer = model.tokenizer
        self.image_transform = model.image_transform
        self.num_image_tokens = model.num_image_tokens

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        out = self.model(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
            pixel_values=batch.get("pixel_values"),
            loss_average=self.loss_average,
        )
        counts = self.host_counts(batch)
        loss = out.loss  # a batch without images still ran the vision path (VisionLanguageModel.vision_on_text_batches)
        metrics = {}
        if self.model.visual_words is not None:  # both losses, so a recipe can see what each term does
            metrics["text_loss"] = out.text_loss.detach()
            if out.visual_words_loss is not None:
                metrics["visual_words_loss"] = out.visual_words_loss.detach()
        # a token mean is weighted across ranks by supervised tokens; turn means and the visual-words sum are per rank
        per_token = self.loss_average == "token" and self.model.visual_words is None
        weight = out.num_supervised if per_token else None
        return StepOutput(loss, supervised=out.num_supervised, metrics=metrics, weight=weight, **counts)

    def batch_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Non-padding tokens, documents and images of a batch (on the host: see `Stage.batch_counts`)."""
        docs = batch["document_ids"]  # [B, T], -1 = padding
        pixels = batch.get("pixel_values")
        self.model.check_image_tokens(batch["input_ids"], pixels)  # here, on the host, not in the step
        return {
            "tokens": int((docs >= 0).sum()),
            "samples": int((docs.max(dim=1).values + 1).clamp(min=0).sum()),
            "images": 0 if pixels is None else int(pixels.shape[0]),
        }

    def flops_per_token(self, batch: dict[str, Any]) -> float:
        """Vision tower per image + connector per image + LM per token (see `flops.py`), over the batch's tokens."""
        m, trains = self.model, set(self.trainable)
        rows, seq_len = batch["input_ids"].shape
        tokens = max(self.host_counts(batch)["tokens"], 1)
        total, upstream = 0.0, False
        if m.vision_tower is not None and batch.get("pixel_values") is not None:
            n_img = batch["pixel_values"].shape[0]
            tower = m.vision_tower
            f = flops_factor("vision_tower" in trains, False)
            upstream = "vision_tower" in trains
            total += (
                n_img
                * tower.num_patches
                * transformer_flops_per_token(tower, tower.num_layers_used, tower.hidden_size, tower.num_patches, f)
            )
            f = flops_factor("connector" in trains, upstream)
            upstream = upstream or "connector" in trains
            total += n_img * tower.num_patches * transformer_flops_per_token(m.connector, 0, 0, 0, f)
        cfg = m.language_model.config
        f = flops_factor("language_model" in trains, upstream)
        total += (
            rows
            * seq_len
            * transformer_flops_per_token(m.language_model, cfg.num_hidden_layers, cfg.hidden_size, seq_len, f)
        )
        return total / tokens

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        supervised = max(int(out.supervised), 1)  # the loss is weighted by it across batches and ranks
        self.log("val/loss", out.loss, batch_size=supervised, sync_dist=True)
        for name, value in out.metrics.items():
            self.log(f"val/{name}", value, batch_size=supervised, sync_dist=True)


class VisionLanguagePretraining(VLMStage):
    """Alignment / multimodal pre-training on a weighted mixture of pairs, interleaved documents and text."""

    default_trainable: ClassVar[dict[str, float]] = {"connector": 1e-3}  # LLaVA's alignment: the connector only

    def __init__(
        self,
        language_model: LanguageModelSpec | None = None,
        vision_tower: VisionTowerSpec | None = None,
        connector: ConnectorSpec | None = None,
        visual_words: VisualWordsSpec | None = None,
        loss_average: Literal["token", "turn"] = "token",
        trainable: dict[str, float] | None = None,
        **stage_args: Any,
    ):
        """
        Args:
            language_model: the LM and tokenizer (a toy config or a local HF folder); None: from `init_from`.
            vision_tower: the vision tower (config or local folder) and the layer it is read at; None: from `init_from`.
            connector: vision features -> LM embeddings (default `mlp2x_gelu`, one token per patch).
            visual_words: VW-LMM's KL at image positions (adds a `vm_head` component, which trains at the connector's
                learning rate unless `trainable` names it or `visual_words.train_head` is false); None: text loss only.
            loss_average: `token` (LLaVA: mean over supervised tokens) or `turn` (every answer turn weighs the same, so
                one-word answers are not outweighed by long descriptions).
            trainable: component -> learning rate (default: the class's `default_trainable`).
            stage_args: the shared options of `Stage`.
        """
        language_model, vision_tower, connector, stage_args["init_from"] = resolve_model_specs(
            coerce(LanguageModelSpec, language_model),
            coerce(VisionTowerSpec, vision_tower),
            coerce(ConnectorSpec, connector),
            stage_args.get("init_from"),
        )
        connector = connector or ConnectorSpec()
        visual_words = coerce(VisualWordsSpec, visual_words)
        trainable = dict(trainable if trainable is not None else self.default_trainable)
        if (
            visual_words is not None
            and visual_words.train_head
            and "vm_head" not in trainable
            and "connector" in trainable
        ):
            trainable["vm_head"] = trainable["connector"]
        spec = VLMSpec(language_model, vision_tower, connector, visual_words)
        super().__init__(spec, loss_average=loss_average, trainable=trainable, **stage_args)


class InstructionTuning(VisionLanguagePretraining):
    """Instruction tuning on LLaVA-schema conversations (optionally re-blended with text-only ones in the data module).

    The constructor is `VisionLanguagePretraining`'s; only what trains by default differs.
    """

    default_trainable: ClassVar[dict[str, float]] = {"connector": 1e-3, "language_model": 2e-4}  # LLaVA's SFT
