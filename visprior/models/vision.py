"""Vision towers (SigLIP, CLIP, ViT) from a config or a local HF folder, returning the patch features of one layer.

LLaVA-style VLMs read the penultimate layer's patch tokens, not the tower's pooled output. The tower therefore runs the
embeddings and only the encoder layers up to `feature_layer` itself; the layers after it, the post-layernorm and any pooling
head never reach the output, so they are kept frozen (also through `requires_grad_`): DDP requires every trainable
parameter to receive a gradient. The wrapped HF model stays whole, so it can be saved and exported as it is.

Stochastic depth (`drop_path`, DeiT's regulariser) is added without touching the HF layers: a forward hook on each residual
branch (the attention and MLP outputs before their residual add) zeroes the branch for a random subset of samples in
training and rescales the rest by 1 / keep, at a rate rising linearly from 0 at the first layer to `drop_path` at the
last (timm's `dpr` rule).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipImageProcessorPil,
    SiglipVisionModel,
    ViTImageProcessorPil,
    ViTModel,
)

from visprior.models.language import local_folder

# model_type -> (HF model class, slow PIL image processor, whether the sequence starts with a CLS token)
_TOWERS: dict[str, tuple[type[PreTrainedModel], type, bool]] = {
    "siglip_vision_model": (SiglipVisionModel, SiglipImageProcessorPil, False),
    "clip_vision_model": (CLIPVisionModel, CLIPImageProcessorPil, True),
    "vit": (ViTModel, ViTImageProcessorPil, True),
}
# full dual-encoder folders (e.g. openai/clip-vit-large-patch14-336) load their vision half
_ALIASES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}


@dataclass
class VisionTowerSpec:
    """Which vision tower to build: exactly one of `path` (local HF folder) or `config` (random init)."""

    path: str | None = None
    """Local HF folder (a vision model, or a full CLIP/SigLIP model whose vision half is used)."""
    config: dict[str, Any] | None = None
    """transformers config kwargs; `model_type` is siglip_vision_model | clip_vision_model | vit (e.g. `presets.TOY_SIGLIP`)."""
    feature_layer: int = -2
    """Index into the hidden states (0 = embeddings, -1 = last layer); LLaVA reads the penultimate (-2)."""
    select: Literal["patch", "cls_patch"] = "patch"
    """`patch`: patch tokens only; `cls_patch`: keep the CLS token in front (CLIP / ViT only)."""
    image_size: int | None = None
    """Input resolution if not the config's; position embeddings are then interpolated."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last layer (DeiT ViT-S: 0.1), rising linearly from 0; applied in training only."""


class ImageTransform:
    """PIL image -> normalised `[C, H, W]` tensor with the tower's own preprocessing; picklable for loader workers."""

    def __init__(self, processor: Any, image_size: int) -> None:
        self.processor = processor
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]  # [1, C, H, W]
        return pixels[0]


def _tower_model_type(model_type: str) -> str:
    model_type = _ALIASES.get(model_type, model_type)
    if model_type not in _TOWERS:
        raise ValueError(f"unsupported vision tower model_type {model_type!r}; expected one of {sorted(_TOWERS)}")
    return model_type


def _processor_size(processor_cls: type, image_size: int) -> dict[str, Any]:
    if processor_cls is CLIPImageProcessorPil:  # CLIP resizes the short side, then centre-crops
        return {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return {"size": {"height": image_size, "width": image_size}}


def build_image_transform(model_type: str, image_size: int, folder: str | None = None) -> ImageTransform:
    """The HF image processor matching the tower (from `folder` if it has one), set to `image_size`."""
    processor_cls = _TOWERS[_tower_model_type(model_type)][1]
    size = _processor_size(processor_cls, image_size)
    if folder is not None and (Path(folder) / "preprocessor_config.json").exists():
        processor = processor_cls.from_pretrained(folder, local_files_only=True, **size)
    else:
        processor = processor_cls(**size)
    return ImageTransform(processor, image_size)


class DropPathHook:
    """Forward hook dropping a residual branch per sample with probability `rate` (training only), scaling by 1/keep.

    A class rather than a closure, so towers stay picklable (spawned DDP workers) and deep-copyable (EMA).
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training or self.rate <= 0.0:
            return output
        branch = output[0] if isinstance(output, tuple) else output  # [N, P, D]
        keep = 1.0 - self.rate
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep) / keep
        return (branch * mask, *output[1:]) if isinstance(output, tuple) else branch * mask


def residual_branches(layer: nn.Module, model_type: str) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream in one encoder layer."""
    if model_type == "vit":  # ViTLayer applies its `dropout` to both branches right before each residual add
        return [layer.dropout]
    return [layer.self_attn, layer.mlp]  # SigLIP / CLIP encoder layers


class VisionTower(nn.Module):
    """An HF vision model read at `feature_layer`: `[N, C, H, W]` pixels -> `[N, P, D]` features."""

    def __init__(
        self,
        model: PreTrainedModel,
        feature_layer: int = -2,
        select: str = "patch",
        image_size: int | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        model_type = _tower_model_type(model.config.model_type)
        self.model = model
        self.model_type = model_type
        self.has_cls = _TOWERS[model_type][2]
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"select must be 'patch' or 'cls_patch', got {select!r}")
        if select == "cls_patch" and not self.has_cls:
            raise ValueError(f"select='cls_patch' needs a CLS token; {model_type} has none (use 'patch')")
        self.select = select
        num_layers = model.config.num_hidden_layers
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"feature_layer {feature_layer} out of range for a tower with {num_layers} layers")
        self.feature_layer = feature_layer
        self.num_layers_used = feature_layer % (num_layers + 1)  # hidden_states[k] is the output of layer k
        self.image_size = image_size or model.config.image_size
        self.patch_size = model.config.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.hidden_size = model.config.hidden_size
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_tokens = self.num_patches + (1 if select == "cls_patch" else 0)
        self.image_transform: Callable[[Image.Image], torch.Tensor] = build_image_transform(
            model_type, self.image_size, getattr(model, "name_or_path", None) or None
        )
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path
        if drop_path > 0:
            layers = self._layers()
            for i, layer in enumerate(layers):
                rate = drop_path * i / max(len(layers) - 1, 1)
                for branch in residual_branches(layer, model_type):
                    branch.register_forward_hook(DropPathHook(rate))
        self.requires_grad_(any(p.requires_grad for p in self.parameters()))

    def _layers(self) -> nn.ModuleList:
        return self.model.layers if self.model_type == "vit" else self.model.encoder.layers

    def _unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never reach the output: later layers, final norms, pooling heads."""
        used = {id(p) for p in self.model.embeddings.parameters()}
        if self.model_type == "clip_vision_model":
            used |= {id(p) for p in self.model.pre_layrnorm.parameters()}
        for layer in self._layers()[: self.num_layers_used]:
            used |= {id(p) for p in layer.parameters()}
        return [p for p in self.model.parameters() if id(p) not in used]

    def requires_grad_(self, requires_grad: bool = True) -> VisionTower:
        """Like `nn.Module.requires_grad_`, but parameters that cannot get a gradient stay frozen (DDP needs that)."""
        super().requires_grad_(requires_grad)
        for p in self._unused_parameters():
            p.requires_grad_(False)
        return self

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Refuse images the tower cannot take, naming expected and actual shapes."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"vision tower expects pixel_values [N, C, {self.image_size}, {self.image_size}], got {list(pixel_values.shape)}; "
                f"preprocess images with the model's image_transform"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of `feature_layer`, CLS dropped unless `select='cls_patch'`."""
        self.check_pixels(pixel_values)
        pixel_values = pixel_values.to(next(self.model.embeddings.parameters()).dtype)
        interpolate = self.image_size != self.model.config.image_size
        hidden = self.model.embeddings(pixel_values, interpolate_pos_encoding=interpolate)  # [N, P(+1), D]
        if self.model_type == "clip_vision_model":
            hidden = self.model.pre_layrnorm(hidden)
        for layer in self._layers()[: self.num_layers_used]:
            hidden = layer(hidden, None)
        if self.has_cls and self.select == "patch":
            hidden = hidden[:, 1:]
        return hidden  # [N, P, D]


def vision_config(config: dict[str, Any], image_size: int | None = None) -> PretrainedConfig:
    """A transformers vision config from a dict with `model_type`."""
    kwargs = dict(config)
    model_type = _tower_model_type(kwargs.pop("model_type", "") or "")
    if image_size is not None:
        kwargs["image_size"] = image_size
    return AutoConfig.for_model(model_type, **kwargs)


def vision_model_from_config(config: dict[str, Any], image_size: int | None = None) -> PreTrainedModel:
    """Random-init HF vision model (ViT without its pooler); under the meta device it only sizes the model."""
    hf_config = vision_config(config, image_size)
    model_cls = _TOWERS[hf_config.model_type][0]
    if model_cls is ViTModel:
        return ViTModel(hf_config, add_pooling_layer=False)
    return model_cls(hf_config)


def _folder_model_type(folder: str) -> str:
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"vision tower folder {folder!r} has no config.json")
    return _tower_model_type(json.loads(config_file.read_text()).get("model_type", ""))


def build_vision_tower(spec: VisionTowerSpec) -> VisionTower:
    """Build the tower from a config (random init) or a local folder (real weights, never the hub)."""
    if (spec.path is None) == (spec.config is None):
        raise ValueError("VisionTowerSpec needs exactly one of `path` (local HF folder) or `config` (random init)")
    if spec.config is not None:
        # sized at the config's resolution, like a released tower: `image_size` only changes the input (interpolated
        # position embeddings), so a tower trained at 64 px initialises one that reads 32 px images
        model = vision_model_from_config(spec.config)
    else:
        folder = local_folder(spec.path, "vision tower")
        model_cls = _TOWERS[_folder_model_type(folder)][0]
        extra = {"add_pooling_layer": False} if model_cls is ViTModel else {}
        model = model_cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **extra)
    return VisionTower(model, spec.feature_layer, spec.select, spec.image_size, spec.drop_path)
