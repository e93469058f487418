"""Supervised image classification of a vision tower: the toy stand-in for an encoder that already recognises objects.

The tower is read at its last layer (like contrastive pre-training, so every layer gets a gradient); its patch features are
mean-pooled and a linear head maps them to class logits, trained with cross-entropy (optionally label-smoothed). The
checkpoint keeps the tower under `model.vision_tower.*`, so later stages take it with
`init_from: [{path: .../last.ckpt, components: [vision_tower]}]`. Data: `visprior.data.classification.ImageClassificationDataModule`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visprior.models.vision import VisionTowerSpec, build_vision_tower
from visprior.stages.base import Stage, StepOutput, coerce
from visprior.stages.flops import flops_factor, transformer_flops_per_token


class ImageClassification(Stage):
    """Vision tower + mean pool + linear head, cross-entropy on labelled images."""

    def __init__(
        self,
        vision_tower: VisionTowerSpec,
        num_classes: int,
        label_smoothing: float = 0.0,
        trainable: dict[str, float] | None = None,
        weight_decay: float = 0.05,
        **stage_args: Any,
    ):
        """
        Args:
            vision_tower: the tower to train; read at its last layer here whatever `feature_layer` says, while later
                stages read the layer their spec names.
            num_classes: number of classes (labels are `0..num_classes-1`; others are skipped by the data module).
            label_smoothing: cross-entropy label smoothing.
            trainable: component -> learning rate (default: vision_tower and head at 1e-3).
            weight_decay: AdamW decay for matrices.
            stage_args: the shared options of `Stage`.
        """
        vision_tower = coerce(VisionTowerSpec, vision_tower)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        trainable = trainable if trainable is not None else {"vision_tower": 1e-3, "head": 1e-3}
        super().__init__(trainable=trainable, weight_decay=weight_decay, **stage_args)
        self.save_plain_hyperparameters(
            vision_tower=vision_tower,
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            trainable=trainable,
            weight_decay=weight_decay,
            **stage_args,
        )
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        tower = build_vision_tower(dataclasses.replace(vision_tower, feature_layer=-1))
        self.model = nn.ModuleDict({"vision_tower": tower, "head": nn.Linear(tower.hidden_size, num_classes)})
        self.image_transform = tower.image_transform
        self.apply_freezing()

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model["vision_tower"](pixel_values).mean(dim=1)  # [B, D]
        return self.model["head"](feats)  # [B, num_classes]

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        pixels, labels = batch["pixel_values"], batch["labels"]  # [B, C, H, W], [B]
        logits = self.logits(pixels)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        n = int(pixels.shape[0])
        tokens = n * self.model["vision_tower"].num_patches
        return StepOutput(loss, tokens=tokens, supervised=0, samples=n, images=n, metrics={"accuracy": acc})

    def flops_per_token(self, batch: dict[str, Any]) -> float:
        """Per patch token: the tower (the head's matmul is negligible)."""
        tower = self.model["vision_tower"]
        factor = flops_factor("vision_tower" in self.trainable, False)
        return transformer_flops_per_token(tower, tower.num_layers_used, tower.hidden_size, tower.num_patches, factor)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        self.log("val/loss", out.loss, batch_size=out.samples, sync_dist=True)
        self.log("val/accuracy", out.metrics["accuracy"], batch_size=out.samples, sync_dist=True)
