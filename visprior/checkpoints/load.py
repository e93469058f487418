"""One entry point for every checkpoint a user has: detect its layout, build the `VisionLanguageModel`, load its weights.

`open_checkpoint(path)` reads configs only (cheap, used to size a stage's model from `init_from: PATH`);
`load_pretrained(path)` also reads the weights. Detection looks at files, never at names: a Lightning `.ckpt` or run
folder, visprior's export (`visprior.json`), the VILA layout (`llm/` + `vision_tower/` + `mm_projector/`), llava-hf
(`config.json` with `model_type: llava`, `text_config`, `vision_config`), original LLaVA (`config.json` with `mm_*` keys).
A folder holding a single HF model (a causal LM or a vision tower) is a component, not a VLM: `component_weights` reads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from visprior.checkpoints.common import FULL_DUAL_ENCODERS, Layout, read_json, tower_keys
from visprior.checkpoints.llava_hf import LlavaHFLayout, is_llava_hf
from visprior.checkpoints.llava_original import OriginalLlavaLayout, VilaLayout, is_original_llava
from visprior.checkpoints.native import MANIFEST, LightningLayout, VispriorLayout
from visprior.checkpoints.weights import CheckpointFormatError, load_weights, read_weights
from visprior.models.vlm import VisionLanguageModel, build_vlm

log = logging.getLogger(__name__)

LAYOUTS: list[type[Layout]] = [LightningLayout, VispriorLayout, LlavaHFLayout, OriginalLlavaLayout, VilaLayout]
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model", "vit", *FULL_DUAL_ENCODERS)


def _lightning_run(path: Path) -> bool:
    return any((path / c).is_file() for c in ("checkpoints/last.ckpt", "run/checkpoints/last.ckpt", "last.ckpt"))


def component_kind(folder: Path) -> str | None:
    """`language_model` / `vision_tower` for a folder holding one HF model, else None."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    raw = read_json(config, "the model's config")
    if is_llava_hf(raw) or is_original_llava(raw):
        return None
    return "vision_tower" if raw.get("model_type") in VISION_MODEL_TYPES else "language_model"


def open_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> Layout:
    """The layout of the checkpoint at `path` (configs read, weights not yet); an error names what was looked for."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (visprior reads local files only)")
    if p.is_file():
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointFormatError(f"{p}: a bare weight file has no config; give the folder that holds it")
        return LightningLayout(p)
    if (p / MANIFEST).is_file():
        return VispriorLayout(p)
    if (p / "llm").is_dir() and (p / "vision_tower").is_dir():
        return VilaLayout(p)
    if _lightning_run(p):
        return LightningLayout(p)
    if (p / "config.json").is_file():
        raw = read_json(p / "config.json", "the model's config")
        if is_llava_hf(raw):
            return LlavaHFLayout(p)
        if is_original_llava(raw):
            return OriginalLlavaLayout(p, vision_tower)
        model_type = raw.get("model_type")
        if isinstance(model_type, str) and model_type.startswith("llava"):
            raise CheckpointFormatError(f"{p}: {model_type!r} checkpoints (e.g. LLaVA-NeXT tiling) are not supported; "
                                        "visprior imports llava-hf 'llava', original LLaVA and VILA folders")  # fmt: skip
        kind = component_kind(p)
        raise CheckpointFormatError(
            f"{p}: an HF {model_type!r} folder holds one component ({kind}), not a whole VLM: use it as "
            f"`{kind}: {{path: {p}}}` in a stage, or `init_from: [{{path: {p}, components: [{kind}]}}]`"
        )
    raise CheckpointFormatError(
        f"{p}: not a checkpoint visprior recognises; it reads: "
        + "; ".join(f"{cls.format} = {cls.description}" for cls in LAYOUTS)
    )


def detect_format(path: str | os.PathLike) -> str:
    """The layout name of a whole-VLM checkpoint (`lightning`, `visprior`, `llava-hf`, `llava`, `vila`)."""
    return open_checkpoint(path).format


def build_from(layout: Layout, state: dict[str, torch.Tensor] | None = None) -> VisionLanguageModel:
    """The model `layout` describes with its weights; parameters are allocated without random initialisation."""
    from transformers.initialization import no_init_weights

    spec = layout.spec()
    with no_init_weights():  # transformers ties embeddings while initialising: tie them again afterwards
        model = build_vlm(spec)
    model.language_model.tie_weights()
    load_weights(model, layout.state() if state is None else state, f"{layout.format} checkpoint {layout.path}")
    processor = layout.image_processor()
    if processor is not None and model.vision_tower is not None:
        from visprior.models.vision import build_image_transform

        tower = model.vision_tower
        tower.image_transform = model.image_transform = build_image_transform(
            tower.model_type, tower.image_size, processor
        )
    return model.eval()


def load_pretrained(
    path: str | os.PathLike, vision_tower: str | os.PathLike | None = None, trusted: bool = False
) -> VisionLanguageModel:
    """Any whole-VLM checkpoint as a `VisionLanguageModel` in eval mode; `model.checkpoint_format` names the layout.

    `vision_tower`: the local tower folder of an original LLaVA checkpoint whose `mm_vision_tower` is a hub id.
    `trusted`: unpickle a Lightning checkpoint without `weights_only` (only for files you trust).
    """
    layout = open_checkpoint(path, vision_tower)
    if trusted and isinstance(layout, LightningLayout):
        layout.trusted = True
    model = build_from(layout)
    model.checkpoint_format = layout.format
    for note in layout.notes:
        log.warning("%s: %s", layout.path, note)
    return model


def component_weights(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> tuple[dict, bool]:
    """Weights for `init_from`: `(state, whole)`. A whole-VLM checkpoint gives `model.<component>.*` keys (like a `.ckpt`);
    a single-component HF folder gives the component's own keys (`whole=False`)."""
    p = Path(path)
    kind = component_kind(p) if p.is_dir() else None
    if kind == "vision_tower":
        return {k[len("vision_tower.") :]: v for k, v in tower_keys(read_weights(p)).items()}, False
    if kind == "language_model":
        return read_weights(p), False
    layout = open_checkpoint(p, vision_tower)
    return {"model." + k: v for k, v in layout.state().items()}, True
