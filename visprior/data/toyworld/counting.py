"""A harder toy classification task than naming the one shape: how many objects a toy-world scene holds (1..max).

The toy world's pair scenes carry their objects in `meta["objects"]`; this writes them out as WebDataset classification
shards (the image member as it is, a `cls` member holding `count - 1`), the layout `ImageClassificationDataModule` reads
as `wds_cls`. Counting needs every object found and none counted twice, across the whole image: a global-attention
question that one shape per image does not ask. The first `train` scenes become the training split, the next `test`
the held-out one; nothing is re-rendered, so the split is as deterministic as the toy world itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from visprior.data.shards import SkipCounter, iter_shard_members, resolve_shards

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


def write_counting_task(pairs: str | Path, out: str | Path, train: int = 5000, test: int = 1000) -> dict[str, int]:
    """Split the scenes of `pairs` into `out/train/*.tar` and `out/test/*.tar` labelled by object count - 1.

    Returns the number of samples per split and the number of classes (the largest count seen).
    """
    import webdataset as wds

    out = Path(out)
    counter, written, largest = SkipCounter(), {"train": 0, "test": 0}, 0
    splits = [("train", train), ("test", test)]
    writer, split_index = None, 0
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    try:
        for shard in resolve_shards(str(pairs)):
            for key, members in iter_shard_members(shard, counter):
                while split_index < len(splits) and written[splits[split_index][0]] >= splits[split_index][1]:
                    split_index += 1
                    if writer is not None:
                        writer.close()
                        writer = None
                if split_index == len(splits):
                    break
                split = splits[split_index][0]
                if writer is None:
                    writer = wds.ShardWriter(str(out / split / f"{split}-%06d.tar"), maxcount=1000, verbose=0)
                image = next((m for m in IMAGE_MEMBERS if m in members), None)
                if image is None or "json" not in members:
                    raise ValueError(f"{shard}: sample {key!r} has no image or json member; is {pairs} a pair dataset?")
                count = len(json.loads(members["json"])["objects"])
                largest = max(largest, count)
                writer.write({"__key__": key, image: members[image], "cls": str(count - 1)})
                written[split] += 1
    finally:
        if writer is not None:
            writer.close()
    if written["test"] < test:
        raise ValueError(f"{pairs}: only {written['train'] + written['test']} scenes, asked for {train} + {test}")
    summary = {**written, "num_classes": largest}
    (out / "task.json").write_text(json.dumps({"task": "count objects", "source": str(pairs), **summary}, indent=2))
    return summary
