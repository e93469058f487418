"""Contrastive image-text pre-training of a toy vision tower: the stand-in for the released CLIP / SigLIP encoders.

The papers start from pre-trained vision encoders; at toy scale we make one. Each batch row is one pair, tokenized as
`<image> caption <eos>` with one row per sample (padded, not packed). The image goes through the vision tower (last layer,
mean over patches); the caption goes through a small causal LM used as text encoder, read at its final `<eos>` token
(which has attended to the whole caption, CLIP's EOT pooling); the `<image>` placeholder at position 0 is a constant token
and carries no information. Two linear projections map both into a shared space.

Losses: `siglip` (sigmoid over every image-text pair, learned temperature and bias; Zhai et al. 2023) or `clip`
(InfoNCE, softmax over the batch in both directions; Radford et al. 2021). Negatives are the other rows of the local
batch: under DDP each rank contrasts its own batch (no all-gather), so the effective negatives are `batch_size - 1`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from visprior.models.attention import attention_mask_for
from visprior.models.language import LanguageModelSpec, build_language_model
from visprior.models.vision import VisionTowerSpec, build_vision_tower
from visprior.stages.base import Stage, StepOutput, coerce
from visprior.stages.flops import flops_factor, transformer_flops_per_token


class ContrastiveHead(nn.Module):
    """Projections into the joint space plus the learned temperature (and SigLIP's bias)."""

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int, loss: str):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        init_scale, init_bias = (math.log(10.0), -10.0) if loss == "siglip" else (math.log(1 / 0.07), 0.0)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(init_bias), requires_grad=loss == "siglip")


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss: +1 on the diagonal, -1 elsewhere, summed over pairs and averaged over images."""
    n = logits.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1  # [N, N]
    return -F.logsigmoid(signs * logits).sum() / n


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: image->text and text->image cross-entropy over the batch."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ContrastivePretraining(Stage):
    """SigLIP- or CLIP-style training of a vision tower against a small text encoder on image-caption pairs."""

    default_trainable: ClassVar[dict[str, float]] = {"vision_tower": 1e-3, "text_encoder": 1e-3, "head": 1e-3}

    def __init__(
        self,
        vision_tower: VisionTowerSpec,
        text_encoder: LanguageModelSpec,
        loss: Literal["siglip", "clip"] = "siglip",
        embed_dim: int = 128,
        trainable: dict[str, float] | None = None,
        weight_decay: float = 0.1,
        **stage_args: Any,
    ):
        """
        Args:
            vision_tower: the tower to pre-train; read at its last layer here whatever `feature_layer` says (every layer
                then gets a gradient), while later stages read the layer their spec names.
            text_encoder: a small causal LM over the shared tokenizer, read at the caption's final `<eos>`.
            loss: `siglip` (sigmoid, learned bias) or `clip` (softmax InfoNCE).
            embed_dim: width of the joint embedding space.
            trainable: component -> learning rate (default: the class's `default_trainable`).
            weight_decay: AdamW decay for matrices.
            stage_args: the shared options of `Stage`.
        """
        vision_tower = coerce(VisionTowerSpec, vision_tower)
        text_encoder = coerce(LanguageModelSpec, text_encoder)
        tower = build_vision_tower(dataclasses.replace(vision_tower, feature_layer=-1))
        causal_lm, tokenizer = build_language_model(text_encoder, "model.text_encoder")
        text = getattr(causal_lm, causal_lm.base_model_prefix)  # the decoder only: an LM head would train on nothing
        head = ContrastiveHead(tower.hidden_size, text.config.hidden_size, embed_dim, loss)
        model = nn.ModuleDict({"vision_tower": tower, "text_encoder": text, "head": head})
        super().__init__(model, trainable=trainable, weight_decay=weight_decay, **stage_args)
        self.loss_name = loss
        self.tokenizer = tokenizer
        self.image_transform = tower.image_transform
        self.num_image_tokens = 1

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model["vision_tower"](pixel_values).mean(dim=1)  # [N, D_v]
        return F.normalize(self.model["head"].vision_proj(feats), dim=-1)  # [N, E]

    def embed_texts(self, batch: dict[str, Any]) -> torch.Tensor:
        text = self.model["text_encoder"]  # the decoder without its LM head
        dtype = text.get_input_embeddings().weight.dtype
        mask = attention_mask_for(batch["document_ids"], text.config._attn_implementation, dtype)  # [B, 1, T, T]
        hidden = text(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False
        ).last_hidden_state  # [B, T, D_t]
        supervised = batch["labels"] != -100  # caption + eos
        positions = torch.arange(supervised.shape[1], device=supervised.device)
        last = torch.where(supervised, positions, -1).max(dim=1).values.clamp(min=0)  # [B] index of the final <eos>
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, D_t]
        return F.normalize(self.model["head"].text_proj(pooled), dim=-1)  # [B, E]

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        pixels = batch["pixel_values"]
        if pixels is None or pixels.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError("contrastive batches need one image per row: use pair sources with `packing: false`")
        img, txt = self.embed_images(pixels), self.embed_texts(batch)  # [N, E] each
        head = self.model["head"]
        logits = img @ txt.t() * head.logit_scale.exp() + head.logit_bias  # [N, N]
        loss = siglip_loss(logits) if self.loss_name == "siglip" else clip_loss(logits)
        target = torch.arange(logits.shape[0], device=logits.device)
        acc = (logits.argmax(dim=1) == target).float().mean()
        return StepOutput(loss, supervised=0, metrics={"i2t_accuracy": acc}, **self.host_counts(batch))

    def batch_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Caption tokens and pairs (on the host: see `Stage.batch_counts`)."""
        n = int(batch["input_ids"].shape[0])
        return {"tokens": int((batch["document_ids"] >= 0).sum()), "samples": n, "images": n}

    def flops_per_token(self, batch: dict[str, Any]) -> float:
        tower, text = self.model["vision_tower"], self.model["text_encoder"]
        rows, seq_len = batch["input_ids"].shape
        tokens = max(self.host_counts(batch)["tokens"], 1)
        fv = flops_factor("vision_tower" in self.trainable, False)
        ft = flops_factor("text_encoder" in self.trainable, False)
        vision = (
            rows
            * tower.num_patches
            * transformer_flops_per_token(tower, tower.num_layers_used, tower.hidden_size, tower.num_patches, fv)
        )
        cfg = text.config
        txt = rows * seq_len * transformer_flops_per_token(text, cfg.num_hidden_layers, cfg.hidden_size, seq_len, ft)
        return (vision + txt) / tokens

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        self.log("val/loss", out.loss, batch_size=out.samples, sync_dist=True)
        self.log("val/i2t_accuracy", out.metrics["i2t_accuracy"], batch_size=out.samples, sync_dist=True)
