"""Regional compilation: `torch.compile` of each transformer block, not of the whole model (torchtitan's choice).

Blocks of one kind share their code, so the compiler traces one block and reuses it for the others (parameters are graph
inputs, not constants), which keeps the first compile short; the embedding, connector, loss and the Python around the
blocks (masks, image scatter, logging) stay eager, so no graph break or recompile comes from them. The block's `forward`
is what gets compiled, so the module tree and state-dict keys do not change (checkpoints load either way) and FSDP2's
per-block hooks (all-gather, reshard) run outside the compiled region, as under torchtitan.

Compiled artifacts go to an on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, default `<visprior cache>/inductor`, see
`visprior.hardware.cache_dir`), so a relaunch (a resume, the next seed, the next arm) reuses inductor's kernels and
AOTAutograd graphs instead of compiling again; only dynamo's tracing is paid again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from visprior.hardware import cache_dir
from visprior.stages.parallelize import transformer_blocks


def compile_cache() -> Path:
    """Point inductor's caches at visprior's cache folder unless `TORCHINDUCTOR_CACHE_DIR` is set; returns the folder."""
    folder = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return Path(folder)


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` the forward of every transformer block of every component; returns how many were compiled."""
    compile_cache()
    count = 0
    for component in model.children():
        for block in transformer_blocks(component):
            if getattr(block, "_visprior_compiled", False):
                continue
            block.forward = torch.compile(block.forward)  # hooks stay outside; module tree and keys unchanged
            block._visprior_compiled = True
            count += 1
    return count
