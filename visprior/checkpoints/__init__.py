"""Released checkpoints in and out: llava-hf, original LLaVA, VILA, HF LM + tower folders, and visprior's own format.

`load_pretrained(path)` builds a `VisionLanguageModel` from any whole-VLM checkpoint (layout detected from its files);
`export_checkpoint(src, out, format)` writes llava-hf or visprior's own folder. Everything is local: nothing reaches a hub.
"""

from visprior.checkpoints.export import export_checkpoint, write_export
from visprior.checkpoints.llava_hf import NotExpressibleError, to_llava_hf
from visprior.checkpoints.load import component_weights, detect_format, load_pretrained, open_checkpoint
from visprior.checkpoints.weights import CheckpointFormatError

__all__ = [
    "CheckpointFormatError",
    "NotExpressibleError",
    "component_weights",
    "detect_format",
    "export_checkpoint",
    "load_pretrained",
    "open_checkpoint",
    "to_llava_hf",
    "write_export",
]
