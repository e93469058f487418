"""The toy world: a procedural, seeded visual world (scenes, captions, VQA, interleaved documents, text corpora by
category, an MLE-Bench-style benchmark, shape classification) that tests and the demo use instead of downloaded data.

`generate(out_dir, preset="toy", seed=0)` writes everything in the layout of docs/contracts.md ("Toy world layout").
"""

from visprior.data.toyworld.generate import PRESETS, Preset, generate

__all__ = ["PRESETS", "Preset", "generate"]
