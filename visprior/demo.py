"""The main job (`make demo`): one recipe at toy scale, end to end on CPU, its report table printed at the end.

It is `visprior reproduce vila/text-reblend-restores-text --scale toy --seeds 1 --out runs/demo --in_process true` (each
stage the same `visprior fit` run, inside this one process): the toy world and its tokenizer are generated on first
use, then the recipe's stages (text pre-training, the tower's classification and contrastive stages, alignment, VILA's
interleaved pre-training, and the two SFT arms: visual instructions alone, or re-blended with text-only ones) and the
evaluations (few-shot VQA, the toy text QA and held-out perplexity, MLE-Bench). This recipe because its claim (text-only
SFT data keeps the text ability) is the one a toy model shows most reliably: the held-out text perplexity fell with the
re-blend on three seeds out of three (docs/toy-results.md), though one seed by default is still one draw and `--seeds 3`
gives the report's intervals. Relaunching resumes; finished stages come from the stage cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

RECIPE = "vila/text-reblend-restores-text"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visprior.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", choices=["smoke", "toy"], default="toy", help="smoke: two steps per stage, no result"
    )
    parser.add_argument("--seeds", default="1", help="how many seeds (3 = seeds 0, 1, 2) or a list (0,4,7)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="results.json, report.md, plots, run links")
    parser.add_argument("--cache", type=Path, default=None, help="the stage cache (default: runs/cache)")
    parser.add_argument("--debug", action="store_true", help="a traceback behind an error instead of one line")
    args = parser.parse_args(argv)

    from visprior import reproduce
    from visprior.cli import user_errors_as_one_line

    with user_errors_as_one_line("demo", args.debug):
        reproduce.reproduce(
            RECIPE,
            scale=args.scale,
            seeds=args.seeds,
            out=str(args.out),
            cache=str(args.cache) if args.cache else None,
            in_process=True,  # the runs and numbers of a process per stage, without nine process start-ups
        )


if __name__ == "__main__":
    main()
