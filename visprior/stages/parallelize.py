"""FSDP2 wrapping and activation checkpointing, kept out of the models (torchtitan's `parallelize.py` idea).

The models stay plain `nn.Module`s. When the trainer runs Lightning's `ModelParallelStrategy`, the stage's `configure_model`
calls `parallelize` with the strategy's device mesh: every transformer block of every component (the LM's decoder layers,
the vision tower's encoder layers) becomes its own FSDP unit, then the root takes the rest (embeddings, connector, norms),
so parameters are gathered one block at a time. Mixed precision is FSDP2's `MixedPrecisionPolicy` (bf16 compute, fp32 reduction by default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

BLOCK_LIST_NAMES = ("layers", "layer", "blocks", "h")
"""Names of the `nn.ModuleList`s that hold transformer blocks in transformers' models (Llama/Qwen `layers`, SigLIP/CLIP
`encoder.layers`, ViT `encoder.layer`, GPT-2 `h`) and in hand-written ones (`blocks`)."""


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside `module`, outermost lists only, in order."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for name, child in module.named_modules():
        if id(child) in seen:
            continue
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(child) > 0:
            blocks.extend(child)
            seen.update(id(m) for m in child.modules())
    return blocks


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute activations in backward: transformers' own switch on each HF component; returns how many were switched."""
    count = 0
    for module in model.modules():
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name is deprecated)
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            continue
        count += 1
    return count


def parallelize(
    model: nn.Module,
    device_mesh=None,
    activation_checkpointing: bool = False,
    param_dtype: str = "bfloat16",
    reduce_dtype: str = "float32",
) -> nn.Module:
    """Apply activation checkpointing, then (with a device mesh) `fully_shard` per transformer block and at the root."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if device_mesh is None:
        return model
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype))
    for component in model.children():
        if not any(True for _ in component.parameters()):
            continue
        for block in transformer_blocks(component):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure data-parallel FSDP2: data_parallel = world size, tensor_parallel = 1.

    The parent's "auto" sizes mean data_parallel = nodes and tensor_parallel = devices per node, which is tensor
    parallelism on one node; our stages only shard (FSDP2), so every process is a data-parallel replica.

    Sharded checkpoints (`torch.distributed.checkpoint`, one folder, loadable by any process count: DCP reshards on load)
    are written atomically: every rank writes into a fresh `<name>.tmp-<token>` folder, rank 0 renames the complete folder
    `<name>.d-<token>`, points `<name>` at it with one `rename` of a symlink and deletes the folder it replaced. A kill at any moment leaves `<name>` at the previous
    complete checkpoint (Lightning's own writes into `<name>` in place). Stale temporary folders of a killed save are
    removed at the next save. Activation checkpointing is the stage's `activation_checkpointing`, the same under every
    strategy.
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            param_dtype: FSDP2 compute dtype of parameters (`MixedPrecisionPolicy.param_dtype`); fp32 copies are kept.
            reduce_dtype: dtype of the gradient reduce-scatter.
            save_distributed_checkpoint: a sharded checkpoint folder (fast at scale) instead of one consolidated file.
            process_group_backend: `nccl` on GPUs, `gloo` on CPU (None: chosen from the accelerator).
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def checkpoint_io(self):
        """Consolidated (non-sharded) checkpoints go through `AtomicCheckpointIO` unless a plugin says otherwise."""
        if self._checkpoint_io is None:
            from visprior.training.checkpointing import AtomicCheckpointIO

            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io) -> None:
        self._checkpoint_io = io

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        token = self.broadcast(f"{os.getpid()}-{time.time_ns()}")
        tmp = path.with_name(f"{path.name}.tmp-{token}")
        if self.is_global_zero:
            remove_stale_temporaries(path)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)  # DCP shards from every rank, then meta.pt on rank 0
        self.barrier()
        if self.is_global_zero:
            publish_folder(tmp, path)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_published(Path(filepath))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_folder(folder: Path, name: Path) -> None:
    """Make `name` (a symlink) point at the complete checkpoint `folder` in one rename; delete what it pointed at before.

    A real folder at `name` (written by Lightning's own, non-atomic save) is moved aside first: only that first switch
    has a moment without `name`.
    """
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)
    done = folder.with_name(folder.name.replace(".tmp-", ".d-", 1))  # complete: no longer a temporary
    os.replace(folder, done)
    folder = done
    previous = Path(os.path.realpath(name)) if name.is_symlink() else None
    if name.exists() and not name.is_symlink():
        aside = name.with_name(f"{name.name}.old-{os.getpid()}")
        os.replace(name, aside)
        previous = aside
    link = name.with_name(f"{name.name}.link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(folder.name, link)
    os.replace(link, name)
    _fsync_dir(name.parent)
    if previous is not None and previous != folder.resolve() and previous.exists():
        shutil.rmtree(previous, ignore_errors=True)


def remove_stale_temporaries(name: Path) -> None:
    """Folders of saves that never completed or were never linked (a kill mid-save); the live target is kept."""
    live = Path(os.path.realpath(name)) if name.is_symlink() else None
    for pattern in (f"{name.name}.tmp-*", f"{name.name}.d-*", f"{name.name}.link-*"):
        for stale in name.parent.glob(pattern):
            if stale.resolve() != live:
                if stale.is_symlink() or stale.is_file():
                    stale.unlink()
                else:
                    shutil.rmtree(stale, ignore_errors=True)


def remove_published(name: Path) -> None:
    """Remove a checkpoint: the folder a published name points at and the name itself (or a plain file / folder)."""
    if name.is_symlink():
        target = Path(os.path.realpath(name))
        name.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif name.is_dir():
        shutil.rmtree(name, ignore_errors=True)
    elif name.exists():
        name.unlink()
