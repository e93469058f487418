"""Top-1 / top-5 accuracy of an `ImageClassification` checkpoint on a held-out split, written as `results.json`.

The classifier stages (the toy shapes; LM4VE's ImageNet runs) log `val/top1` while training, but a recipe compares arms
on one held-out pass with an interval, in the same `results.json` schema `visprior eval` writes (task `classify`, Wilson
intervals). The split is read exactly as the stage's validation reads it (`ImageClassificationDataModule`: pair shards
with an integer `label`, `cls` shards or an ImageNet folder), in file order; `limit` keeps the first N images.

    python -m visprior.eval.classification --checkpoint RUN/checkpoints/last.ckpt --val data/toyworld/eval/shapes/test
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from visprior.eval.results import Accumulator, DatasetInfo, TaskResult, results_dict, write_results


@torch.no_grad()
def evaluate_classifier(
    checkpoint: str,
    val: str,
    out: str | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    label_key: str = "label",
    model_name: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of the checkpoint's classifier on `val`; writes `out/results.json` when `out` is given.

    Args:
        checkpoint: an ImageClassification stage's `.ckpt`.
        val: the held-out split (the stage's `data.init_args.val`).
        out: folder for results.json.
        limit: at most this many images (the first ones, in file order).
        batch_size: images per forward pass.
        label_key: the meta field holding the class index (pair shards).
        model_name: name recorded in results.json; default the checkpoint path.
        seed: recorded in results.json (the pass itself is deterministic).
    """
    from visprior.data.classification import ImageClassificationDataModule
    from visprior.stages.classification import ImageClassification

    start = time.perf_counter()
    stage = ImageClassification.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    data = ImageClassificationDataModule(train=val, val=val, label_key=label_key, batch_size=batch_size)
    data.connect(stage.image_transform, stage.num_classes)
    acc = Accumulator()
    seen = 0
    k = min(5, stage.num_classes)
    for batch in data.val_dataloader():
        pixels, labels = batch["pixel_values"], batch["labels"]  # [B, C, H, W], [B]
        if limit is not None:
            pixels, labels = pixels[: limit - seen], labels[: limit - seen]
        logits = stage.logits(pixels)  # [B, num_classes]
        top = logits.topk(k, dim=1).indices  # [B, k]
        for row, label in zip(top.tolist(), labels.tolist()):
            acc.update("top1", float(row[0] == label))
            acc.update("top5", float(label in row))
        seen += len(labels)
        if limit is not None and seen >= limit:
            break
    if not seen:
        raise ValueError(f"{val}: no labelled images to evaluate")
    result = TaskResult("classify", DatasetInfo.of("classify", val, seen), {n: acc.accuracy(n) for n in acc.names()},
                        time.perf_counter() - start, extra={"num_classes": stage.num_classes})  # fmt: skip
    doc = results_dict([result], model=model_name or str(checkpoint), checkpoint=str(checkpoint), seed=seed,
                       wall_time_s=time.perf_counter() - start)  # fmt: skip
    if out is not None:
        write_results(doc, Path(out))
    return doc


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(evaluate_classifier, as_positional=False)
