"""Prompt encoding, batched generation and option scoring for a `VisionLanguageModel` (or a bare LM).

Every evaluation goes through here, so every model sees prompts built the same way: ChatML turns, each `<image>` mark expanded
to `num_image_tokens` image-token ids, all images of a batch passed row-major to `model.embed`. Generation uses transformers'
own `generate(inputs_embeds=..., attention_mask=...)` with left padding and the KV cache; in transformers 5 it returns only the
new tokens for decoder-only models. Scoring needs no generation: one forward pass per prompt, its options continuing from the prompt's KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

IMAGE_MARK = "<image>"
DEFAULT_STOP = ("<|im_end|>", "<|endoftext|>")


class LanguageOnly(nn.Module):
    """Wrap a bare causal LM + tokenizer in the VLM surface, so text evaluations run on an LM before multimodal training."""

    def __init__(self, language_model: PreTrainedModel, tokenizer):
        super().__init__()
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.image_token_id = None
        self.num_image_tokens = 0

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_values is not None:
            raise ValueError("a language-only model cannot take images")
        return self.language_model.get_input_embeddings()(input_ids)


def chat_prompt(user: str, system: str | None = None) -> str:
    """One ChatML user turn (with any `<image>` marks) followed by the opened assistant turn."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def encode_prompt(model: nn.Module, text: str) -> list[int]:
    """Token ids of `text`, each `<image>` replaced by `num_image_tokens` copies of the image token id."""
    tok = model.tokenizer
    pieces = text.split(IMAGE_MARK)
    if len(pieces) > 1 and model.image_token_id is None:
        raise ValueError("prompt has <image> marks but the model takes no images")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.extend([model.image_token_id] * model.num_image_tokens)
        if piece:
            ids.extend(tok(piece, add_special_tokens=False).input_ids)
    return ids


def _device(model: nn.Module) -> torch.device:
    return next(model.language_model.parameters()).device


def _pixel_values(
    model: nn.Module, images: Sequence[Sequence[Image.Image]], device: torch.device
) -> torch.Tensor | None:
    flat = [img for row in images for img in row]
    if not flat:
        return None
    return torch.stack([model.image_transform(img) for img in flat]).to(device)  # [N, C, H, W]


def _check_images(text: str, imgs: Sequence[Image.Image]) -> None:
    if text.count(IMAGE_MARK) != len(imgs):
        raise ValueError(f"prompt has {text.count(IMAGE_MARK)} <image> marks but {len(imgs)} images were given")


def _pad_id(model: nn.Module) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


class _StopOnStrings(StoppingCriteria):
    """Per-row stop once any stop string appears in the generated text (with `inputs_embeds`, `input_ids` holds only it)."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]] | None = None,
    *,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] = DEFAULT_STOP,
    batch_size: int = 8,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """Continuations of full prompt strings (already chat-formatted), cut at the first stop string.

    Rows are left-padded within a batch, so greedy outputs do not depend on `batch_size`. Sampling seeds the global torch
    generator once per call: repeatable for the same prompts and batch size.
    """
    images = images if images is not None else [[] for _ in prompts]
    device, pad = _device(model), _pad_id(model)
    lm, tok = model.language_model, model.tokenizer
    if do_sample:
        torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts, imgs = prompts[start : start + batch_size], images[start : start + batch_size]
        for t, i in zip(texts, imgs):
            _check_images(t, i)
        rows = [encode_prompt(model, t) for t in texts]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # [B, T]
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        embeds = model.embed(input_ids, _pixel_values(model, imgs, device))  # [B, T, D]
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        )
        new = lm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(tok, stop)]) if stop else None,
            top_k=None,
            **sampling,
        )  # [B, new] (inputs_embeds only: transformers returns only new tokens)
        for row in tok.batch_decode(new, skip_special_tokens=False):
            out.append(truncate_at_stop(row, stop).replace(tok.pad_token or "\0", "").strip())
    return out


@dataclass(frozen=True)
class OptionScore:
    """Log-likelihood of one option's tokens given its prompt."""

    sum_logprob: float
    mean_logprob: float
    num_tokens: int


@torch.no_grad()
def score_options(
    model: nn.Module,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    images: Sequence[Sequence[Image.Image]] | None = None,
    *,
    batch_size: int = 8,
) -> list[list[OptionScore]]:
    """For each prompt, the log-likelihood (sum and per-token mean) of each of its options as the continuation.

    Options are tokenized on their own and appended to the prompt's ids, so include any leading space in the option text.
    Each prompt (and its images) runs once, left-padded, and its options continue from its KV cache: a prompt with four
    options costs one prompt forward, not four. `batch_size` bounds the options per forward (at least one prompt's).
    """
    images = images if images is not None else [[] for _ in prompts]
    device, pad = _device(model), _pad_id(model)
    encoded = []  # (prompt ids, [option ids])
    for text, opts, imgs in zip(prompts, options, images):
        _check_images(text, imgs)
        p = encode_prompt(model, text)
        if not p:
            raise ValueError("scoring needs a non-empty prompt (the first option token must have a context)")
        ids = [model.tokenizer(opt, add_special_tokens=False).input_ids for opt in opts]
        for opt, o in zip(opts, ids):
            if not o:
                raise ValueError(f"option {opt!r} has no tokens")
        encoded.append((p, ids))
    out: list[list[OptionScore]] = []
    start = 0
    while start < len(encoded):
        stop, width = start + 1, len(encoded[start][1])
        while stop < len(encoded) and width + len(encoded[stop][1]) <= batch_size:
            width += len(encoded[stop][1])
            stop += 1
        out.extend(_score_chunk(model, encoded[start:stop], images[start:stop], device, pad))
        start = stop
    return out


def _score_chunk(
    model: nn.Module,
    chunk: Sequence[tuple[list[int], list[list[int]]]],
    images: Sequence[Sequence[Image.Image]],
    device: torch.device,
    pad: int,
) -> list[list[OptionScore]]:
    lm = model.language_model
    lengths = [len(p) for p, _ in chunk]
    w = max(lengths)
    ids = torch.tensor([[pad] * (w - len(p)) + p for p, _ in chunk], device=device)  # [P, W] left-padded
    mask = torch.tensor([[0] * (w - n) + [1] * n for n in lengths], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    first = lm(inputs_embeds=model.embed(ids, _pixel_values(model, images, device)), attention_mask=mask,
               position_ids=positions, use_cache=True)  # fmt: skip
    first_logp = F.log_softmax(first.logits[:, -1].float(), dim=-1)  # [P, V]: the first option token
    owner = [i for i, (_, opts) in enumerate(chunk) for _ in opts]
    opts = [o for _, os in chunk for o in os]
    rows = torch.tensor(owner, device=device)
    cache = first.cache if "cache" in first else first.past_key_values  # transformers 5.24 renamed it
    cache.batch_select_indices(rows)  # one copy of the prompt's cache per option
    wo = max(len(o) for o in opts)
    oids = torch.tensor([o + [pad] * (wo - len(o)) for o in opts], device=device)  # [R, L] right-padded
    omask = torch.tensor([[1] * len(o) + [0] * (wo - len(o)) for o in opts], device=device)
    opos = torch.tensor([lengths[i] for i in owner], device=device)[:, None] + torch.arange(wo, device=device)
    logp = first_logp[rows].gather(-1, oids[:, :1])  # [R, 1]
    if wo > 1:
        rest = lm(inputs_embeds=model.embed(oids[:, :-1]), attention_mask=torch.cat([mask[rows], omask[:, :-1]], 1),
                  position_ids=opos[:, :-1], **{cache_keyword(lm): cache}).logits  # fmt: skip
        logp = torch.cat([logp, F.log_softmax(rest.float(), dim=-1).gather(-1, oids[:, 1:, None]).squeeze(-1)], 1)
    flat = [OptionScore(float(lp[: len(o)].sum()), float(lp[: len(o)].mean()), len(o)) for lp, o in zip(logp, opts)]
    it = iter(flat)
    return [[next(it) for _ in os] for _, os in chunk]


def cache_keyword(lm: nn.Module) -> str:
    """The forward's name for a KV cache: `cache` from transformers 5.24 on (where `past_key_values` still works but
    warns on every evaluation), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


def pick_option(scores: Sequence[OptionScore], by: str = "mean") -> int:
    """Index of the best option by mean (length-normalised) or sum log-likelihood; ties go to the first."""
    key = (lambda s: s.mean_logprob) if by == "mean" else (lambda s: s.sum_logprob)
    return max(range(len(scores)), key=lambda j: key(scores[j]))
