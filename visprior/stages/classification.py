"""Supervised image classification of a vision tower: the toy stand-in for an encoder that already recognises objects, and
LM4VE's experiment (a frozen LLM block inside a ViT, `visprior.models.frozen_block`).

The tower is read at its last layer (every layer gets a gradient). Without `frozen_block` its patch features are
mean-pooled and a linear head maps them to class logits. With it, the tokens go through the chosen LM4VE arm (`variant`:
`llm_block`, `llm_block_unfrozen`, `mlp`, `mlp_block_size`, `none`) and, with `head_norm`, a final LayerNorm, as LM4VE's
ViT has. The loss is cross-entropy (label-smoothed if asked) or, with `mixup`, soft-target cross-entropy on DeiT's
mixup / cutmix batches. Validation reports top-1 and top-5 accuracy (torchmetrics).

The checkpoint keeps the tower under `model.vision_tower.*`, so later stages take it with
`init_from: [{path: .../last.ckpt, components: [vision_tower]}]`. Data: `visprior.data.classification.
ImageClassificationDataModule` (toy shapes, WebDataset `cls` shards, ImageNet folders).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from visprior.data.augment import MixupSpec, mix_batch
from visprior.models.frozen_block import FrozenBlockClassifier, FrozenBlockSpec, build_frozen_block
from visprior.models.vision import VisionTowerSpec, build_vision_tower
from visprior.stages.base import Stage, StepOutput, coerce
from visprior.stages.flops import flops_factor, transformer_flops_per_token


class ImageClassification(Stage):
    """Vision tower (+ optional LM4VE block and final norm) + pool + linear head, cross-entropy on labelled images."""

    def __init__(
        self,
        vision_tower: VisionTowerSpec,
        num_classes: int,
        frozen_block: FrozenBlockSpec | None = None,
        head_norm: bool = False,
        pool: Literal["mean", "cls"] = "mean",
        label_smoothing: float = 0.0,
        mixup: MixupSpec | None = None,
        trainable: dict[str, float] | None = None,
        weight_decay: float = 0.05,
        **stage_args: Any,
    ):
        """
        Args:
            vision_tower: the tower to train; read at its last layer here whatever `feature_layer` says, while later
                stages read the layer their spec names.
            num_classes: number of classes (labels are `0..num_classes-1`; others are skipped by the data module).
            frozen_block: LM4VE's block after the encoder (its `variant` chooses the arm); None: no block.
            head_norm: a LayerNorm between pooling and head (the ViT's final norm; LM4VE's models have it).
            pool: `mean` over patch tokens, or the CLS token (a tower with `select: cls_patch`).
            label_smoothing: cross-entropy label smoothing (DeiT: 0.1).
            mixup: DeiT's mixup / cutmix of training batches (soft targets); None: plain labels.
            trainable: component -> learning rate (default: every component at 1e-3; LM4VE's `llm_block` variant keeps
                its LLM block frozen whatever this says, as a vision tower keeps its unused layers frozen).
            weight_decay: AdamW decay for matrices.
            stage_args: the shared options of `Stage`.
        """
        vision_tower = coerce(VisionTowerSpec, vision_tower)
        frozen_block = coerce(FrozenBlockSpec, frozen_block)
        mixup = coerce(MixupSpec, mixup)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        tower = build_vision_tower(dataclasses.replace(vision_tower, feature_layer=-1))
        block = build_frozen_block(frozen_block, tower.hidden_size) if frozen_block is not None else None
        model = FrozenBlockClassifier(tower, block, num_classes, pool, norm=head_norm)
        if trainable is None:  # every component (LM4VE's llm_block keeps its LLM block frozen itself)
            trainable = dict.fromkeys((name for name, _ in model.named_children()), 1e-3)
        super().__init__(model, trainable=trainable, weight_decay=weight_decay, **stage_args)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.image_transform = tower.image_transform
        top_k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        llm_block = frozen_block is not None and frozen_block.variant == "llm_block"
        if llm_block and any(p.requires_grad for p in self.model.frozen_block.block.parameters()):
            raise ValueError("variant llm_block keeps the LLM block frozen: use llm_block_unfrozen to train it")

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)  # [B, num_classes]

    def forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss, logits)`; in training with `mixup`, on the mixed batch against soft targets."""
        pixels, labels = batch["pixel_values"], batch["labels"]  # [B, C, H, W], [B]
        if self.training and self.mixup is not None:
            mixed, targets = mix_batch(pixels, labels, self.num_classes, self.mixup, self.label_smoothing)
            logits = self.logits(mixed)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
            return loss, logits
        logits = self.logits(pixels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits

    def step_output(self, batch: dict[str, Any], loss: torch.Tensor, logits: torch.Tensor) -> StepOutput:
        acc = (logits.argmax(dim=1) == batch["labels"]).float().mean()  # against the unmixed labels
        n = int(batch["pixel_values"].shape[0])
        tokens = n * self.model.vision_tower.num_patches
        return StepOutput(loss, tokens=tokens, supervised=0, samples=n, images=n, metrics={"accuracy": acc})

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        return self.step_output(batch, *self.forward_loss(batch))

    def flops_per_token(self, batch: dict[str, Any]) -> float:
        """Per patch token: the tower (the block and head are a small share at toy and paper size)."""
        tower = self.model.vision_tower
        factor = flops_factor("vision_tower" in self.trainable, False)
        return transformer_flops_per_token(tower, tower.num_layers_used, tower.hidden_size, tower.num_patches, factor)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logits = self.forward_loss(batch)
        out = self.step_output(batch, loss, logits)
        self.val_top1.update(logits, batch["labels"])
        self.val_top5.update(logits, batch["labels"])
        self.log("val/loss", out.loss, batch_size=out.samples, sync_dist=True)
        self.log("val/accuracy", out.metrics["accuracy"], batch_size=out.samples, sync_dist=True)
        self.log("val/top1", self.val_top1, batch_size=out.samples)
        self.log("val/top5", self.val_top5, batch_size=out.samples)
