"""Training stages as LightningModules; each is runnable alone with `visprior fit --config recipes/_base/stages/X.yaml`."""

from visprior.stages.base import Stage, StepOutput
from visprior.stages.classification import ImageClassification
from visprior.stages.contrastive import ContrastivePretraining
from visprior.stages.init_from import InitFrom
from visprior.stages.language import LanguagePretraining
from visprior.stages.vision_language import InstructionTuning, VisionLanguagePretraining, VLMStage

__all__ = [
    "ContrastivePretraining",
    "ImageClassification",
    "InitFrom",
    "InstructionTuning",
    "LanguagePretraining",
    "Stage",
    "StepOutput",
    "VLMStage",
    "VisionLanguagePretraining",
]
