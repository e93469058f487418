"""`visprior fit|validate|test|predict`: LightningCLI with the run-safety parts added once, by the CLI, to every run.

Every run gets, whatever fragments it composes (so no YAML can forget or duplicate them):
- the checkpoint callback `AtomicModelCheckpoint` (settings: the top-level `checkpoint:` group) unless the trainer has
  `enable_checkpointing: false`;
- `ExactLoaderResume`, `PreemptionCallback`, `NonFiniteGuard` (settings: `nonfinite:`), `DataHealthCallback` and
  `RNGStateCallback`;
- `LearningRateMonitor` when there is a logger;
- `AtomicCheckpointIO` (atomic writes, `weights_only=True` reads) unless a CheckpointIO plugin is given or the strategy
  writes sharded checkpoints itself (`ModelParallelStrategy`, i.e. FSDP2).
A `fit` with a logger must name its run (`trainer.logger.init_args.name`): two stages can never share a run folder, and
with `ckpt_path: last` one stage can never resume from another's checkpoint (the stages refuse that too, see
`Stage.on_load_checkpoint`).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

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
        return self._instantiate_trainer(config, [*self.run_callbacks(config), *extra])


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


def resolve_config(config_args: list[str], subcommand: str = "fit") -> dict[str, Any]:
    """The config `visprior <subcommand> <config_args>` would run: composed, parsed and validated, nothing instantiated.

    `config_args` are command-line arguments (`--config X.yaml`, `--trainer.max_steps 5`, ...); `_base_` fragments are
    expanded as the CLI does. Used by `visprior plan` and the recipe runner (whose stage cache hashes this).
    """
    import warnings

    from visprior.config import expand_config_args

    class ParseOnly(StageCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = ParseOnly(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False, "exit_on_error": False},
        args=[subcommand, *expand_config_args(list(config_args))],
    )
    return cli.config[subcommand].as_dict()
