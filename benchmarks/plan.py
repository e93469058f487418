"""Wall time of `visprior plan` at paper scale (VILA-7B: Llama-2-7B + CLIP-L/336 on the meta device), which must stay
under a minute on a CPU.

    .venv/bin/python benchmarks/plan.py --out benchmarks/results/plan.json

Runs the command in a fresh interpreter (imports included, as a user meets it) `--repeats` times from the repository root.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan.json"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cmd = [sys.executable, "-m", "visprior.cli", "plan", "recipes/_base/stages/align.yaml", "recipes/_base/stages/sft.yaml",
           "--scale", "paper", "--setup", "vila-7b", "--seq_len", "2048", "--gpus", "8", "--gpu_mem", "80"]  # fmt: skip
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    result = {
        "command": " ".join(cmd[1:]),
        "seconds": times,
        "best_s": min(times),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
