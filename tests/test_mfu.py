"""MFU by default (issue 13 §5): every stage YAML logs `train/mfu` beside `train/tokens_per_s` with no extra flag
(`peak_flops: auto`: this CPU's measured matmul rate in the run's precision), measured over the logging window, and no
step waits on the device for its counts (§4: they are taken on the host before the batch moves)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from visprior import hardware
from visprior.hardware import MatmulRates

REPO = Path(__file__).resolve().parents[1]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("name", ["text-pretrain", "classify", "contrastive", "align", "sft"])
def test_stage_yaml_logs_mfu_without_a_flag(name, toyworld_dir, tokenizer_dir, tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    os.symlink(toyworld_dir, tmp_path / "data" / "toyworld")
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    from visprior.cli import main

    smoke = [
        "--config",
        "recipes/_base/scales/smoke.yaml",
        "--trainer.max_steps",
        "5",
        "--trainer.log_every_n_steps",
        "2",
    ]
    main(["fit", "--config", f"recipes/_base/stages/{name}.yaml", *smoke, "--trainer.enable_progress_bar=false"])
    logged = scalars(tmp_path / "runs" / name / "run")
    assert logged.get("train/tokens_per_s"), sorted(logged)
    mfu = logged.get("train/mfu")
    # beside tokens/s, on every logged step (and only then: no per-step number goes to the device in between)
    assert mfu and len(mfu) == len(logged["train/tokens_per_s"]) == len(logged["train/loss"]) == 2, sorted(logged)
    assert all(0 < m < 2 for m in mfu), mfu  # a fraction of the measured peak (load on the machine only lowers it)


def test_peak_is_the_rate_of_the_runs_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISPRIOR_CACHE_DIR", str(tmp_path))
    rates = MatmulRates(fp32=100e9, bf16=400e9, threads=torch.get_num_threads(), flags=("amx_bf16",))
    monkeypatch.setattr(hardware, "measure_cpu", lambda threads=None: rates)
    cpu = torch.device("cpu")
    assert hardware.peak_flops_for(cpu, "bf16-mixed")[0] == 400e9
    assert hardware.peak_flops_for(cpu, "32-true")[0] == 100e9


def test_vlm_counts_are_taken_on_the_host_before_transfer(tokenizer_dir) -> None:
    from visprior.models.language import LanguageModelSpec
    from visprior.stages import LanguagePretraining
    from visprior.stages.base import COUNTS_KEY

    tiny = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64}  # fmt: skip
    stage = LanguagePretraining(LanguageModelSpec(config=tiny, tokenizer=str(tokenizer_dir)))
    docs = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    batch = {"input_ids": torch.full((2, 6), 5), "labels": torch.full((2, 6), 5), "document_ids": docs,
             "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])}  # fmt: skip
    batch = stage.on_before_batch_transfer(batch, 0)
    assert batch[COUNTS_KEY] == {"tokens": 11, "samples": 3, "images": 0}
    batch["document_ids"] = torch.zeros_like(docs)  # the step reads the host counts, never the (device) tensors again
    out = stage.compute_loss(batch)
    assert (out.tokens, out.samples) == (11, 3)
    assert torch.is_tensor(out.supervised)  # stays a tensor: summed on the device, read at logging intervals
