"""What every training stage shares: which components train (and at which learning rate), the optimizer and schedule,
weights-only initialisation from earlier stages, and throughput / MFU logging.

A stage holds `self.model`, an `nn.Module` whose named children are the components (`vision_tower`, `connector`,
`language_model`, ...). `trainable: {connector: 1e-3, language_model: 2e-5}` is the whole freezing policy: listed components
train at their learning rate, everything else gets `requires_grad=False` and stays in eval mode (dropout off, norms fixed)
even when Lightning calls `train()`.

The lifecycle, once each: a kind of stage builds its model and hands it to `Stage.__init__`, which records the outermost
constructor's arguments as the hyper-parameters (`constructor_arguments`, litgpt's `capture_hparams`: nothing is re-listed)
and freezes (`freeze`, logged, an error if called again). `configure_model` applies `init_from` and any sharding, once.
Eval mode of frozen parts has one mechanism, the `train()` override, entered at fit start (`on_fit_start`: Lightning 2.6
keeps whatever mode a module comes with, and after validation restores each module's mode as it was); resuming restores
weights only and never re-freezes. Subclasses implement `compute_loss(batch)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from visprior.stages.init_from import InitFrom, apply_init_from, as_init_list
from visprior.training.nonfinite import skip_nonfinite, step_skipped

COUNTS_KEY = "host_counts"
"""Batch key under which the stage puts the batch's host-side counts before transfer (`Stage.batch_counts`)."""


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter's device has one (CPU, CUDA, ...), foreach elsewhere.

    Why fused: foreach runs each of AdamW's arithmetic steps as its own pass over all tensors; the fused kernel updates a
    tensor in one pass (torchtitan's default too). On the toy VLM (8.8M parameters, one core of a Zen 4 EPYC) the step
    of the optimizer took 9.4 against 41.6 ms, a few per cent of a training step (train_step.py: 1.02x). Same update
    to float rounding.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: foreach, as before
        fused_devices = set()
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in fused_devices and torch.is_floating_point(p) for p in params)
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {"foreach": True}))


@dataclass
class StepOutput:
    """What a stage's `compute_loss` hands back to the shared training step."""

    loss: torch.Tensor
    tokens: int = 0
    """Non-padding tokens the step processed (for tokens/s and MFU), counted on the host (`Stage.host_counts`)."""
    supervised: int | torch.Tensor = 0
    """Tokens that carried a loss; a tensor on the model's device is kept as one (no host sync per step)."""
    samples: int = 0
    """Documents / pairs / conversations in the batch."""
    images: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weight: int | torch.Tensor | None = None
    """How many units `loss` is a mean over (e.g. supervised tokens). Under several processes the step weights each
    rank's loss by its share of the units summed over ranks, so the averaged gradient is the mean over every rank's
    units, as in one process on the whole global batch; None: each rank's mean weighs the same."""


def plain(value: Any) -> Any:
    """Dataclasses (model specs, InitFrom) as plain dicts, so checkpoints load with `torch.load(weights_only=True)`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def coerce(cls: type, value: Any) -> Any:
    """A spec from YAML or from a checkpoint's plain hyper-parameters (`load_from_checkpoint`)."""
    return cls(**value) if isinstance(value, dict) else value


MODEL_HPARAMS = (
    "language_model",
    "vision_tower",
    "connector",
    "text_encoder",
    "num_classes",
    "embed_dim",
    "frozen_block",
    "head_norm",
    "pool",
    "visual_words",
)
"""Hyper-parameters that define a stage's model (beside its parameter shapes); what a resume must find unchanged."""
LOCATION_KEYS = ("path", "tokenizer")
"""Where a model was read from is not what it is: moving a folder must not block a resume."""


class ResumeMismatch(ValueError):
    """A checkpoint written by another stage class or another model config was given to resume this run."""


def _without_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_KEYS}
    return value


def constructor_arguments(obj: object) -> dict[str, Any]:
    """The arguments of the outermost `__init__` running on `obj`, with the values its locals hold now.

    Called from `Stage.__init__`, this is the stage's YAML: the kind's own signature (its `**stage_args` flattened), after
    the kind has coerced specs and resolved defaults, so a checkpoint rebuilds the same stage with `cls(**hparams)`.
    """
    frame = inspect.currentframe()
    outer = None
    while frame is not None:
        if frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
            outer = frame
        frame = frame.f_back
    if outer is None:
        raise RuntimeError("constructor_arguments() must be called while the object's __init__ runs")
    init = next(
        klass.__dict__["__init__"]
        for klass in type(obj).__mro__
        if getattr(klass.__dict__.get("__init__"), "__code__", None) is outer.f_code
    )
    values = outer.f_locals
    args: dict[str, Any] = {}
    for name, param in inspect.signature(init).parameters.items():
        if name == "self":
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            args.update(values[name])
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(obj).__name__}.__init__ takes *{name}: stage arguments must be named (YAML keys)")
        else:
            args[name] = values[name]
    return args


def component_of(name: str, components: list[str]) -> str | None:
    """The listed component a parameter name belongs to (longest dotted prefix wins), or None."""
    best = None
    for comp in components:
        if (name == comp or name.startswith(comp + ".")) and (best is None or len(comp) > len(best)):
            best = comp
    return best


def schedule_factor(step: int, warmup_steps: int, decay_steps: int | None, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `decay_steps` (constant after warmup if None)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay_steps or decay_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stage(pl.LightningModule):
    """Base of all stages: freezing by component, AdamW with per-component groups, warmup + cosine, MFU logging."""

    model: nn.Module
    default_trainable: ClassVar[dict[str, float]] = {}
    """What trains when `trainable` is not given (each kind of stage sets its own)."""

    def __init__(
        self,
        model: nn.Module,
        trainable: dict[str, float] | None = None,
        init_from: str | InitFrom | list[InitFrom] | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        grad_clip: float | None = 1.0,
        peak_flops: float | Literal["auto"] | None = "auto",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ):
        """
        Args:
            model: the stage's model, built by the kind of stage (not a YAML key).
            trainable: component -> learning rate; components not listed are frozen and kept in eval mode (None: the
                class's `default_trainable`).
            init_from: weights-only initialisation of named components from a `.ckpt`, safetensors file, HF folder or
                released VLM folder (llava-hf, LLaVA, VILA); a bare path loads every component (not resuming: use
                `ckpt_path` for that).
            weight_decay: AdamW decay for matrices; biases and norm weights (1-D parameters) never decay.
            betas: AdamW betas.
            warmup_steps: linear warmup steps.
            decay_steps: end of the cosine decay; None means `trainer.max_steps` (never `estimated_stepping_batches`,
                which would consume the loader before its state is restored).
            min_lr_ratio: learning rate at the end of the cosine, as a fraction of the peak.
            grad_clip: max global gradient norm (None: no clipping); also applied under FSDP2, where Lightning's own is refused.
            peak_flops: the hardware's peak FLOP/s for `train/mfu` (e.g. 989e12 for an H100 bf16 dense); `auto`: the
                measured matmul rate of this CPU in the run's precision, or the table figure of a known GPU
                (`visprior.hardware`), logged at fit start; None: MFU not logged.
            activation_checkpointing: recompute each transformer block in backward (less memory, ~1/3 more compute),
                under every strategy (FSDP2 included); `visprior plan` shows the memory with and without.
            compile: `torch.compile` each transformer block (regional, as torchtitan; also under FSDP2), compiled
                kernels cached on disk for relaunches (`visprior.stages.compile`). It pays only when the run is long
                enough to earn back the first compile (benchmarks/train_step.py prints both).
        """
        super().__init__()
        self.trainable = dict(trainable if trainable is not None else self.default_trainable)
        hparams = constructor_arguments(self)
        if "trainable" in hparams:  # what actually trains, default resolved
            hparams["trainable"] = self.trainable
        self.save_hyperparameters({k: plain(v) for k, v in hparams.items()})
        self.init_from = as_init_list(init_from)
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio
        self.grad_clip = grad_clip
        self.peak_flops = peak_flops
        self.activation_checkpointing = activation_checkpointing
        self.regional_compile = compile  # not `self.compile`: that is nn.Module.compile
        self._configured = False
        self._frozen = False
        self._last_time: float | None = None
        self._window = [0, 0, 0.0]  # tokens, samples, model FLOPs since the last logged step
        self._measured = [0, 0.0, 0.0]  # tokens (all ranks), model FLOPs (this rank), seconds over the logged windows
        self._supervised_total: int | torch.Tensor = 0
        self._peak: float | None = None if peak_flops == "auto" else peak_flops
        self._clip_params: list[nn.Parameter] | None = None
        self.model = model
        self.freeze()

    # ------------------------------------------------------------------------------------------------ components

    def components(self) -> dict[str, nn.Module]:
        return dict(self.model.named_children())

    def freeze(self) -> None:
        """Apply `trainable`, once: listed components train, the rest get `requires_grad=False` and eval mode.

        An unknown component name is an error naming the known ones. The listed module's own `requires_grad_` decides
        inside it (a vision tower keeps its unused layers frozen, DDP needs that; LM4VE's frozen block stays frozen).
        """
        if self._frozen:
            raise RuntimeError(f"{type(self).__name__} is frozen once, at construction; freeze() was called again")
        names = {n for n, _ in self.model.named_modules() if n}
        for comp in self.trainable:
            if comp not in names:
                raise ValueError(f"trainable: unknown component {comp!r}; known: {sorted(self.components())}")
        self.model.requires_grad_(False)
        for comp in self.trainable:
            self.model.get_submodule(comp).requires_grad_(True)
        self._frozen = True
        frozen = self.frozen_modules()
        for module in frozen:
            module.eval()
        kept = [n for n, m in self.model.named_modules() if any(m is f for f in frozen)]
        rank_zero_info(
            f"{type(self).__name__}: training {dict(self.trainable)}; frozen and kept in eval mode: {kept or 'nothing'}"
        )

    def frozen_modules(self) -> list[nn.Module]:
        """The largest submodules without any trainable parameter (kept in eval mode): whole frozen components, and the
        frozen parts of trainable ones (LM4VE's LLM block inside `frozen_block`, a tower's unused layers)."""
        found: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                found.append(module)
                return
            for child in module.children():
                visit(child)

        for component in self.components().values():
            visit(component)
        return found

    def train(self, mode: bool = True) -> Stage:
        """The one place frozen parts are kept in eval mode (Lightning calls it at fit start and after validation)."""
        super().train(mode)
        if mode and getattr(self, "_frozen", False):
            for m in self.frozen_modules():
                m.eval()
        return self

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(component, trainable, frozen) parameter counts per top-level component."""
        rows = []
        for name, module in self.components().items():
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
            rows.append((name, trainable, frozen))
        return rows

    def log_parameter_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{type(self).__name__}: parameters per component")
        for col in ("component", "trainable", "frozen", "lr", "mode"):
            table.add_column(col, justify="left" if col in ("component", "mode") else "right")
        frozen_parts = self.frozen_modules()
        for name, trainable, frozen in self.parameter_table():
            lr = self.trainable.get(name)
            component = getattr(self.model, name)
            mode = "train" if component.training else "eval"
            nested = [n for n, m in component.named_modules() if n and any(m is f for f in frozen_parts)]
            if component.training and nested:  # frozen parts inside a trainable component (LM4VE's block)
                shown = ", ".join(nested[:2]) + (f" +{len(nested) - 2}" if len(nested) > 2 else "")
                mode = f"train; eval: {shown}"
            table.add_row(name, f"{trainable:,}", f"{frozen:,}", "-" if lr is None else f"{lr:g}", mode)
        Console().print(table)

    # ------------------------------------------------------------------------------------------------ set-up

    def configure_model(self) -> None:
        """Weights-only `init_from`, then sharding, once (Lightning may call this more than once; a resume then
        overwrites the initialised weights with the checkpoint's)."""
        if self._configured:
            return
        self._configured = True
        apply_init_from(self.model, self.init_from)
        from visprior.stages.parallelize import FSDP2Strategy, parallelize

        if self.regional_compile:  # before sharding: FSDP2's hooks stay outside the compiled blocks
            from visprior.stages.compile import compile_blocks

            rank_zero_info(
                f"compile: {compile_blocks(self.model)} transformer blocks compiled (regional torch.compile)"
            )

        strategy = self.trainer.strategy if self._trainer is not None else None
        ac = self.activation_checkpointing  # the one switch, whatever the strategy
        if isinstance(strategy, FSDP2Strategy):  # precision comes from the trainer fragment's strategy
            parallelize(self.model, self.device_mesh, ac, strategy.param_dtype, strategy.reduce_dtype)
        else:  # Lightning's ModelParallelStrategy used directly (FSDP2, bf16 defaults), or no mesh (one device, DDP)
            parallelize(self.model, self.device_mesh, ac)

    def on_fit_start(self) -> None:
        self.train()  # Lightning 2.6 keeps the mode a module comes with; the override keeps frozen parts in eval
        if self.peak_flops == "auto":
            self._peak = self.resolve_peak_flops()
        if self.trainer.is_global_zero:
            self.log_parameter_table()

    def resolve_peak_flops(self) -> float | None:
        """`peak_flops: auto` for this run's device and precision (one line logged either way)."""
        from visprior.hardware import peak_flops_for

        peak, source = peak_flops_for(self.device, self.trainer.precision, self.trainer.strategy)
        if peak is None:
            rank_zero_info(
                f"peak_flops: auto -> unknown ({source}): train/mfu not logged; set model.init_args.peak_flops"
            )
        else:
            rank_zero_info(f"peak_flops: auto -> {peak / 1e12:.3g} TFLOP/s per device ({source}); train/mfu logged")
        return peak

    def configure_optimizers(self) -> dict[str, Any]:
        groups = []
        listed = list(self.trainable)
        for comp, lr in self.trainable.items():
            decay, no_decay = [], []
            for name, p in self.model.named_parameters():
                if p.requires_grad and component_of(name, listed) == comp:
                    (decay if p.ndim >= 2 else no_decay).append(p)
            for params, wd, suffix in ((decay, self.weight_decay, ""), (no_decay, 0.0, "/no_decay")):
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": comp + suffix})
        if not groups:
            raise ValueError("trainable lists no component with parameters: nothing would train")
        optimizer = adamw(groups, betas=self.betas)
        decay_steps = self.decay_steps
        if decay_steps is None and self.trainer is not None and self.trainer.max_steps > 0:
            decay_steps = self.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: schedule_factor(s, self.warmup_steps, decay_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """A step the non-finite guard skipped trained nothing, so the schedule stays where it is too: the learning rate
        follows the steps that updated the weights (`global_step` still counts every batch)."""
        if step_skipped(self._trainer):
            return
        super().lr_scheduler_step(scheduler, metric)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm with torch directly, so it works under FSDP2 (DTensor parameters) as well."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if clip:
            if self._clip_params is None:  # listed once, not per step (clip_grad_norm_ skips parameters without grad)
                self._clip_params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(self._clip_params, clip, foreach=True)

    # ------------------------------------------------------------------------------------------------ steps

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        raise NotImplementedError

    def batch_counts(self, batch: Any) -> dict[str, int]:
        """`tokens`, `samples`, `images` of a batch for throughput and MFU; kinds of stage say what they count.

        Called on the host, before the batch moves to the device (`on_before_batch_transfer`), so reading the counts
        out never waits for the device.
        """
        return {}

    def host_counts(self, batch: Any) -> dict[str, int]:
        """The counts taken on the host before transfer, or (a batch that never went through the trainer) now."""
        if isinstance(batch, dict) and COUNTS_KEY in batch:
            return batch[COUNTS_KEY]
        return self.batch_counts(batch)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            batch[COUNTS_KEY] = self.batch_counts(batch)
        return batch

    def flops_per_token(self, batch: dict[str, Any]) -> float:
        """Model FLOPs per processed token (forward + backward); stages refine this. 0: MFU not logged."""
        return 0.0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        out = self.compute_loss(batch)
        self._supervised_total = self._supervised_total + out.supervised  # a device tensor stays one: no sync
        bs = max(out.samples, 1)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        total = self._supervised_total
        self.log("train/supervised_tokens", total.float() if torch.is_tensor(total) else float(total), batch_size=bs)
        for k, v in out.metrics.items():
            self.log(f"train/{k}", v, batch_size=bs)
        now = time.perf_counter()
        if self._last_time is None:  # the first step carries set-up (and the first compile): not measured
            self._last_time, self._window = now, [0, 0, 0.0]
        else:  # throughput over the logging window: host numbers only, logged when Lightning logs
            fpt = self.flops_per_token(batch)
            self._window = [
                self._window[0] + out.tokens,
                self._window[1] + out.samples,
                self._window[2] + fpt * out.tokens,
            ]
            if self.logs_this_step():
                dt = max(now - self._last_time, 1e-9)
                world = self.trainer.world_size if self._trainer is not None else 1
                tokens, samples, flops = self._window
                self.log("train/tokens_per_s", tokens * world / dt, batch_size=bs)
                self.log("train/samples_per_s", samples * world / dt, batch_size=bs)
                if self._peak and flops:
                    self.log("train/mfu", flops / dt / self._peak, batch_size=bs)
                m = self._measured
                self._measured = [m[0] + tokens * world, m[1] + flops, m[2] + dt]
                self._last_time, self._window = now, [0, 0, 0.0]
        loss = self.weight_across_ranks(out.loss, out.weight)
        return skip_nonfinite(self, loss, batch)  # None (a skipped step) when the loss is not finite on any rank

    def throughput(self) -> dict[str, float]:
        """Tokens/s and MFU over every logged window of this fit (the first step, with set-up and compile, is not in
        them): what the stage cache records beside a finished stage's wall time. Empty before the first window."""
        tokens, flops, seconds = self._measured
        if seconds <= 0:
            return {}
        out = {"tokens_per_s": tokens / seconds}
        if self._peak and flops:
            out["mfu"] = flops / seconds / self._peak
        return out

    def weight_across_ranks(self, loss: torch.Tensor, weight: int | torch.Tensor | None) -> torch.Tensor:
        """`loss * weight * W / sum of weights over ranks`: DDP and FSDP2 average gradients over the W ranks, so this
        makes the step's gradient that of the mean over all ranks' units (a rank with fewer supervised tokens weighs
        less), not the mean of per-rank means. One all-reduce of a scalar; the identity in one process."""
        if weight is None or self._trainer is None or self.trainer.world_size == 1:
            return loss
        if torch.is_tensor(weight):  # a copy on the loss's device: the all-reduce works in place
            mine = weight.detach().to(loss.device, torch.float32, copy=True)
        else:
            mine = torch.tensor(float(weight), device=loss.device)
        total = self.trainer.strategy.reduce(mine.clone(), reduce_op="sum")
        return loss * (mine * self.trainer.world_size / total.clamp(min=1.0))

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logs (every `log_every_n_steps`): the per-step floats (throughput, MFU)
        are logged only then, so other steps never copy a number to the device."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs

    def identity(self) -> dict[str, str]:
        """What a checkpoint of this run must match to resume it: the stage class and a digest of the model config
        (the model hyper-parameters in `MODEL_HPARAMS` without locations, and every parameter's name and shape)."""
        hparams = {k: _without_locations(plain(self.hparams[k])) for k in MODEL_HPARAMS if k in self.hparams}
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        blob = json.dumps({"hparams": hparams, "shapes": shapes}, sort_keys=True, default=str)
        stage = f"{type(self).__module__}.{type(self).__qualname__}"
        return {"stage": stage, "model": hashlib.sha256(blob.encode()).hexdigest()[:12]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visprior"] = {"supervised_tokens": int(self._supervised_total), **self.identity()}
        if self._trainer is not None:  # a resume keeps it (visprior.stage_cli)
            checkpoint["visprior"]["precision"] = self.trainer.precision

    def check_resumable(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume from a checkpoint another stage or model config wrote, naming both (before any step)."""
        saved = checkpoint.get("visprior", {})
        if "stage" not in saved:  # written before checkpoints carried their identity
            return
        now = self.identity()
        if (saved["stage"], saved.get("model")) != (now["stage"], now["model"]):
            where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise ResumeMismatch(
                f"ckpt_path: {where or 'the checkpoint'} was written by {saved['stage'].rsplit('.', 1)[-1]} "
                f"(model config {saved.get('model')}), but this run is {now['stage'].rsplit('.', 1)[-1]} (model config "
                f"{now['model']}): it is another stage's or another model's checkpoint. Give this run its own "
                f"trainer.logger.init_args.name, or take weights only with init_from"
            )
        self.check_precision(saved.get("precision"))

    def check_precision(self, saved: str | None) -> None:
        """Refuse to resume in another precision than the checkpoint's: it would silently change the run's trajectory.

        `precision: auto` never gets here with another value (the CLI keeps the checkpoint's); an explicit one does.
        """
        if saved is None or self._trainer is None:
            return
        from visprior.hardware import normalize_precision

        now = normalize_precision(self.trainer.precision)
        if normalize_precision(saved) != now:
            where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ResumeMismatch(
                f"ckpt_path: {where} was trained in precision {saved}, but this run sets trainer.precision {now}: "
                f"resume with --trainer.precision {saved} (or auto, which keeps it), or start a new run from its "
                f"weights with init_from"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint)
        self._supervised_total = checkpoint.get("visprior", {}).get("supervised_tokens", 0)
