"""VisionLanguageModel: vision tower + connector + HF causal LM, one forward for packed multimodal (or text-only) batches.

Connector outputs replace the `<image>` token embeddings in order, so the LM never sees a special image path and stays a
plain HF causal LM that can be saved and exported as it is. With `vision_tower=None` the same class is the text-only model
of the language pre-training stage: one forward signature for every stage, and its `language_model` initialises the next.

The model owns the rules of packed rows (`models/attention.py`): the attention mask in its backend's form, and which
targets are supervised (not the first token of a packed document, never an image position). With `visual_words` it adds
VW-LMM's KL at image positions through a `vm_head` component (`models/visual_words.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from visprior.models.attention import attention_mask_for, mask_document_starts
from visprior.models.connectors import ConnectorSpec, build_connector
from visprior.models.language import (
    IGNORE_INDEX,
    LanguageModelSpec,
    build_language_model,
    causal_lm_loss,
    image_token_id,
    turn_averaged_loss,
)
from visprior.models.vision import VisionTower, VisionTowerSpec, build_vision_tower
from visprior.models.visual_words import VisualWordsSpec, pseudo_image_features, visual_words_loss, vm_head

COMPONENTS = ("vision_tower", "connector", "language_model", "vm_head")


@dataclass
class VLMSpec:
    """The three parts; `vision_tower=None` builds the text-only model for language pre-training."""

    language_model: LanguageModelSpec
    vision_tower: VisionTowerSpec | None = None
    connector: ConnectorSpec = field(default_factory=ConnectorSpec)
    visual_words: VisualWordsSpec | None = None
    """VW-LMM's loss at image positions (adds a `vm_head` component); None: text loss only."""


@dataclass
class VLMOutput:
    """Loss (None without labels), logits `[B, T, V]`, supervised-token count, and the image features used.

    With visual words, `loss = text_loss + weight * visual_words_loss`; without, `loss = text_loss`.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_supervised: torch.Tensor | None
    image_features: torch.Tensor | None = None  # [N, K, D] connector outputs (before any pseudo-feature mapping)
    image_mask: torch.Tensor | None = None  # [B, T] True at image-token positions
    text_loss: torch.Tensor | None = None
    visual_words_loss: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """Vision tower + connector + causal LM; components are named so stages freeze and initialise them by name."""

    def __init__(
        self,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vision_tower: VisionTower | None = None,
        connector: nn.Module | None = None,
        visual_words: VisualWordsSpec | None = None,
        vm_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (vision_tower is None) != (connector is None):
            raise ValueError("give both a vision tower and a connector, or neither (text-only model)")
        if (visual_words is None) != (vm_head is None):
            raise ValueError("visual_words and vm_head come together")
        if visual_words is not None and vision_tower is None:
            raise ValueError("the visual-words loss needs a vision tower (it supervises image positions)")
        self.vision_tower = vision_tower
        self.connector = connector
        self.language_model = language_model
        self.vm_head = vm_head
        self.visual_words = visual_words
        self.tokenizer = tokenizer
        self.image_token_id: int = image_token_id(tokenizer)
        self.vision_on_text_batches = False
        """Run the vision path on a blank image for batches without images (set by the training stages)."""
        self.num_image_tokens: int = connector.num_tokens if connector is not None else 0
        self.image_transform: Callable[[Image.Image], torch.Tensor] | None = (
            vision_tower.image_transform if vision_tower is not None else None
        )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` -> connector outputs `[N, K, D_lm]`."""
        if self.vision_tower is None:
            raise ValueError("this model is text-only (built without a vision tower) but got pixel_values")
        return self.connector(self.vision_tower(pixel_values))  # [N, K, D]

    def check_image_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """`input_ids` hold exactly `num_image_tokens` image tokens per image of `pixel_values` (none without)."""
        found = int((input_ids == self.image_token_id).sum())
        if pixel_values is None:
            if found:
                raise ValueError(f"input_ids hold {found} image tokens but pixel_values is None")
            return
        if self.vision_tower is None:
            raise ValueError("this model is text-only (built without a vision tower) but got pixel_values")
        expected = pixel_values.shape[0] * self.num_image_tokens
        if found != expected:
            raise ValueError(
                f"input_ids hold {found} image tokens but {pixel_values.shape[0]} images x {self.num_image_tokens} "
                f"tokens per image = {expected} are needed (num_image_tokens={self.num_image_tokens})"
            )

    def _embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, T, D]
        is_image = input_ids == self.image_token_id  # [B, T]
        if input_ids.device.type == "cpu":  # on an accelerator the count would stall every step: the stages check
            self.check_image_tokens(input_ids, pixel_values)  # batches on the host before transfer instead
        if pixel_values is None:
            if self.vision_on_text_batches and self.vision_tower is not None:
                embeds = embeds + self._vision_keepalive(embeds)
            return embeds, None
        features = self.encode_images(pixel_values)  # [N, K, D]
        placed = features
        if self.visual_words is not None and self.visual_words.pseudo_image_features:
            table = self.language_model.get_input_embeddings().weight  # [V, D]
            placed = pseudo_image_features(self.vm_head(features), table, self.visual_words.temperature)  # [N, K, D]
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), placed.to(embeds.dtype))  # row-major, in order
        return embeds, features

    def _vision_keepalive(self, embeds: torch.Tensor) -> torch.Tensor:
        """0 x the vision path run on one blank image, for a batch without images (a mixture's text rows).

        Every process then runs the same modules in the same order each step, whatever its batch holds: DDP gets a (zero)
        gradient for every trainable tower / connector / vm_head parameter, and FSDP2's per-block all-gathers and
        reduce-scatters match across ranks (a rank that skips the tower mismatches them: a gloo size error or a hang,
        DeepSpeed issue 7170; LLaMA-Factory feeds a dummy image too). Adding 0 changes no embedding.
        """
        size = self.vision_tower.image_size
        features = self.encode_images(embeds.new_zeros(1, 3, size, size))  # [1, K, D]
        total = features.float().sum()
        if self.vm_head is not None:
            total = total + self.vm_head(features).float().sum()
        return (total * 0.0).to(embeds.dtype)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[B, T, D]` with image features written over the image-token positions, row-major."""
        return self._embed(input_ids, pixel_values)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        loss_average: str = "token",
    ) -> VLMOutput:
        """Logits and (with labels) the loss: mean over supervised tokens, or over answer turns (`loss_average="turn"`).

        `document_ids` `[B, T]` (-1 = padding) gives block-causal attention, and targets whose previous token lies in
        another document are not supervised; without it attention is plain causal over the row. Image positions are
        never text targets. With `visual_words` the loss adds the KL at image positions (see `VLMOutput`).
        """
        if loss_average not in ("token", "turn"):
            raise ValueError(f"loss_average must be 'token' or 'turn', got {loss_average!r}")
        embeds, features = self._embed(input_ids, pixel_values)  # [B, T, D]
        if document_ids is not None:
            attn_impl = self.language_model.config._attn_implementation
            attention_mask = attention_mask_for(document_ids, attn_impl, embeds.dtype)  # [B, 1, T, T] or a BlockMask
            if attention_mask is None and position_ids is None:  # varlen backends read the documents from positions
                raise ValueError(
                    f"{attn_impl} finds packed documents from position_ids (restarting at 0 per document): pass "
                    "position_ids with document_ids"
                )
        else:  # an explicit 2D mask stops transformers from inferring packing from position_ids
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)  # [B, T]
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        image_mask = input_ids == self.image_token_id if features is not None else None
        loss = num_supervised = text_loss = vw_loss = None
        if labels is not None:
            labels = mask_document_starts(labels, document_ids)
            if image_mask is not None:
                labels = labels.masked_fill(image_mask, IGNORE_INDEX)
            text_loss, num_supervised = causal_lm_loss(out.logits, labels)
            if loss_average == "turn":
                text_loss = turn_averaged_loss(out.logits, labels)
            loss = text_loss
            if self.visual_words is not None and features is not None:
                vw_loss = visual_words_loss(
                    out.logits, image_mask, features, self.vm_head, self.visual_words, document_ids
                )
                loss = text_loss + self.visual_words.weight * vw_loss
        return VLMOutput(loss, out.logits, num_supervised, features, image_mask, text_loss, vw_loss)


def build_vlm(spec: VLMSpec) -> VisionLanguageModel:
    """Build LM + tokenizer, and (unless text-only) the tower and a connector sized between them."""
    language_model, tokenizer = build_language_model(spec.language_model)
    if spec.vision_tower is None:
        return VisionLanguageModel(language_model, tokenizer)
    tower = build_vision_tower(spec.vision_tower)
    lm_dim = language_model.get_input_embeddings().embedding_dim
    connector = build_connector(spec.connector, tower.hidden_size, lm_dim, tower.num_tokens)
    head = None
    if spec.visual_words is not None:
        vocab = language_model.get_output_embeddings().out_features
        head = vm_head(lm_dim, vocab, getattr(language_model.config, "initializer_range", None))
    return VisionLanguageModel(language_model, tokenizer, tower, connector, spec.visual_words, head)
