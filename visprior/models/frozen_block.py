"""LM4VE (Pang et al., ICLR 2024, "Frozen Transformers in Language Models Are Effective Visual Encoder Layers").

A ViT classifier gets one extra block after its encoder: a transformer block taken from a pre-trained LLM, kept frozen, fed
and read through two trainable linear adapters. Checked against the released `image_classification/models/vit_llama.py`
and `models/llama.py` (ziqipang/LM4VisualEncoding, commit e34e919):

- `llama_dim_mapper1 = Linear(embed_dim, 4096, bias=False)` -> the LLaMA-7B block(s) from `first_layer` (31: the last, one
  block) to `n_layers` -> LLaMA's final RMSNorm -> `llama_dim_mapper2 = Linear(4096, embed_dim, bias=False)` -> the ViT's own
  final LayerNorm -> CLS token (`global_pool="token"`) -> head. No skip connection around the adapters: the residuals are the
  block's own (pre-norm attention and SwiGLU MLP).
- Their rewrite of the block removes the rotary embedding and the causal mask (`Attention.forward` has neither): the
  block sees all visual tokens at once and encodes no positions (the ViT added its own position embeddings).
- Only `layers.{i}.*` are loaded (`custom_load_state_dict(tail=True)`); the final RMSNorm is never loaded, so it keeps its
  initial weight of ones, frozen: a plain RMS normalisation (`final_norm="unit"`, the default here). `"llm"` loads the
  LLM's trained final norm instead, `"none"` leaves it out.
- Every LLaMA parameter has `requires_grad=False`; adapters are initialised with timm's trunc-normal (std 0.02).

Here the block is a real decoder layer of an HF causal LM (Llama, Qwen2, ...) taken by index from a local HF folder or a
`LanguagePretraining` checkpoint, called with `attention_mask=None`, `is_causal=False` and an identity rotation
(cos = 1, sin = 0), which makes it exactly the released rewrite. Only that layer's tensors are read from disk (a
LLaMA-7B folder is not loaded whole to take one block).

Variants, for the paper's ablation: `llm_block` (frozen), `llm_block_unfrozen` (same block, trained), `mlp` (the control:
the two adapters with a GELU between them and no block, so its trainable parameters are exactly the frozen model's),
`mlp_block_size` (a trainable residual MLP with about the block's own parameter count, the capacity of the unfrozen
block), `none` (plain ViT with the same final norm and head).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from visprior.models.language import LanguageModelSpec, causal_lm_config, load_causal_lm, local_folder
from visprior.models.vision import VisionTower, VisionTowerSpec, build_vision_tower

VARIANTS = ("llm_block", "llm_block_unfrozen", "mlp", "mlp_block_size", "none")


@dataclass
class FrozenBlockSpec:
    """Which block follows the ViT encoder, and where the LLM block comes from (LM4VE)."""

    variant: Literal["llm_block", "llm_block_unfrozen", "mlp", "mlp_block_size", "none"] = "llm_block"
    """The ablation arm (see the module docstring): the one key that chooses it."""
    language_model: LanguageModelSpec | None = None
    """The LLM as a local HF causal-LM folder (`path`) or a random-init `config`; or give `checkpoint` instead."""
    checkpoint: str | None = None
    """A `LanguagePretraining` checkpoint (`.ckpt`); the LLM's architecture comes from its hyper-parameters."""
    layer: int = -1
    """Decoder layer index in the LLM (negative counts from the end); the paper takes LLaMA-7B's last (31)."""
    rope: bool = False
    """Apply the LLM's rotary embedding over token indices (the paper does not: the ViT encodes positions)."""
    final_norm: Literal["unit", "llm", "none"] = "unit"
    """After the block: RMS normalisation with unit weight (the release), the LLM's trained final norm, or nothing."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown LM4VE variant {self.variant!r}; choose one of {VARIANTS}")
        if self.final_norm not in ("unit", "llm", "none"):
            raise ValueError(f"final_norm must be 'unit', 'llm' or 'none', got {self.final_norm!r}")
        if isinstance(self.language_model, dict):
            self.language_model = LanguageModelSpec(**self.language_model)


@dataclass
class FrozenBlockClassifierSpec:
    """A ViT classifier with (or without) an LLM block after its encoder."""

    vision_tower: VisionTowerSpec
    """The ViT; read at its last layer (`feature_layer=-1`) for classification."""
    num_classes: int
    block: FrozenBlockSpec = field(default_factory=FrozenBlockSpec)
    pool: Literal["mean", "cls"] = "mean"
    """Classify from the mean of the patch tokens, or from the CLS token (ViT / CLIP towers, `select="cls_patch"`)."""


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (tied ones once)."""
    return sum(p.numel() for p in module.parameters())


def trunc_normal_linear(in_dim: int, out_dim: int, bias: bool = False) -> nn.Linear:
    """A linear layer initialised as timm's ViT does (trunc-normal std 0.02, zero bias), like LM4VE's adapters."""
    linear = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.trunc_normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class UnitRMSNorm(nn.Module):
    """RMS normalisation with a fixed weight of ones: LLaMA's RMSNorm as LM4VE runs it (never loaded, frozen)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LLMBlockAdapter(nn.Module):
    """`[N, P, D_vit]` -> linear -> LLM decoder layer (bidirectional, no positions) -> norm -> linear -> `[N, P, D_vit]`.

    With `frozen` the block (and a loaded final norm) never train, whatever `requires_grad_` is asked: the stage lists the
    component `frozen_block` and only the adapters follow.
    """

    def __init__(
        self,
        block: nn.Module,
        vit_dim: int,
        llm_dim: int,
        head_dim: int,
        rotary: nn.Module | None = None,
        norm: nn.Module | None = None,
        frozen: bool = True,
    ):
        super().__init__()
        self.adapter_in = trunc_normal_linear(vit_dim, llm_dim)
        self.block = block
        self.norm = norm if norm is not None else nn.Identity()
        self.adapter_out = trunc_normal_linear(llm_dim, vit_dim)
        self.rotary = rotary
        self.head_dim = head_dim
        self.frozen = frozen
        self.requires_grad_(True)

    def llm_modules(self) -> list[nn.Module]:
        """The parts that come from the LLM (frozen in the `llm_block` variant)."""
        return [self.block, self.norm]

    def requires_grad_(self, requires_grad: bool = True) -> LLMBlockAdapter:
        super().requires_grad_(requires_grad)
        if self.frozen:
            for module in self.llm_modules():
                module.requires_grad_(False)
        return self

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
            is_causal=False,  # sdpa reads the kwarg; the module attribute (set at load) covers the other backends
        )
        return self.adapter_out(self.norm(hidden))  # [N, P, D_vit]


class MLPControl(nn.Module):
    """LM4VE's control: the same two adapters with a GELU between them and no block (the frozen model's trainables)."""

    def __init__(self, vit_dim: int, llm_dim: int):
        super().__init__()
        self.adapter_in = trunc_normal_linear(vit_dim, llm_dim)
        self.act = nn.GELU()
        self.adapter_out = trunc_normal_linear(llm_dim, vit_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_out(self.act(self.adapter_in(x)))  # [N, P, D_vit]


class MLPAdapter(nn.Module):
    """The capacity control: the adapters around a trainable pre-norm residual MLP the size of the LLM block."""

    def __init__(self, vit_dim: int, llm_dim: int, hidden_dim: int):
        super().__init__()
        self.adapter_in = trunc_normal_linear(vit_dim, llm_dim)
        self.norm = nn.LayerNorm(llm_dim)
        self.mlp = nn.Sequential(nn.Linear(llm_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, llm_dim))
        self.adapter_out = trunc_normal_linear(llm_dim, vit_dim)

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
    """ViT encoder -> (LLM block | MLP | nothing) -> pool -> LayerNorm -> linear head: `[N, C, H, W]` -> `[N, classes]`.

    Pool then norm is timm's order (`fc_norm` after the mean; for the CLS token, a per-token norm commutes with taking
    it). `frozen_block=None` with `norm=False` is the plain classifier (tower, mean pool, head).
    """

    def __init__(
        self,
        vision_tower: VisionTower,
        frozen_block: nn.Module | None,
        num_classes: int,
        pool: str = "mean",
        norm: bool = True,
    ):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if pool == "cls" and vision_tower.select != "cls_patch":
            raise ValueError("pool='cls' needs a tower with a CLS token read with select='cls_patch'")
        self.vision_tower = vision_tower
        if frozen_block is not None:
            self.frozen_block = frozen_block
        if norm:
            eps = getattr(vision_tower.model.config, "layer_norm_eps", 1e-6)
            self.norm = nn.LayerNorm(vision_tower.hidden_size, eps=eps)
        self.head = nn.Linear(vision_tower.hidden_size, num_classes)
        self.pool = pool
        self.prefix_tokens = 1 if vision_tower.select == "cls_patch" else 0
        self.image_transform: Callable[[Image.Image], torch.Tensor] = vision_tower.image_transform

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token features after the block (before pooling): `[N, P(+1), D]`."""
        tokens = self.vision_tower(pixel_values)  # [N, P(+1), D]
        if hasattr(self, "frozen_block"):
            tokens = self.frozen_block(tokens)
        return tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.features(pixel_values)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, self.prefix_tokens :].mean(dim=1)  # [N, D]
        if hasattr(self, "norm"):
            pooled = self.norm(pooled)
        return self.head(pooled)  # [N, classes]


# ------------------------------------------------------------------------------------------------ taking the block


@dataclass
class LLMLayer:
    """One decoder layer taken out of an LLM, with what the adapter needs around it."""

    block: nn.Module
    config: PretrainedConfig
    rotary: nn.Module | None
    norm: nn.Module | None


def _resolve_layer(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for an LLM with {num_layers} decoder layers")
    return layer % num_layers


def _checkpoint_language_model(path: Path) -> tuple[LanguageModelSpec, dict[str, torch.Tensor]]:
    """The `LanguagePretraining` checkpoint's LM spec and its state dict (memory-mapped, weights only)."""
    if not path.is_file():
        raise FileNotFoundError(f"frozen_block.checkpoint: {path} is not a file (a LanguagePretraining .ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    spec = ckpt.get("hyper_parameters", {}).get("language_model")
    if not isinstance(spec, dict | LanguageModelSpec):
        raise ValueError(
            f"frozen_block.checkpoint: {path} holds no `language_model` (is it a LanguagePretraining run?)"
        )
    spec = spec if isinstance(spec, LanguageModelSpec) else LanguageModelSpec(**spec)
    return spec, ckpt["state_dict"]


def _hf_folder_tensors(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """Only the tensors under `prefix` from an HF folder's safetensors files (the index says which files hold them)."""
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({root / f for k, f in weight_map.items() if k.startswith(prefix)})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"frozen_block: no *.safetensors holding {prefix!r} in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update({k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})  # noqa: SIM118
    return out


def _skeleton(config: PretrainedConfig, attn_implementation: str) -> PreTrainedModel:
    """The LLM on the meta device: sizes and module names without memory; real tensors are loaded per layer."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _materialise(module: nn.Module, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> nn.Module:
    """A meta-device module with real tensors from `state`; every parameter and buffer must be there."""
    module = copy.deepcopy(module).to_empty(device="cpu")
    missing, unexpected = module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"frozen_block: {where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module.to(dtype)


def take_llm_layer(spec: FrozenBlockSpec) -> LLMLayer:
    """Decoder layer `spec.layer` (plus rotary embedding and final norm as asked) from the LLM the spec names."""
    if (spec.language_model is None) == (spec.checkpoint is None):
        raise ValueError(
            f"frozen_block variant {spec.variant!r} needs exactly one LLM source: `language_model` (an HF folder or a "
            f"config) or `checkpoint` (a LanguagePretraining .ckpt)"
        )
    if spec.language_model is not None and spec.language_model.config is not None:  # random init (tests, controls)
        lm = load_causal_lm(spec.language_model)
        return _layer_of(lm, spec, None)
    state: dict[str, torch.Tensor] | None = None
    if spec.checkpoint is not None:
        lm_spec, state = _checkpoint_language_model(Path(spec.checkpoint))
        where, key_prefix = spec.checkpoint, "model.language_model."
    else:
        lm_spec, where, key_prefix = spec.language_model, spec.language_model.path, ""
    if lm_spec.config is not None:
        config = causal_lm_config(lm_spec.config, vocab_size=lm_spec.config.get("vocab_size", 1))
    else:
        folder = local_folder(lm_spec.path, "language model")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    skeleton = _skeleton(config, lm_spec.attn_implementation)
    dtype = getattr(torch, lm_spec.dtype)

    def load(module: nn.Module) -> nn.Module:
        name = next(n for n, m in skeleton.named_modules() if m is module)
        prefix = f"{key_prefix}{name}."
        if state is not None:
            tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        else:
            tensors = _hf_folder_tensors(where, prefix)
        if not tensors:
            raise KeyError(f"frozen_block: no tensors under {prefix!r} in {where}")
        return _materialise(module, tensors, where, dtype)

    return _layer_of(skeleton, spec, load)


def _layer_of(lm: PreTrainedModel, spec: FrozenBlockSpec, load: Callable[[nn.Module], nn.Module] | None) -> LLMLayer:
    """The layer (loaded by `load`, or copied from a materialised `lm`), its rotary embedding and the final norm."""
    decoder = lm.get_decoder()
    index = _resolve_layer(spec.layer, len(decoder.layers))
    layer = decoder.layers[index]
    block = load(layer) if load is not None else copy.deepcopy(layer)  # the rest of the LLM is dropped
    if hasattr(block, "self_attn"):
        block.self_attn.is_causal = False
    config = decoder.config
    rotary = type(decoder.rotary_emb)(config=config) if spec.rope else None  # built on CPU: its buffers are computed
    norm: nn.Module | None = None
    if spec.final_norm == "unit":
        norm = UnitRMSNorm(getattr(config, "rms_norm_eps", 1e-6))
    elif spec.final_norm == "llm":
        norm = load(decoder.norm) if load is not None else copy.deepcopy(decoder.norm)
    return LLMLayer(block, config, rotary, norm)


def build_frozen_block(spec: FrozenBlockSpec, vit_dim: int) -> nn.Module:
    """The module that follows the ViT encoder for one LM4VE arm (`nn.Identity` for `none`)."""
    if spec.variant == "none":
        return nn.Identity()
    taken = take_llm_layer(spec)
    config = taken.config
    llm_dim = config.hidden_size
    if spec.variant == "mlp":
        return MLPControl(vit_dim, llm_dim)
    if spec.variant == "mlp_block_size":
        return MLPAdapter(vit_dim, llm_dim, MLPAdapter.hidden_for(llm_dim, parameter_count(taken.block)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    frozen = spec.variant == "llm_block"
    return LLMBlockAdapter(taken.block, vit_dim, llm_dim, head_dim, taken.rotary, taken.norm, frozen=frozen)


def build_frozen_block_classifier(spec: FrozenBlockClassifierSpec) -> FrozenBlockClassifier:
    """Build one arm of the LM4VE ablation."""
    tower = build_vision_tower(spec.vision_tower)
    block = build_frozen_block(spec.block, tower.hidden_size)
    return FrozenBlockClassifier(tower, block, spec.num_classes, spec.pool)
