"""`visprior export SRC --format hf-llava|visprior --out DIR`: any checkpoint visprior reads, written for hand-off.

`hf-llava` loads with `LlavaForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` and no
visprior code; models it cannot express (patch-merging or pooling connectors, towers at an interpolated resolution) are
refused with the reason, and `visprior` (our own safetensors + config folders, read back by `load_pretrained`) takes them.
The folder is written under a temporary name and renamed when complete, so `DIR` is never half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Literal

from visprior.checkpoints.llava_hf import save_llava_hf
from visprior.checkpoints.load import load_pretrained
from visprior.checkpoints.native import save_visprior
from visprior.models.vlm import VisionLanguageModel

WRITERS = {"hf-llava": save_llava_hf, "visprior": save_visprior}


def write_export(
    model: VisionLanguageModel, out: str | os.PathLike, format: str = "hf-llava", overwrite: bool = False
) -> Path:
    """Write `model` to `out` in `format`, atomically (a temporary folder renamed onto `out`)."""
    if format not in WRITERS:
        raise ValueError(f"--format {format!r} is not one of {sorted(WRITERS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite true")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        WRITERS[format](model, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return out


def export_checkpoint(
    src: str,
    out: str = "",
    format: Literal["hf-llava", "visprior"] = "hf-llava",
    vision_tower: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint to a hand-off folder.

    Args:
        src: a run folder, a `.ckpt`, or any folder visprior imports (llava-hf, original LLaVA, VILA, visprior export).
        out: the folder to write (must not exist or be empty, unless --overwrite).
        format: `hf-llava` (LlavaForConditionalGeneration + LlavaProcessor) or `visprior` (any connector).
        vision_tower: local tower folder for an original LLaVA checkpoint whose mm_vision_tower is a hub id.
        overwrite: replace a non-empty `out`.
    """
    if not out:
        raise ValueError("--out DIR is required: the folder to write the export into")
    if format not in WRITERS:
        raise ValueError(f"--format {format!r} is not one of {sorted(WRITERS)}")
    model = load_pretrained(src, vision_tower=vision_tower)
    path = write_export(model, out, format, overwrite)
    print(f"exported {getattr(model, 'checkpoint_format', '?')} checkpoint {src} as {format}: {path}")
    return path
