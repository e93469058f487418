"""The `visprior` command.

`visprior fit|validate|test|predict --config X.yaml` are LightningCLI subcommands: every YAML key is a constructor argument of the
stage (`model:`), the data module (`data:`) or the Trainer (`trainer:`), validated by jsonargparse before any work starts.
Recipes may list `_base_:` fragments, applied before the file itself. Our own subcommands (`data`, `eval`) are plain
jsonargparse CLIs over typed functions, so their `--help` comes from the signatures too.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: visprior <command> [options]

Training (LightningCLI; every key is a constructor argument; `--print_config` shows the resolved config):
  fit --config X.yaml [--trainer.max_steps N ...]     train a stage (recipes/_base/stages/*.yaml)
  validate | test | predict --config X.yaml

Our own:
  data toyworld --out DIR --preset smoke|toy [--seed N]   generate the procedural toy world as WebDataset shards
  data tokenizer --data DIR --out DIR [--vocab_size N]    train the toy BPE tokenizer on a toy world's corpora
  data convert llava-json|obelics|mmc4|img2dataset|text SRC [--images DIR] --out DIR   real datasets to shards

Evaluation and hand-off (RUN_OR_CKPT: a run, a .ckpt, or a llava-hf / original LLaVA / VILA / visprior export folder):
  eval --checkpoint RUN_OR_CKPT [--tasks mle_bench,vqa,fewshot,caption,text,probe] [--data DIR] [--out DIR]
  export RUN_OR_CKPT --format hf-llava|visprior --out DIR   LlavaForConditionalGeneration folder, or visprior's own

Planning (meta device, no GPU):
  plan STAGE.yaml [STAGE.yaml ...] [--scale toy|paper] [--setup vila-7b] [--gpus N] [--gpu_mem GiB] [--mfu 0.4]

Run `visprior <command> --help` for the options of one command.
"""


def explicit_ckpt_path(argv: Sequence[str]) -> str | None:
    """The `--ckpt_path` given on the command line, if any (`last`/`best`/`hpc` are names Lightning resolves, not paths)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--ckpt_path="):
            value = arg.split("=", 1)[1]
    return None if value in (None, "null", "last", "best", "hpc", "registry") else value


def run_lightning(argv: Sequence[str]) -> None:
    """LightningCLI on `argv` (subcommand first), with `_base_` fragments expanded into repeated `--config`."""
    from lightning.pytorch.cli import LightningCLI

    from visprior.config import RecipeError, expand_config_args
    from visprior.training.validation import check_checkpoint

    try:
        args = expand_config_args(list(argv))
        if ckpt := explicit_ckpt_path(argv):
            # LightningCLI reads this file's hyper-parameters itself before any of our code sees it; a broken file must get
            # our message, not torch's advice to unpickle with weights_only=False.
            check_checkpoint(ckpt, "ckpt_path")
    except (RecipeError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"visprior: {e}") from None
    # We pass the expanded args ourselves; Lightning would warn that sys.argv is set too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        args=args,
    )


def run_data(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.data import commands

    result = CLI(commands.DATA_COMMANDS, args=list(argv), as_positional=True, prog="visprior data")
    if isinstance(result, dict):  # a converter's manifest: print what a user checks first
        keys = ("name", "num_samples", "converted", "skipped", "dropped_images")
        print(json.dumps({k: result.get(k) for k in keys}, indent=2, default=str))


def run_eval(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.eval.command import evaluate_checkpoint

    CLI(evaluate_checkpoint, args=list(argv), as_positional=False, prog="visprior eval")


def run_export(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.checkpoints import export_checkpoint

    try:
        CLI(export_checkpoint, args=list(argv), as_positional=True, prog="visprior export")
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # CheckpointFormatError is a ValueError
        raise SystemExit(f"visprior export: {e}") from None


def run_plan(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.plan import plan_command

    rest = list(argv)
    configs = []
    while rest and not rest[0].startswith("-"):  # the stage YAMLs, in order, before the options
        configs.append(rest.pop(0))
    args = [json.dumps(configs), *rest] if configs else rest
    try:
        CLI(plan_command, args=args, as_positional=True, prog="visprior plan")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"visprior plan: {e}") from None


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "data": run_data,
    "eval": run_eval,
    "export": run_export,
    "plan": run_plan,
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        run_lightning(argv)
    elif command in COMMANDS:
        COMMANDS[command](rest)
    else:
        raise SystemExit(f"visprior: unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
