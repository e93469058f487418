"""LM4VE (Pang et al., 2024, "Frozen Transformers in Language Models Are Effective Visual Encoder Layers").

A ViT classifier gets one extra block after its encoder: a transformer block taken from a pre-trained LLM, kept frozen, fed
and read through two trainable linear adapters (ViT dim -> LLM dim -> ViT dim), as in the paper's `F_L^M2 . F_LM . F_L^M1`.
The residual path is the block's own (pre-norm attention and MLP residuals); there is no extra skip around the adapters,
matching the paper's code. Like the paper, the block sees all visual tokens at once: attention is bidirectional (no causal
mask) and, by default, positions are not re-encoded (the rotary embedding is the identity: the ViT has already added its
own position embeddings); `rope=True` applies the LLM's rotary embedding over token indices instead.

Variants, so the paper's ablation can be run: `llm_block` (frozen), `llm_block_unfrozen` (same block, trained), `mlp` (a
trainable residual MLP with about the block's parameter count, ruling out added capacity), `none` (plain ViT).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import nn

from visprior.models.language import LanguageModelSpec, load_causal_lm
from visprior.models.vision import VisionTower, VisionTowerSpec, build_vision_tower

VARIANTS = ("llm_block", "llm_block_unfrozen", "mlp", "none")


@dataclass
class FrozenBlockClassifierSpec:
    """A ViT classifier with (or without) an LLM block after its encoder."""

    vision_tower: VisionTowerSpec
    """The ViT; read at its last layer (`feature_layer=-1`) for classification."""
    num_classes: int
    variant: Literal["llm_block", "llm_block_unfrozen", "mlp", "none"] = "llm_block"
    """Which block follows the encoder (see the module docstring)."""
    language_model: LanguageModelSpec | None = None
    """The LLM the block comes from (also sizes the `mlp` variant); unused by `none`. A `config` needs `vocab_size`."""
    layer: int = -1
    """Decoder layer index in the LLM; the paper uses LLaMA-7B's last."""
    rope: bool = False
    """Apply the LLM's rotary position embedding over token indices (the paper does not)."""
    pool: Literal["mean", "cls"] = "mean"
    """Classify from the mean of all tokens, or from the CLS token (ViT / CLIP towers)."""


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (tied ones once)."""
    return sum(p.numel() for p in module.parameters())


class LLMBlockAdapter(nn.Module):
    """`[N, P, D_vit]` -> linear -> LLM decoder layer (bidirectional) -> linear -> `[N, P, D_vit]`."""

    def __init__(self, block: nn.Module, vit_dim: int, llm_dim: int, head_dim: int, rotary: nn.Module | None = None):
        super().__init__()
        self.adapter_in = nn.Linear(vit_dim, llm_dim)
        self.block = block
        self.adapter_out = nn.Linear(llm_dim, vit_dim)
        self.rotary = rotary
        self.head_dim = head_dim

    def _position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens = hidden.shape[1]
        if self.rotary is None:  # identity rotation: cos = 1, sin = 0
            cos = torch.ones(1, n_tokens, self.head_dim, dtype=hidden.dtype, device=hidden.device)  # [1, P, Dh]
            return cos, torch.zeros_like(cos)
        positions = torch.arange(n_tokens, device=hidden.device)[None]  # [1, P]
        return self.rotary(hidden, position_ids=positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.adapter_in(x)  # [N, P, D_llm]
        hidden = self.block(
            hidden,
            attention_mask=None,
            position_embeddings=self._position_embeddings(hidden),
            is_causal=False,  # honoured by the sdpa / flash backends; eager without a mask is bidirectional already
        )
        return self.adapter_out(hidden)  # [N, P, D_vit]


class MLPAdapter(nn.Module):
    """The control: same adapters, but a trainable pre-norm residual MLP in place of the LLM block."""

    def __init__(self, vit_dim: int, llm_dim: int, hidden_dim: int):
        super().__init__()
        self.adapter_in = nn.Linear(vit_dim, llm_dim)
        self.norm = nn.LayerNorm(llm_dim)
        self.mlp = nn.Sequential(nn.Linear(llm_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, llm_dim))
        self.adapter_out = nn.Linear(llm_dim, vit_dim)

    @staticmethod
    def hidden_for(llm_dim: int, target_params: int) -> int:
        """MLP width whose norm + two linears hold about `target_params`: H (2D + 1) + 3D = target."""
        return max(1, round((target_params - 3 * llm_dim) / (2 * llm_dim + 1)))

    def block_parameters(self) -> int:
        return parameter_count(self.norm) + parameter_count(self.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.adapter_in(x)  # [N, P, D_llm]
        hidden = hidden + self.mlp(self.norm(hidden))
        return self.adapter_out(hidden)  # [N, P, D_vit]


class FrozenBlockClassifier(nn.Module):
    """ViT encoder -> (LLM block | MLP | nothing) -> LayerNorm -> pool -> linear head: `[N, C, H, W]` -> `[N, classes]`."""

    def __init__(self, vision_tower: VisionTower, extra: nn.Module | None, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if pool == "cls" and vision_tower.select != "cls_patch":
            raise ValueError("pool='cls' needs a tower with a CLS token read with select='cls_patch'")
        self.vision_tower = vision_tower
        self.extra = extra
        self.norm = nn.LayerNorm(vision_tower.hidden_size)
        self.head = nn.Linear(vision_tower.hidden_size, num_classes)
        self.pool = pool
        self.image_transform: Callable[[Image.Image], torch.Tensor] = vision_tower.image_transform

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_tower(pixel_values)  # [N, P, D]
        if self.extra is not None:
            tokens = self.extra(tokens)  # [N, P, D]
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)  # [N, D]
        return self.head(pooled)  # [N, classes]


def llm_block_adapter(
    lm_spec: LanguageModelSpec, vit_dim: int, layer: int = -1, rope: bool = False, frozen: bool = True
) -> LLMBlockAdapter:
    """Take decoder layer `layer` (and the rotary embedding) out of the LLM and wrap it in adapters."""
    decoder = load_causal_lm(lm_spec).get_decoder()
    layers = decoder.layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range for an LLM with {len(layers)} decoder layers")
    block = copy.deepcopy(layers[layer])  # the rest of the LLM is dropped
    block.requires_grad_(not frozen)
    config = decoder.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = copy.deepcopy(decoder.rotary_emb) if rope else None
    return LLMBlockAdapter(block, vit_dim, config.hidden_size, head_dim, rotary)


def build_frozen_block_classifier(spec: FrozenBlockClassifierSpec) -> FrozenBlockClassifier:
    """Build one arm of the LM4VE ablation."""
    if spec.variant not in VARIANTS:
        raise ValueError(f"unknown LM4VE variant {spec.variant!r}; choose one of {VARIANTS}")
    tower = build_vision_tower(spec.vision_tower)
    extra: nn.Module | None = None
    if spec.variant != "none":
        if spec.language_model is None:
            raise ValueError(f"variant {spec.variant!r} needs `language_model` (the LLM the block comes from)")
        block = llm_block_adapter(
            spec.language_model, tower.hidden_size, spec.layer, spec.rope, frozen=spec.variant == "llm_block"
        )
        if spec.variant == "mlp":
            llm_dim = block.adapter_in.out_features
            hidden = MLPAdapter.hidden_for(llm_dim, parameter_count(block.block))
            extra = MLPAdapter(tower.hidden_size, llm_dim, hidden)
        else:
            extra = block
    return FrozenBlockClassifier(tower, extra, spec.num_classes, spec.pool)
