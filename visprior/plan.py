"""`visprior plan CONFIG... --scale paper --gpus N --gpu_mem GiB`: size a run before it runs, on the meta device.

For each stage (a stage YAML today; a recipe's stages once recipes exist: `plan_stages` takes resolved stage configs) the
model is instantiated on the meta device (no weights, no GPU, seconds for a 7B model) and the plan reports parameters per
component (total / trainable), FLOPs per token, tokens per stage, GPU-hours at a stated MFU, and memory per GPU under the
chosen sharding: weights, gradients, optimizer state, gathered parameters, and activations with and without activation
checkpointing.

Memory model (bytes; P parameters, T trainable, N GPUs, e bytes of the compute dtype, tokens per micro-batch t):
- FSDP2 (`FSDP2Strategy`): fp32 sharded parameters 4P/N, fp32 sharded gradients 4T/N, AdamW moments 8T/N; gathered compute
  copies of the root unit and two blocks (current + prefetched) e·(root + 2·block); one unsharded fp32 block gradient.
- DDP: 4P + 4T (gradients) + 4T (DDP's bucket copy) + 8T; one device: 4P + 4T + 8T.
- Activations are the tensors autograd saves, counted per op of transformers' Llama-family decoder (RMSNorm with fp32
  upcast, SwiGLU) and CLIP / SigLIP encoder layers, with flash-style attention (q, k, v, out and the fp32 log-sum-exp; no
  T x T matrix), plus the fp32 log-softmax of the loss (4·V per token). A frozen layer that gradients pass through keeps
  only what input gradients need. `tests/test_plan.py` checks these counts against the tensors a small model really saves
  on CPU. With activation checkpointing (one checkpoint per block) a block keeps only its input (e·h per token) and one
  block at a time is recomputed in backward.
Not modelled: allocator fragmentation, NCCL buffers, CUDA context (~1-2 GiB), the data loader's pinned memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from visprior.models import presets
from visprior.stages.flops import attention_flops_per_token, flops_factor

GIB = 1024**3

SETUPS: dict[str, dict[str, Any]] = {
    "vila-7b": {
        "language_model": "llama2_7b", "vision_tower": "clip_l14_336", "connector": "linear",
        "source": "VILA (Lin et al., CVPR 2024): LLaMA-2-7B + CLIP ViT-L/14 at 336 px, linear projector",
    },
    "llava-1.5-7b": {
        "language_model": "llama2_7b", "vision_tower": "clip_l14_336", "connector": "mlp2x_gelu",
        "source": "LLaVA-1.5-7B (Liu et al., 2023): Vicuna-7B (LLaMA-2-7B shapes) + CLIP ViT-L/14-336, mlp2x_gelu",
    },
    "qwen2-7b-siglip": {
        "language_model": "qwen2_7b", "vision_tower": "siglip_so400m_384", "connector": "mlp2x_gelu",
        "source": "Qwen2-7B + SigLIP-SO400M/14 at 384 px, mlp2x_gelu (LLaVA-OneVision's parts)",
    },
}  # fmt: skip

# What each stage trains when its YAML does not say (the stages' own defaults).
DEFAULT_TRAINABLE = {
    "VisionLanguagePretraining": {"connector": 1e-3},
    "InstructionTuning": {"connector": 1e-3, "language_model": 2e-4},
    "LanguagePretraining": {"language_model": 3e-3},
}


@dataclass
class Hardware:
    gpus: int = 8
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989; A100: 312)."""
    mfu: float = 0.4


@dataclass
class StageConfig:
    """What the plan needs of one stage: its model specs (plain dicts), what trains, and the batch geometry."""

    name: str
    stage: str
    language_model: dict[str, Any]
    vision_tower: dict[str, Any] | None = None
    connector: dict[str, Any] | None = None
    trainable: dict[str, float] = field(default_factory=dict)
    micro_batch: int = 1
    seq_len: int = 2048
    max_steps: int = 1000
    accumulate: int = 1
    images_per_sequence: float = 1.0
    param_dtype: str = "bfloat16"
    sharding: Literal["fsdp2", "ddp", "single"] = "fsdp2"
    activation_checkpointing: bool = False


@dataclass
class ComponentPlan:
    name: str
    total: int
    trainable: int
    flops: float
    """FLOPs per step of this component (forward + the backward passes that run)."""


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    activations_checkpointed: float

    def total(self, checkpointed: bool) -> float:
        act = self.activations_checkpointed if checkpointed else self.activations
        return self.weights + self.gradients + self.optimizer + self.gathered + act


@dataclass
class StagePlan:
    stage: StageConfig
    components: list[ComponentPlan]
    tokens_per_step: int
    images_per_step: float
    steps: int
    flops_per_step: float
    memory: MemoryPlan
    hardware: Hardware

    @property
    def params(self) -> int:
        return sum(c.total for c in self.components)

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.components)

    @property
    def tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def flops_per_token(self) -> float:
        return self.flops_per_step / max(self.tokens_per_step, 1)

    @property
    def gpu_hours(self) -> float:
        return self.flops_per_step * self.steps / (self.hardware.peak_tflops * 1e12 * self.hardware.mfu) / 3600

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "stage": asdict(self.stage),
            "components": [asdict(c) for c in self.components],
            "params": self.params,
            "trainable": self.trainable,
            "tokens_per_step": self.tokens_per_step,
            "tokens": self.tokens,
            "flops_per_token": self.flops_per_token,
            "gpu_hours": self.gpu_hours,
            "memory_gib": {
                **{k: v / GIB for k, v in asdict(m).items()},
                "total": m.total(False) / GIB,
                "total_checkpointed": m.total(True) / GIB,
            },  # fmt: skip
            "hardware": asdict(self.hardware),
        }


# ------------------------------------------------------------------------------------------------ model on meta


def _preset(value: Any, table: dict[str, dict[str, Any]], what: str) -> dict[str, Any]:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"unknown {what} preset {value!r}; presets: {sorted(table)}")
        return dict(table[value])
    return dict(value)


def _folder_config(path: str, vision: bool) -> dict[str, Any]:
    from visprior.checkpoints.common import architecture, load_config, tower_config

    return architecture(tower_config(Path(path)) if vision else load_config(Path(path)))


def lm_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The LM's config dict with `vocab_size` (from the config, else the tokenizer folder's length)."""
    config = _folder_config(spec["path"], False) if spec.get("config") is None else dict(spec["config"])
    if not config.get("vocab_size"):
        tokenizer = spec.get("tokenizer") or spec.get("path")
        if not tokenizer or not Path(tokenizer).is_dir():
            raise ValueError(f"the language model config has no vocab_size and its tokenizer folder {tokenizer!r} does not "
                             "exist: create it (`visprior data tokenizer`) or plan with --scale paper")  # fmt: skip
        from visprior.models.language import load_tokenizer

        config["vocab_size"] = len(load_tokenizer(tokenizer)) + (1 if spec.get("add_image_token") else 0)
    return config


def meta_components(stage: StageConfig) -> dict[str, nn.Module]:
    """The stage's components on the meta device, with `requires_grad` as the stage sets it."""
    from visprior.models.connectors import ConnectorSpec, build_connector
    from visprior.models.language import causal_lm_from_config
    from visprior.models.vision import VisionTower, vision_model_from_config

    parts: dict[str, nn.Module] = {}
    with torch.device("meta"):
        if stage.vision_tower is not None:
            spec = stage.vision_tower
            config = _folder_config(spec["path"], True) if spec.get("config") is None else spec["config"]
            model = vision_model_from_config(config, spec.get("image_size"))
            tower = VisionTower(
                model, spec.get("feature_layer", -2), spec.get("select", "patch"), spec.get("image_size")
            )
            parts["vision_tower"] = tower
        lm = causal_lm_from_config(lm_config(stage.language_model))
        if stage.vision_tower is not None:
            conn = ConnectorSpec(**(stage.connector or {}))
            parts["connector"] = build_connector(conn, tower.hidden_size, lm.config.hidden_size, tower.num_tokens)
        parts["language_model"] = lm
    unknown = set(stage.trainable) - set(parts)
    if unknown:
        raise ValueError(f"stage {stage.name!r}: trainable names {sorted(unknown)}, the model has {sorted(parts)}")
    for name, module in parts.items():
        module.requires_grad_(name in stage.trainable)  # a VisionTower keeps its unreachable layers frozen
    return parts


# ------------------------------------------------------------------------------------------------ activations


def lm_layer_bytes(cfg: Any, e: int, trained: bool) -> float:
    """Bytes one Llama-family decoder layer saves per token (module docstring); `trained=False`: frozen, grads pass."""
    h, i, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // a
    h_q, h_kv = a * head_dim, (cfg.num_key_value_heads or a) * head_dim
    norms = 2 * (4 * h + 4)  # RMSNorm keeps its fp32 input and 1/rms
    attention = 2 * e * h_q + 2 * e * h_kv + 4 * a  # q, out; k, v; log-sum-exp
    mlp = 3 * e * i  # gate output, its activation, up output
    if trained:  # weight gradients need the linear inputs and the pre-weight normalised activations
        norms += 2 * e * h
        attention += e * h  # q/k/v input (o_proj's input is the attention output itself)
        mlp += e * h + e * i  # gate/up input, down input
    return norms + attention + mlp


def tower_layer_bytes(cfg: Any, e: int) -> float:
    """Bytes one CLIP / SigLIP / ViT encoder layer saves per token when it trains (LayerNorm, GELU-family MLP)."""
    h, i, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    act = 2 if getattr(cfg, "hidden_act", "gelu") == "quick_gelu" else 1  # x * sigmoid(1.702 x) keeps two tensors
    return 4 * a + 8 * e * h + 4 * e + (1 + act) * e * i


@dataclass
class Activations:
    layered: float  # all blocks' saved tensors per micro-batch
    block_inputs: float  # what a checkpointed run keeps of the blocks (their inputs)
    largest_block: float  # one block's saved tensors (recomputed one at a time under checkpointing)
    other: float  # embeddings, connector, final norm, loss


def activation_bytes(stage: StageConfig, parts: dict[str, nn.Module]) -> Activations:
    """Saved tensors per micro-batch on one GPU."""
    e = torch.finfo(getattr(torch, stage.param_dtype)).bits // 8
    lm = parts["language_model"]
    cfg = lm.config
    t = stage.micro_batch * stage.seq_len
    trains = {n for n, m in parts.items() if any(p.requires_grad for p in m.parameters())}
    layered = inputs = largest = other = 0.0
    upstream = False
    tower = parts.get("vision_tower")
    if tower is not None and stage.images_per_sequence > 0:
        images = stage.micro_batch * stage.images_per_sequence
        patches = images * (tower.num_patches + (1 if tower.has_cls else 0))
        if "vision_tower" in trains:
            per = tower_layer_bytes(tower.model.config, e) * patches
            layered += tower.num_layers_used * per
            inputs += tower.num_layers_used * e * tower.hidden_size * patches
            largest = max(largest, per)
            other += images * 3 * tower.image_size**2 * e + patches * (
                e * tower.hidden_size + 2 * e
            )  # pixels, pre-norm
            upstream = True
        conn = parts["connector"]
        tokens = images * conn.num_tokens
        widths = [m.out_features for m in conn.modules() if isinstance(m, nn.Linear)]
        if "connector" in trains:
            other += tokens * e * (tower.hidden_size + 2 * max(widths[:1] or [0]))
            upstream = True
        elif upstream:
            other += tokens * e * max(widths[:1] or [0])
    lm_trains = "language_model" in trains
    if lm_trains or upstream:
        per = lm_layer_bytes(cfg, e, lm_trains) * t
        layered += cfg.num_hidden_layers * per
        other += (
            2 * stage.seq_len * (cfg.hidden_size // cfg.num_attention_heads) * e
        )  # rotary cos / sin, shared by layers
        inputs += cfg.num_hidden_layers * e * cfg.hidden_size * t
        largest = max(largest, per)
        other += t * (
            4 * cfg.hidden_size + 4 + (2 * e * cfg.hidden_size if lm_trains else 0)
        )  # final norm (+ lm_head input)
        other += t * (4 * cfg.vocab_size + 8 + 1)  # fp32 log-softmax, targets, image mask
    return Activations(layered, inputs, largest, other)


# ------------------------------------------------------------------------------------------------ the plan


def _blocks(module: nn.Module) -> list[nn.Module]:
    from visprior.stages.parallelize import transformer_blocks

    return transformer_blocks(module)


def _matmul(modules: list[nn.Module]) -> int:
    from visprior.stages.flops import matmul_params

    return sum(matmul_params(m) for m in modules)


def component_flops(parts: dict[str, nn.Module], stage: StageConfig, images: float, tokens: int) -> dict[str, float]:
    """FLOPs per step per component: 6/4/2 x matmul parameters by trainability, plus attention (see `stages/flops.py`)."""
    trains = {n for n, m in parts.items() if any(p.requires_grad for p in m.parameters())}
    out: dict[str, float] = {}
    upstream = False
    tower = parts.get("vision_tower")
    if tower is not None:
        f = flops_factor("vision_tower" in trains, False)
        used = [tower.model.embeddings, *tower._layers()[: tower.num_layers_used]]
        seq = tower.num_patches + (1 if tower.has_cls else 0)
        per_patch = f * _matmul(used) + attention_flops_per_token(tower.num_layers_used, tower.hidden_size, seq, f)
        out["vision_tower"] = images * seq * per_patch
        upstream = "vision_tower" in trains
        f = flops_factor("connector" in trains, upstream)
        upstream = upstream or "connector" in trains
        out["connector"] = images * tower.num_tokens * f * _matmul([parts["connector"]])
    lm = parts["language_model"]
    f = flops_factor("language_model" in trains, upstream)
    cfg = lm.config
    per_token = f * _matmul([lm]) + attention_flops_per_token(cfg.num_hidden_layers, cfg.hidden_size, stage.seq_len, f)
    out["language_model"] = tokens * per_token
    return out


def memory_per_gpu(stage: StageConfig, parts: dict[str, nn.Module], hw: Hardware) -> MemoryPlan:
    e = torch.finfo(getattr(torch, stage.param_dtype)).bits // 8
    params = sum(p.numel() for m in parts.values() for p in m.parameters())
    trainable = sum(p.numel() for m in parts.values() for p in m.parameters() if p.requires_grad)
    act = activation_bytes(stage, parts)
    checkpointed = act.block_inputs + act.largest_block + act.other
    if stage.sharding == "fsdp2":
        n = hw.gpus
        blocks = [b for m in parts.values() for b in _blocks(m)]
        block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
        gathered = e * ((params - in_blocks) + 2 * block) + 4 * block
        return MemoryPlan(
            4 * params / n, 4 * trainable / n, 8 * trainable / n, gathered, act.layered + act.other, checkpointed
        )
    grads = 8 * trainable if stage.sharding == "ddp" else 4 * trainable  # DDP's gradient buckets are a second copy
    return MemoryPlan(4 * params, grads, 8 * trainable, 0.0, act.layered + act.other, checkpointed)


def plan_stage(stage: StageConfig, hw: Hardware) -> StagePlan:
    parts = meta_components(stage)
    if "connector" in parts and parts["connector"].num_tokens * stage.images_per_sequence > stage.seq_len:
        raise ValueError(f"stage {stage.name!r}: {parts['connector'].num_tokens} image tokens per image do not fit in "
                         f"seq_len {stage.seq_len}; pass --seq_len (e.g. 2048)")  # fmt: skip
    if stage.sharding == "single" and hw.gpus != 1:
        stage = StageConfig(**{**asdict(stage), "sharding": "ddp"})
    sequences = stage.micro_batch * hw.gpus * stage.accumulate
    tokens = sequences * stage.seq_len
    images = sequences * stage.images_per_sequence if "vision_tower" in parts else 0.0
    flops = component_flops(parts, stage, images, tokens)
    comps = [
        ComponentPlan(
            name,
            sum(p.numel() for p in m.parameters()),
            sum(p.numel() for p in m.parameters() if p.requires_grad),
            flops.get(name, 0.0),
        )  # fmt: skip
        for name, m in parts.items()
    ]
    return StagePlan(
        stage, comps, tokens, images, stage.max_steps, sum(flops.values()), memory_per_gpu(stage, parts, hw), hw
    )


def plan_stages(stages: list[StageConfig], hw: Hardware) -> list[StagePlan]:
    """Plan an ordered list of resolved stages (a recipe's, or the stage YAMLs given on the command line)."""
    return [plan_stage(s, hw) for s in stages]


# ------------------------------------------------------------------------------------------------ configs in


def resolve_stage_yaml(path: str) -> dict[str, Any]:
    """The config `visprior fit --config PATH` would run, parsed and validated by LightningCLI but not instantiated."""
    from visprior.stage_cli import resolve_config

    return resolve_config(["--config", path])


def _plain(value: Any) -> Any:
    from visprior.stages.base import plain

    return plain(value)


def stage_from_config(name: str, config: dict[str, Any]) -> StageConfig:
    """A `StageConfig` from a resolved LightningCLI config (`visprior fit --print_config` form)."""
    model = config["model"]
    stage_cls = model["class_path"].rsplit(".", 1)[-1]
    args = model.get("init_args", {})
    lm, tower, connector = (_plain(args.get(k)) for k in ("language_model", "vision_tower", "connector"))
    if lm is None and args.get("init_from"):
        from visprior.stages.init_from import as_init_list

        source = as_init_list(args["init_from"])[0]
        from visprior.checkpoints.load import open_checkpoint

        spec = open_checkpoint(source.path, source.vision_tower).spec()
        lm, tower, connector = _plain(spec.language_model), _plain(spec.vision_tower), _plain(spec.connector)
    if lm is None:
        raise ValueError(f"{name}: the stage names no language_model (and no init_from to take it from)")
    data = (config.get("data") or {}).get("init_args", {})
    trainer = config.get("trainer") or {}
    strategy = trainer.get("strategy")
    fsdp2 = isinstance(strategy, dict) and "FSDP2" in str(strategy.get("class_path"))
    sharding = "fsdp2" if fsdp2 else ("single" if trainer.get("devices") in (1, "1") else "ddp")
    strategy_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    text_only = stage_cls == "LanguagePretraining" or tower is None
    return StageConfig(
        name=name,
        stage=stage_cls,
        language_model=lm,
        vision_tower=None if text_only else tower,
        connector=None if text_only else (connector or {"name": "mlp2x_gelu"}),
        trainable=dict(args.get("trainable") or DEFAULT_TRAINABLE.get(stage_cls, {})),
        micro_batch=int(data.get("batch_size", 1)),
        seq_len=int(data.get("seq_len", 2048)),
        max_steps=int(trainer.get("max_steps") or 1000),
        accumulate=int(trainer.get("accumulate_grad_batches") or 1),
        images_per_sequence=0.0 if text_only else 1.0,
        param_dtype=strategy_args.get("param_dtype", "bfloat16"),
        sharding=sharding,
        activation_checkpointing=bool(args.get("activation_checkpointing", False)),
    )


def paper_scale(stage: StageConfig, setup: str) -> StageConfig:
    """Swap the stage's models for a paper setup's (presets on the meta device), keeping what trains and the batch."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; setups: {sorted(SETUPS)}")
    s = SETUPS[setup]
    lm = {"config": _preset(s["language_model"], presets.LANGUAGE_PRESETS, "language model")}
    if stage.vision_tower is None:
        return StageConfig(**{**asdict(stage), "language_model": lm})
    tower = {**(stage.vision_tower or {}), "config": _preset(s["vision_tower"], presets.VISION_PRESETS, "vision tower"),
             "path": None, "image_size": None}  # fmt: skip
    tower.setdefault("feature_layer", -2)
    return StageConfig(
        **{**asdict(stage), "language_model": lm, "vision_tower": tower, "connector": {"name": s["connector"]}}
    )


# ------------------------------------------------------------------------------------------------ report


def _n(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(plans: list[StagePlan]) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buf = StringIO()
    console = Console(file=buf, width=140, force_terminal=False)
    for p in plans:
        s, hw, m = p.stage, p.hardware, p.memory
        title = (f"{s.name} ({s.stage}): {s.sharding} on {hw.gpus} GPU(s), {s.param_dtype} compute, micro-batch "
                 f"{s.micro_batch} x {s.seq_len} tokens, accumulate {s.accumulate}")  # fmt: skip
        t = Table(title=title, title_justify="left")
        for col in ("component", "params", "trainable", "FLOPs / step"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for c in p.components:
            t.add_row(c.name, f"{c.total:,}", f"{c.trainable:,}", _n(c.flops))
        t.add_row("total", f"{p.params:,}", f"{p.trainable:,}", _n(p.flops_per_step))
        console.print(t)
        console.print(
            f"  FLOPs per token {_n(p.flops_per_token)}; {_n(p.tokens_per_step)} tokens/step x {p.steps:,} steps = "
            f"{_n(p.tokens)} tokens; {p.flops_per_step * p.steps:.3g} FLOPs = {p.gpu_hours:,.1f} GPU-hours at "
            f"{hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s ({p.gpu_hours / hw.gpus:,.1f} h on {hw.gpus} GPUs)"
        )
        mem = Table(title=f"memory per GPU (GiB; {hw.gpu_mem_gib:g} available)", title_justify="left")
        for col in ("weights", "grads", "optimizer", "gathered", "activations", "total", "fits"):
            mem.add_column(col, justify="right")
        for label, ckpt in (("no activation checkpointing", False), ("activation checkpointing", True)):
            act = m.activations_checkpointed if ckpt else m.activations
            total = m.total(ckpt)
            mem.add_row(f"{m.weights / GIB:.2f}", f"{m.gradients / GIB:.2f}", f"{m.optimizer / GIB:.2f}", f"{m.gathered / GIB:.2f}",
                        f"{act / GIB:.2f}", f"{total / GIB:.2f}", f"{'yes' if total <= hw.gpu_mem_gib * GIB else 'NO'} ({label})")  # fmt: skip
        console.print(mem)
        console.print()
    return buf.getvalue()


def plan_command(
    configs: list[str],
    scale: Literal["toy", "paper"] = "toy",
    setup: str = "vila-7b",
    gpus: int = 8,
    gpu_mem: float = 80.0,
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    global_batch: int | None = None,
    max_steps: int | None = None,
    sharding: Literal["fsdp2", "ddp", "single"] | None = None,
    json_out: str | None = None,
) -> list[StagePlan]:
    """Size each stage on the meta device: parameters, FLOPs, tokens, GPU-hours and memory per GPU.

    Args:
        configs: stage YAMLs (in the order they run), as `visprior fit --config` takes them.
        scale: `toy` (the models the YAMLs name) or `paper` (the `setup`'s models: presets, no download).
        setup: the paper setup for `--scale paper`: vila-7b, llava-1.5-7b, qwen2-7b-siglip.
        gpus: data-parallel GPUs.
        gpu_mem: memory per GPU (GiB).
        peak_tflops: dense bf16 peak per GPU.
        mfu: model FLOPs utilisation assumed for GPU-hours.
        micro_batch: sequences per GPU per step (default: the data module's batch_size).
        seq_len: tokens per sequence (default: the data module's seq_len).
        global_batch: sequences per optimizer step (sets gradient accumulation).
        max_steps: optimizer steps per stage (default: the trainer's max_steps).
        sharding: fsdp2, ddp or single (default: from the trainer's strategy; fsdp2 at paper scale).
        json_out: also write the plan as JSON here.
    """
    hw = Hardware(gpus, gpu_mem, peak_tflops, mfu)
    stages = []
    for path in configs:
        stage = stage_from_config(Path(path).stem, resolve_stage_yaml(path))
        if scale == "paper":
            stage = paper_scale(stage, setup)
            stage.sharding = sharding or "fsdp2"
        elif sharding:
            stage.sharding = sharding
        stage.micro_batch = micro_batch or stage.micro_batch
        stage.seq_len = seq_len or stage.seq_len
        stage.max_steps = max_steps or stage.max_steps
        if global_batch:
            per_step = stage.micro_batch * hw.gpus
            stage.accumulate = max(1, math.ceil(global_batch / per_step))
        stages.append(stage)
    plans = plan_stages(stages, hw)
    if scale == "paper":
        print(f"paper scale: {SETUPS[setup]['source']} (presets, meta device)")
    print(format_plan(plans))
    if json_out:
        Path(json_out).write_text(json.dumps([p.to_dict() for p in plans], indent=2, default=str))
    return plans
