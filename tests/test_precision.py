"""`precision: auto` (issue 13 §1): picked by what this machine computes fast, with the measurement injected so the test
means the same on every CPU; cached on disk; optimizer state and loss in fp32 under bf16-mixed; a resume keeps the
checkpoint's precision with `auto` and refuses an explicit other one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from visprior import hardware
from visprior.cli import main
from visprior.hardware import MatmulRates, choose_cpu_precision
from visprior.stages.base import Stage, StepOutput

FAST_BF16 = MatmulRates(fp32=100e9, bf16=500e9, threads=1, flags=("amx_bf16",))
SLOW_BF16 = MatmulRates(fp32=100e9, bf16=2e9, threads=1, flags=("avx512_bf16",))
NO_FLAGS = MatmulRates(fp32=100e9, bf16=None, threads=1)


def test_bf16_where_measured_faster_fp32_where_slower_or_emulated() -> None:
    assert choose_cpu_precision(FAST_BF16).precision == "bf16-mixed"
    assert choose_cpu_precision(SLOW_BF16).precision == "32-true"
    assert choose_cpu_precision(NO_FLAGS).precision == "32-true"
    barely = MatmulRates(fp32=100e9, bf16=110e9, threads=1, flags=("avx512_bf16",))  # autocast's casts would eat 10 %
    assert choose_cpu_precision(barely).precision == "32-true"
    assert "5.00x" in choose_cpu_precision(FAST_BF16).reason


def test_the_kept_figures_are_the_best_each_probe_has_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe beside other work reads low: it must not lower the peak MFU is taken against, a quiet one raises it."""
    monkeypatch.setenv("VISPRIOR_CACHE_DIR", str(tmp_path))
    readings = [MatmulRates(fp32=50e9, bf16=200e9, threads=1, flags=("amx_bf16",)),  # beside other runs
                MatmulRates(fp32=190e9, bf16=340e9, threads=1, flags=("amx_bf16",)),  # quiet
                MatmulRates(fp32=60e9, bf16=100e9, threads=1, flags=("amx_bf16",))]  # fmt: skip
    calls = []
    monkeypatch.setattr(hardware, "measure_cpu", lambda threads=None: calls.append(threads) or readings[len(calls) - 1])
    assert hardware.cpu_rates(1) == readings[0]
    assert hardware.cpu_rates(1) == readings[1]
    assert hardware.cpu_rates(1) == readings[1]  # the low third reading changes nothing
    assert calls == [1, 1, 1]  # every launch probes (under a second)
    cache = json.loads((tmp_path / "hardware.json").read_text())
    assert list(cache) == [hardware.probe_key(1)] and torch.__version__ in hardware.probe_key(1)
    assert cache[hardware.probe_key(1)]["bf16"] == 340e9
    monkeypatch.setattr(hardware, "measure_cpu", lambda threads=None: calls.append(threads) or FAST_BF16)
    assert hardware.cpu_rates(2) == FAST_BF16  # another thread count is another key
    assert calls == [1, 1, 1, 2]


def test_real_probe_runs_and_reads_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISPRIOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware, "PROBE_SIZE", 256)
    rates = hardware.measure_cpu(1)
    assert rates.fp32 > 0
    assert (rates.bf16 is None) == (not hardware.bf16_flags())


def test_gpu_peaks_by_device_name() -> None:
    assert hardware.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer name wins
    assert hardware.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert hardware.gpu_peak_flops("NVIDIA L40S") == 362e12
    assert hardware.gpu_peak_flops("NVIDIA GeForce GTX 1080") is None


class LinearStage(Stage):
    """One Linear component on BoringDataModule's `[B, 32]` batches; records the precision each fit ran in."""

    seen: list[dict[str, Any]] = []

    default_trainable = {"net": 1e-2}

    def __init__(self, **stage_args: Any) -> None:
        super().__init__(nn.ModuleDict({"net": nn.Linear(32, 2)}), **stage_args)

    def compute_loss(self, batch: torch.Tensor) -> StepOutput:
        out = self.model["net"](batch)  # [B, 2], bf16 under bf16-mixed autocast
        loss = out.float().pow(2).mean()
        LinearStage.seen[-1]["activation"] = out.dtype
        return StepOutput(loss=loss, tokens=batch.shape[0], samples=batch.shape[0])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        LinearStage.seen.append({"precision": self.trainer.precision})

    def on_train_end(self) -> None:
        opt = self.trainer.optimizers[0]
        LinearStage.seen[-1]["state"] = {v.dtype for s in opt.state.values() for v in s.values() if v.ndim}
        LinearStage.seen[-1]["params"] = {p.dtype for p in self.parameters()}


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    content = {
        "trainer": {
            "accelerator": "cpu",
            "precision": "auto",
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {"class_path": f"{__name__}.LinearStage"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "ckpt_path": "last",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def inject(monkeypatch: pytest.MonkeyPatch, folder: Path, rates: MatmulRates) -> None:
    """A fresh cache folder whose probe would measure `rates`."""
    monkeypatch.setenv("VISPRIOR_CACHE_DIR", str(folder))
    monkeypatch.setattr(hardware, "measure_cpu", lambda threads=None: rates)


def recorded(root: Path) -> str:
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["visprior"]["precision"]


def test_auto_through_the_cli_and_a_resume_keeps_it(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    LinearStage.seen.clear()
    inject(monkeypatch, tmp_path / "fast", FAST_BF16)
    main(["fit", "--config", str(recipe)])
    first = LinearStage.seen[-1]
    assert first["precision"] == "bf16-mixed" and first["activation"] == torch.bfloat16
    assert first["state"] == {torch.float32} and first["params"] == {torch.float32}  # AdamW moments, master weights
    assert recorded(tmp_path) == "bf16-mixed"

    inject(monkeypatch, tmp_path / "slow", SLOW_BF16)  # the same run relaunched where bf16 measures slower
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "4"])
    assert LinearStage.seen[-1]["precision"] == "bf16-mixed"  # kept from the checkpoint, not re-chosen

    with pytest.raises(SystemExit) as info:  # an explicit other precision is refused, in one line
        main(["fit", "--config", str(recipe), "--trainer.max_steps", "6", "--trainer.precision", "32-true"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained in precision bf16-mixed" in err and "--trainer.precision bf16-mixed" in err


def test_auto_fresh_run_where_bf16_is_slow_is_fp32(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    LinearStage.seen.clear()
    inject(monkeypatch, tmp_path / "slow", SLOW_BF16)
    main(["fit", "--config", str(recipe)])
    assert LinearStage.seen[-1]["precision"] == "32-true" and LinearStage.seen[-1]["activation"] == torch.float32
    assert recorded(tmp_path) == "32-true"


def test_the_cpu_fragment_asks_for_auto() -> None:
    fragment = Path(__file__).resolve().parents[1] / "recipes/_base/trainers/cpu.yaml"
    assert yaml.safe_load(fragment.read_text())["trainer"]["precision"] == "auto"
