"""`visprior eval`: load a VLM stage's checkpoint (or run directory), run the chosen tasks, print the tables, write results.json."""

from __future__ import annotations

from pathlib import Path

from visprior.eval.load import load_vlm, resolve_checkpoint
from visprior.eval.mle_bench import format_mle_table
from visprior.eval.results import format_table
from visprior.eval.runner import EvalOptions, evaluate, parse_tasks


def evaluate_checkpoint(
    checkpoint: str,
    tasks: str = "mle_bench,vqa,fewshot,caption,text",
    data: str = "data/toyworld",
    out: str | None = None,
    limit: int | dict[str, int] | None = None,
    mle_bench: str | None = None,
    batch_size: int = 8,
    shots: str = "0,4,8",
    seed: int = 0,
    model_name: str | None = None,
    vision_tower: str | None = None,
    vqa_blind: bool = False,
) -> Path:
    """Evaluate a checkpoint on the toy world's evaluation sets (or a local MLE-Bench copy) and write `results.json`.

    Args:
        checkpoint: a VLM stage's `.ckpt` or run directory (`<run>/checkpoints/last.ckpt` is taken), or a released or
            exported folder: llava-hf, original LLaVA, VILA, `visprior export` (default --out: runs/eval/<folder name>).
        tasks: comma-separated: mle_bench, vqa, fewshot, caption, text, probe.
        data: toy world folder holding `eval/`.
        out: folder for results.json; default `<run directory>/eval`.
        limit: at most this many items per task, or per task by name (`'{fewshot: 400, mle_bench: 300}'`; the tasks
            not named read all their items).
        mle_bench: a local MLE-Bench copy (imagefolder + metadata.jsonl, parquet files, or a save_to_disk folder).
        batch_size: prompts per generation batch.
        shots: comma-separated in-context example counts for `fewshot`.
        seed: for sampled shots and bootstrap intervals.
        model_name: name recorded in results.json; default the checkpoint path.
        vision_tower: local tower folder for an original LLaVA checkpoint whose mm_vision_tower is a hub id.
        vqa_blind: also score `vqa` with grey images (`vqa/blind/*`), the control for a language prior.
    """
    names = parse_tasks(tasks)  # a typo fails before the model is loaded
    if isinstance(limit, dict) and not set(limit) <= set(names):
        raise SystemExit(
            f"visprior eval: --limit names {sorted(set(limit) - set(names))}, not among --tasks {','.join(names)}"
        )
    try:
        shot_counts = tuple(int(k) for k in str(shots).split(","))
    except ValueError:
        raise SystemExit(
            f"visprior eval: --shots {shots!r} is not a comma-separated list of integers (e.g. 0,4,8)"
        ) from None
    if any(k < 0 for k in shot_counts):
        raise SystemExit(f"visprior eval: --shots {shots!r} has a negative count")
    try:
        ckpt = resolve_checkpoint(checkpoint)
        default_out = ckpt.parent.parent / "eval"
    except FileNotFoundError:  # a released / exported folder: never write into it
        ckpt = Path(checkpoint)
        default_out = Path("runs") / "eval" / ckpt.resolve().name
    out_dir = Path(out) if out else default_out
    model = load_vlm(ckpt, vision_tower=vision_tower)
    options = EvalOptions(limit=limit, batch_size=batch_size, seed=seed, shots=shot_counts, mle_bench_path=mle_bench,
                          vqa_blind=vqa_blind)  # fmt: skip
    doc = evaluate(
        model, names, data, out_dir, model_name=model_name or str(ckpt), checkpoint=str(ckpt), options=options
    )
    if "mle_bench" in doc["tasks"]:
        print("\nMLE-Bench, accuracy %:\n" + format_mle_table(doc))
    others = [t for t in doc["tasks"] if t != "mle_bench"]
    if others:
        print("\n" + format_table(doc, tasks=others))
    results = out_dir / "results.json"
    print(f"\nresults: {results}")
    return results
