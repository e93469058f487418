"""FSDP2 wrapping and activation checkpointing, kept out of the models (torchtitan's `parallelize.py` idea).

The models stay plain `nn.Module`s. When the trainer runs Lightning's `ModelParallelStrategy`, the stage's `configure_model`
calls `parallelize` with the strategy's device mesh: every transformer block of every component (the LM's decoder layers,
the vision tower's encoder layers) becomes its own FSDP unit, then the root takes the rest (embeddings, connector, norms),
so parameters are gathered one block at a time. Mixed precision is FSDP2's `MixedPrecisionPolicy` (bf16 compute, fp32 reduction by default).
"""

from __future__ import annotations

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
        if getattr(module, "supports_gradient_checkpointing", False) and hasattr(
            module, "gradient_checkpointing_enable"
        ):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            param_dtype: FSDP2 compute dtype of parameters (`MixedPrecisionPolicy.param_dtype`); fp32 copies are kept.
            reduce_dtype: dtype of the gradient reduce-scatter.
            activation_checkpointing: recompute each transformer block in backward (less memory, ~1/3 more compute).
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
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
