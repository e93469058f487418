"""Evaluation harness: MLE-Bench, VQA (open + multiple choice), few-shot VQA, captioning (CIDEr-D), text-only, linear probes.

One module per job: `generate` (prompts, batched generation, option scoring), one module per task, `results` (the
`results.json` schema, intervals, torchmetrics accumulation) and `runner` (`evaluate(...)` and `EvaluationCallback`).
Import from the modules; this package file stays light so `import visprior.eval.x` does not pull in Lightning.
"""
