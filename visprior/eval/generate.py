"""Prompt encoding, batched generation and option scoring for a `VisionLanguageModel` (or a bare LM).

Every evaluation goes through here, so every model sees prompts built the same way: ChatML turns, each `<image>` mark expanded
to `num_image_tokens` image-token ids, all images of a batch passed row-major to `model.embed`. Generation uses transformers'
own `generate(inputs_embeds=..., attention_mask=...)` with left padding and the KV cache; in transformers 5 it returns only the
new tokens for decoder-only models. Scoring needs no generation: one forward pass per (prompt, option) pair, right-padded.
"""

from __future__ import annotations

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
    """
    images = images if images is not None else [[] for _ in prompts]
    device, pad = _device(model), _pad_id(model)
    pairs = []  # (prompt index, prompt ids, option ids)
    for i, (text, opts) in enumerate(zip(prompts, options)):
        _check_images(text, images[i])
        p = encode_prompt(model, text)
        if not p:
            raise ValueError("scoring needs a non-empty prompt (the first option token must have a context)")
        for opt in opts:
            o = model.tokenizer(opt, add_special_tokens=False).input_ids
            if not o:
                raise ValueError(f"option {opt!r} has no tokens")
            pairs.append((i, p, o))
    flat: list[OptionScore] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [p + o for _, p, o in chunk]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)  # [B, T]
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        pv = _pixel_values(model, [images[i] for i, _, _ in chunk], device)
        logits = model.language_model(inputs_embeds=model.embed(input_ids, pv), attention_mask=attention_mask).logits
        logp = (
            F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        )  # [B, T-1]
        for row, (_, p, o) in enumerate(chunk):
            lp = logp[row, len(p) - 1 : len(p) - 1 + len(o)]
            flat.append(OptionScore(float(lp.sum()), float(lp.mean()), len(o)))
    out: list[list[OptionScore]] = []
    it = iter(flat)
    for opts in options:
        out.append([next(it) for _ in opts])
    return out


def pick_option(scores: Sequence[OptionScore], by: str = "mean") -> int:
    """Index of the best option by mean (length-normalised) or sum log-likelihood; ties go to the first."""
    key = (lambda s: s.mean_logprob) if by == "mean" else (lambda s: s.sum_logprob)
    return max(range(len(scores)), key=lambda j: key(scores[j]))
