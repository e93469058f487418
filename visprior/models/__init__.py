"""Models: causal LMs, vision towers, connectors and the VisionLanguageModel, all plain `nn.Module`s (no Lightning)."""

from visprior.models.connectors import CONNECTORS, ConnectorSpec, build_connector
from visprior.models.language import LanguageModelSpec, build_language_model, causal_lm_loss
from visprior.models.vision import VisionTower, VisionTowerSpec, build_vision_tower
from visprior.models.visual_words import VisualWordsSpec
from visprior.models.vlm import VisionLanguageModel, VLMOutput, VLMSpec, build_vlm

__all__ = [
    "CONNECTORS",
    "ConnectorSpec",
    "LanguageModelSpec",
    "VLMOutput",
    "VLMSpec",
    "VisionLanguageModel",
    "VisionTower",
    "VisionTowerSpec",
    "VisualWordsSpec",
    "build_connector",
    "build_language_model",
    "build_vision_tower",
    "build_vlm",
    "causal_lm_loss",
]
