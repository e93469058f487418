"""Causal language models and their tokenizers, built from a config (toy, random init) or a local HF folder (real weights).

Everything goes through transformers' Auto classes so any causal LM with a local folder works; nothing here reaches the
model hub (`local_files_only=True`, and a path that does not exist is refused before transformers can mistake it for a hub
id). The loss lives here too because every stage computes it the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AddedToken,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from visprior.data.formats import IMAGE_MARK
from visprior.data.tokenizer import image_token_id as _image_token_id

IGNORE_INDEX = -100


@dataclass
class LanguageModelSpec:
    """Which causal LM to build: exactly one of `path` (local HF folder) or `config` (random init)."""

    path: str | None = None
    """Local HF model folder with real weights. Never a hub id: this code runs offline."""
    config: dict[str, Any] | None = None
    """transformers config kwargs including `model_type` (e.g. `presets.TOY_LLAMA`); the vocab size comes from the tokenizer."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `path`."""
    trust_remote_code: bool = False
    """Run modelling code shipped inside the folder. Only passed to transformers when True."""
    add_image_token: bool = False
    """Add `<image>` as a special token and resize the embeddings (real checkpoints whose tokenizer lacks it)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa | eager | flash_attention_2 | flex_attention."""
    dtype: str = "float32"
    """Parameter dtype when loading a folder (transformers 5 would otherwise keep the checkpoint's, often bf16)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further kwargs for `from_pretrained` (e.g. `gguf_file`)."""


def _remote_code_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    """`trust_remote_code` is passed only when asked for, so a folder never runs its own code by default."""
    return {"trust_remote_code": True} if trust_remote_code else {}


def local_folder(path: str | os.PathLike, what: str) -> str:
    """Return `path` if it is an existing folder; refuse anything else so transformers never treats it as a hub id."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} folder {str(path)!r} does not exist (or is not a folder). visprior loads models only from local folders, "
            f"never from the model hub: download or convert the checkpoint first, or give a `config` for a random-init model."
        )
    return str(p)


def model_folder(path: str | os.PathLike, key: str, trust_remote_code: bool) -> str:
    """`path` as a local HF model folder to load from: it exists (never a hub id), and a folder that needs its own code
    is refused, naming `key`, unless `trust_remote_code` is set (a folder without config.json, e.g. a GGUF file's, is
    left to transformers)."""
    from visprior.training.validation import check_remote_code_allowed  # visprior.training brings Lightning in

    folder = local_folder(path, "language model")
    if (Path(folder) / "config.json").is_file():
        check_remote_code_allowed(folder, key, trust_remote_code)
    return folder


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (offline)."""
    folder = local_folder(path, "tokenizer")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **_remote_code_kwargs(trust_remote_code))


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The single id of `<image>`; the error names the tokenizer folder and the `add_image_token` fix."""
    try:
        return _image_token_id(tokenizer)
    except ValueError as err:
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer at {where!r} has no single {IMAGE_MARK!r} token. For a real checkpoint set "
            f"`add_image_token: true` in the LanguageModelSpec (adds it as a special token and resizes the embeddings); "
            f"for a toy model use a tokenizer from `visprior data tokenizer`. ({err})"
        ) from err


def add_image_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Add `<image>` as a special token when missing; every embedding row it (or a grown vocabulary) brings gets the mean
    of the original tokens' rows. Returns the ids of the rows set.

    The original tokens' rows are left as they are, so a sequence of original tokens gets exactly the logits it had over
    the original vocabulary (the new column is extra). Input and output embeddings are both set (one matrix when tied,
    as in SmolLM2 and Qwen2-0.5B); the tokenizer's chat template and other tokens are untouched. A checkpoint whose
    embedding already has spare rows (Qwen pads its vocabulary to a multiple of 64 or more) takes one of those for
    `<image>`: that row was never trained, so it gets the mean too. A tokenizer that already has `<image>` with an
    embedding large enough (a VLM checkpoint reloaded) changes nothing.
    """
    known = len(tokenizer)
    if IMAGE_MARK not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_MARK, special=True, normalized=False)], special_tokens=True)
    rows = model.get_input_embeddings().num_embeddings
    new_rows = set(range(known, len(tokenizer)))
    if rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        new_rows |= set(range(rows, len(tokenizer)))
    if not new_rows:
        return []
    originals = min(known, rows)
    ids = torch.tensor(sorted(new_rows))
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
            if getattr(output, "bias", None) is not None:
                matrices.append(output.bias)
        for weight in matrices:
            weight[ids] = weight[:originals].float().mean(0).to(weight.dtype)
    return ids.tolist()


def causal_lm_config(config: dict[str, Any], **overrides: Any) -> PretrainedConfig:
    """A transformers config from a dict with `model_type` (presets, YAML), with overrides such as `vocab_size`."""
    kwargs = {**config, **overrides}
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"language model config needs a 'model_type' (e.g. 'llama'); got keys {sorted(config)}")
    return AutoConfig.for_model(model_type, **kwargs)


def causal_lm_from_config(
    config: dict[str, Any], attn_implementation: str = "sdpa", **overrides: Any
) -> PreTrainedModel:
    """Random-init causal LM; under `torch.device("meta")` it only sizes the model (used by `visprior plan`)."""
    hf_config = causal_lm_config(config, **overrides)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)


def load_causal_lm(spec: LanguageModelSpec, key: str = "model.language_model") -> PreTrainedModel:
    """The LM alone, for uses that need no tokenizer (LM4VE's frozen block); a `config` needs `vocab_size` then.
    `key` is where the spec sits in the run's config, for error messages."""
    if (spec.path is None) == (spec.config is None):
        raise ValueError("LanguageModelSpec needs exactly one of `path` (local HF folder) or `config` (random init)")
    if spec.config is not None:
        return causal_lm_from_config(spec.config, spec.attn_implementation)
    folder = model_folder(spec.path, key, spec.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        local_files_only=True,
        attn_implementation=spec.attn_implementation,
        dtype=getattr(torch, spec.dtype),
        **_remote_code_kwargs(spec.trust_remote_code),
        **spec.extra,
    )


def build_language_model(
    spec: LanguageModelSpec, key: str = "model.language_model"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the LM and its tokenizer; checks the tokenizer encodes `<image>` as one token. `key` is where the spec sits
    in the run's config (`model.text_encoder` for the contrastive stage), for error messages."""
    if (spec.path is None) == (spec.config is None):
        raise ValueError("LanguageModelSpec needs exactly one of `path` (local HF folder) or `config` (random init)")
    if spec.path is not None:  # before the tokenizer, which may come from the same folder
        model_folder(spec.path, key, spec.trust_remote_code)
    tokenizer_path = spec.tokenizer or spec.path
    if tokenizer_path is None:
        raise ValueError(
            "LanguageModelSpec with a `config` needs `tokenizer`: the folder whose vocabulary sizes the model"
        )
    tokenizer = load_tokenizer(tokenizer_path, spec.trust_remote_code)
    if spec.config is not None:
        # a config that names its vocabulary keeps it (released models pad it, e.g. llava-1.5: 32064 rows, 32002 tokens)
        vocab_size = spec.config.get("vocab_size") or len(tokenizer)
        if vocab_size < len(tokenizer) and not spec.add_image_token:
            raise ValueError(f"language model config has vocab_size {vocab_size} but the tokenizer at {tokenizer_path!r} "
                             f"has {len(tokenizer)} tokens")  # fmt: skip
        special = {
            k: getattr(tokenizer, k)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(tokenizer, k) is not None and k not in spec.config
        }
        overrides = {"vocab_size": vocab_size, **special}
        model = causal_lm_from_config(spec.config, spec.attn_implementation, **overrides)
    else:
        model = load_causal_lm(spec, key)
    if spec.add_image_token:
        add_image_token(model, tokenizer)
    image_token_id(tokenizer)
    return model, tokenizer


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy averaged over supervised tokens; 0 (still in the graph) when none is supervised.

    Returns `(loss, num_supervised)` so callers can weight losses across micro-batches and ranks by token count.
    """
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(shift_logits.device)  # [B, T-1]
    num = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / num.clamp(min=1), num


def turn_averaged_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer turns of each turn's mean next-token loss; a turn is a maximal run of supervised targets.

    With a token average a 60-token description outweighs twenty one-word answers; here every assistant turn weighs the
    same (mask targets that cross a packed-document boundary before calling, so runs never span two samples).
    """
    targets = labels[:, 1:].to(logits.device)  # [B, T-1]
    supervised = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits[:, :-1, :].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)  # fmt: skip
    starts = supervised & ~F.pad(supervised[:, :-1], (1, 0), value=False)  # [B, T-1] first target of each turn
    # turn index of each target; at most B*(T-1) turns, so the buffers have a static size and nothing waits for the
    # device to say how many turns there are (no host sync)
    turn = (starts.flatten().cumsum(0) - 1).clamp(min=0)  # [B*(T-1)]
    weight = supervised.flatten().to(token_loss.dtype)
    sums = torch.zeros_like(weight).index_add(0, turn, token_loss.flatten() * weight)
    counts = torch.zeros_like(weight).index_add(0, turn, weight)
    num_turns = starts.sum()
    per_turn = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    return per_turn.sum() / num_turns.clamp(min=1)  # in the graph (through token_loss) even with no turn
