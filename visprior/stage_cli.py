"""`visprior fit|validate|test|predict`: LightningCLI with the run-safety parts added once, by the CLI, to every run.

Every run gets, whatever fragments it composes (so no YAML can forget or duplicate them):
- the checkpoint callback `AtomicModelCheckpoint` (settings: the top-level `checkpoint:` group) unless the trainer has
  `enable_checkpointing: false`;
- `ExactLoaderResume`, `PreemptionCallback`, `NonFiniteGuard` (settings: `nonfinite:`), `DataHealthCallback` and
  `RNGStateCallback`;
- `LearningRateMonitor` when there is a logger;
- a progress bar redrawn every `log_every_n_steps` (not every step: a redraw reads the loss back from the device);
- `AtomicCheckpointIO` (atomic writes, `weights_only=True` reads) unless a CheckpointIO plugin is given or the strategy
  writes sharded checkpoints itself (`ModelParallelStrategy`, i.e. FSDP2).
`trainer.precision: auto` (the CPU trainer fragment's) is resolved here, before the Trainer is built, by what the
machine computes fast (`visprior.hardware.resolve_precision`), and logged in one line. A resumed run keeps the precision
its checkpoint recorded: with `auto` the checkpoint's is taken (and logged); an explicit other value is refused by the
stage when the checkpoint loads (`Stage.check_resumable`), since a mid-run change of precision changes the trajectory.

A `fit` with a logger must name its run (`trainer.logger.init_args.name`): two stages can never share a run folder, and
with `ckpt_path: last` one stage can never resume from another's checkpoint (the stages refuse that too, see
`Stage.on_load_checkpoint`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from visprior import hardware
from visprior.training import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    DataHealthCallback,
    ExactLoaderResume,
    NonFiniteGuard,
    PreemptionCallback,
    RNGStateCallback,
)


class RunConfigError(ValueError):
    """A run whose settings are inconsistent, found before any work starts."""


class StageCLI(LightningCLI):
    """LightningCLI for visprior stages; see the module docstring for what it adds to every run."""

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """As LightningCLI's, with `trainer.precision` also taking `auto` (Lightning itself does not)."""
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip={"precision"}
        )
        parser.add_argument(
            "--trainer.precision",
            type=_PRECISION_INPUT | Literal["auto"] | None,
            default=None,
            help="Lightning's precision, or auto: bf16-mixed where this machine runs bf16 fast, else 32-true "
            "(visprior.hardware)",
        )
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        required = self.datamodule_class is not None
        parser.add_lightning_class_args(
            self._datamodule_class, "data", subclass_mode=self.subclass_mode_data, required=required
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(AtomicModelCheckpoint, "checkpoint", instantiate=False, fail_untyped=False)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_class_arguments(NonFiniteGuard, "nonfinite", instantiate=False)

    def run_callbacks(self, trainer_config: dict[str, Any]) -> list[Callback]:
        """The callbacks every run gets, in the order they must run at each hook."""
        callbacks: list[Callback] = []
        if trainer_config.get("enable_checkpointing", True) is not False:
            callbacks.append(AtomicModelCheckpoint(**self._group("checkpoint")))
        if trainer_config.get("logger") not in (None, False, []):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        given = trainer_config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if trainer_config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):  # the bar reads the loss back from the device when it redraws: only as often as the logs are written
            callbacks.append(TQDMProgressBar(refresh_rate=int(trainer_config.get("log_every_n_steps") or 50)))
        callbacks += [
            ExactLoaderResume(),  # checkpoint the data position of the batch in training
            PreemptionCallback(),  # SIGTERM / SIGUSR1: save a resumable checkpoint, exit cleanly
            NonFiniteGuard(**self._group("nonfinite")),  # skip non-finite steps; stop after N in a row
            DataHealthCallback(),  # skip counts per source and reason: tensorboard + run dir
            RNGStateCallback(),  # every rank's RNG state in the checkpoint, put back on resume
        ]
        return callbacks

    def _group(self, name: str) -> dict[str, Any]:
        group = self._get(self.config, name) or {}
        return dict(group.as_dict() if hasattr(group, "as_dict") else group)

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            check_run_name(self._get(self.config, "trainer").get("logger"))

    def instantiate_trainer(self, **kwargs: Any):
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        shards_itself = isinstance(config.get("strategy"), ModelParallelStrategy)
        if not shards_itself and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins or None
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]

        def build(precision: Any) -> Trainer:
            callbacks = config.get("callbacks")  # copied: _instantiate_trainer extends the list it is given
            own = {"precision": precision, "callbacks": list(callbacks) if isinstance(callbacks, list) else callbacks}
            return self._instantiate_trainer({**config, **own}, [*self.run_callbacks(config), *extra])

        if config.get("precision") != hardware.AUTO:
            return build(config.get("precision"))
        choice = hardware.resolve_precision(config.get("accelerator", "auto"), config.get("strategy"))
        trainer = build(choice.precision)
        ckpt = resume_checkpoint(trainer, self._get(self.config, "ckpt_path")) if self.subcommand == "fit" else None
        recorded = recorded_precision(ckpt) if ckpt is not None else None
        if recorded is not None and recorded != trainer.precision:
            choice = hardware.PrecisionChoice(recorded, f"kept from {ckpt}, which it was trained in")
            trainer = build(recorded)
        rank_zero_info(f"precision: auto -> {choice.precision} ({choice.reason})")
        return trainer


def resume_checkpoint(trainer: Trainer, ckpt_path: str | None) -> Path | None:
    """The checkpoint `trainer.fit(ckpt_path=...)` will resume, found as Lightning finds it (`last`: the newest `last*.ckpt`
    in the checkpoint callbacks' folders); None when it starts fresh."""
    if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path) if Path(ckpt_path).exists() else None
    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)  # what Lightning's own "last" resolution calls
    existing = [Path(p) for p in found if Path(p).exists()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def recorded_precision(ckpt: Path) -> str | None:
    """The precision a visprior checkpoint was trained in (`checkpoint["visprior"]["precision"]`), None if not recorded.

    A sharded FSDP2 checkpoint (a folder) keeps it in the folder's `meta.pt`; a file is read memory-mapped, so no
    weights are loaded to find it.
    """
    path = ckpt / _METADATA_FILENAME if ckpt.is_dir() else ckpt
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=not ckpt.is_dir())
    except Exception:  # an unreadable checkpoint gets its own error from the resume itself, naming the file
        return None
    value = checkpoint.get("visprior", {}).get("precision") if isinstance(checkpoint, dict) else None
    return hardware.normalize_precision(value) if value is not None else None


def check_run_name(logger: Any) -> None:
    """A logger that writes a run folder must be named by the stage (or the command line): no shared default folder.

    `logger` is the parsed (not yet instantiated) `trainer.logger`: a bool, None, or class specs with `init_args`.
    """
    loggers = logger if isinstance(logger, list | tuple) else [logger]
    for lg in loggers:
        if lg is None or isinstance(lg, bool):
            continue
        init_args = lg.get("init_args") or {}
        if "name" in init_args and not init_args.get("name"):
            raise RunConfigError(
                "trainer.logger.init_args.name is not set: every stage names its run (its folder under "
                f"{init_args.get('save_dir')}); set it in the stage YAML or pass --trainer.logger.init_args.name NAME"
            )


class _ParseOnly(StageCLI):
    """StageCLI that parses and validates, then stops: no classes instantiated, no subcommand run."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_only(args: list[str]) -> StageCLI:
    """The CLI `visprior <args>` would build, stopped after parsing; `.parser` parses further argument lists."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return _ParseOnly(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False, "exit_on_error": False},
        args=args,
    )


def resolve_config(config_args: list[str], subcommand: str = "fit") -> dict[str, Any]:
    """The config `visprior <subcommand> <config_args>` would run: composed, parsed and validated, nothing instantiated.

    `config_args` are command-line arguments (`--config X.yaml`, `--trainer.max_steps 5`, ...); `_base_` fragments are
    expanded as the CLI does. Used by `visprior plan` and the recipe runner (whose stage cache hashes this).
    """
    from visprior.config import expand_config_args

    cli = parse_only([subcommand, *expand_config_args(list(config_args))])
    return cli.config[subcommand].as_dict()
