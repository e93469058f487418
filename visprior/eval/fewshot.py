"""Few-shot (in-context) VQA: k-shot interleaved image-text prompts, k in {0, 4, 8}, as VILA Table 1 and MM1 measure it.

Prompts are plain interleaved text (no chat turns), the format pre-trained interleaved models see:
`<image>\nQuestion: q\nAnswer: a\n\n` per shot, then the query ending in `Answer:`. Shots are drawn from the support set by a
`random.Random` seeded with (seed, query key), so every model gets the same prompts, a query's shots do not depend on which other
queries are evaluated, and the support never contains the query.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from torch import nn

from visprior.eval.results import Accumulator, DatasetInfo, TaskResult
from visprior.eval.vqa import VQAItem, score_items

SHOTS = (0, 4, 8)
FEWSHOT_STOP = ("\n", "<|im_end|>", "<|endoftext|>")
"""Where a few-shot answer ends: the line, or the chat end token an instruction-tuned model closes its answer with even
in this plain format (without it, `no<|im_end|>...` never matches `no`)."""


@dataclass
class FewShotPrompt:
    text: str
    images: list[Image.Image]
    support_keys: list[str]


def _block(item: VQAItem) -> tuple[str, list[Image.Image]]:
    question = item.question.replace("<image>", "").strip()
    head = "<image>\n" if item.image is not None else ""
    return f"{head}Question: {question}\nAnswer:", [item.image] if item.image is not None else []


def choose_support(query: VQAItem, support: Sequence[VQAItem], k: int, seed: int) -> list[VQAItem]:
    """k support items for this query, never the query itself (by key), deterministic in (seed, query key)."""
    pool = [s for s in support if s.key != query.key]
    if k > len(pool):
        raise ValueError(f"{k}-shot needs {k} support items besides the query, have {len(pool)}")
    return random.Random(f"{seed}:{query.key}").sample(pool, k)


def build_fewshot_prompt(query: VQAItem, support: Sequence[VQAItem], k: int, seed: int = 0) -> FewShotPrompt:
    """The interleaved k-shot prompt: shots in sampled order, each answered, then the unanswered query."""
    shots = choose_support(query, support, k, seed)
    texts, images = [], []
    for s in shots:
        text, imgs = _block(s)
        texts.append(f"{text} {s.answer}\n\n")
        images.extend(imgs)
    text, imgs = _block(query)
    return FewShotPrompt("".join(texts) + text, images + imgs, [s.key for s in shots])


def evaluate_fewshot(
    model: nn.Module,
    queries: Sequence[VQAItem],
    support: Sequence[VQAItem],
    *,
    dataset: DatasetInfo,
    shots: Sequence[int] = SHOTS,
    seed: int = 0,
    batch_size: int = 4,
    max_new_tokens: int = 8,
) -> TaskResult:
    """Accuracy at each k (open questions by exact match of the first generated line, choices by likelihood)."""
    start = time.perf_counter()
    acc = Accumulator()
    for k in shots:
        prompts = [build_fewshot_prompt(q, support, k, seed) for q in queries]
        correct = score_items(model, queries, [p.text for p in prompts], [p.images for p in prompts],
                              batch_size=batch_size, max_new_tokens=max_new_tokens,
                              stop=FEWSHOT_STOP, choice_prefix=" ")  # fmt: skip
        for ok in correct:
            acc.update(f"{k}-shot", float(ok))
    metrics = {name: acc.accuracy(name) for name in acc.names()}
    return TaskResult("fewshot", dataset, metrics, time.perf_counter() - start, {"seed": seed, "shots": list(shots)})
