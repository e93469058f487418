"""Text pre-training of a causal LM on a weighted, seeded mixture of text categories.

The mixture (LSBS: web / encyclopedia / literature / visual / math / code / academia weights) lives entirely in the data
module's `sources` weights; this stage only trains the LM on packed rows, with attention kept inside each document. The
model is the text-only `VisionLanguageModel` (no tower), so its `language_model` component initialises later stages by name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from visprior.models.language import LanguageModelSpec
from visprior.models.vlm import VLMSpec
from visprior.stages.base import coerce
from visprior.stages.vision_language import VLMStage


class LanguagePretraining(VLMStage):
    """Causal language modelling on text: the toy LLM that later stages start from."""

    default_trainable: ClassVar[dict[str, float]] = {"language_model": 3e-3}

    def __init__(
        self,
        language_model: LanguageModelSpec,
        trainable: dict[str, float] | None = None,
        weight_decay: float = 0.1,
        **stage_args: Any,
    ):
        """
        Args:
            language_model: the LM and tokenizer to build (a toy config or a local HF folder).
            trainable: component -> learning rate; the only component is `language_model` (default: the class's
                `default_trainable`).
            weight_decay: AdamW decay for matrices.
            stage_args: the shared options of `Stage` (init_from, warmup_steps, peak_flops, ...).
        """
        language_model = coerce(LanguageModelSpec, language_model)
        super().__init__(
            VLMSpec(language_model=language_model), trainable=trainable, weight_decay=weight_decay, **stage_args
        )
