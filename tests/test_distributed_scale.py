"""At scale, on 2 CPU processes (gloo): mixed image / text-only batches under DDP and FSDP2 with a trainable tower and
connector; FSDP2 sharded checkpoints that a different process count resumes (2 -> 1, 1 -> 2) on the uninterrupted run's
trajectory, and that a kill mid-save cannot corrupt; FSDP2's real bf16 parameter policy; the stage's activation
checkpointing under FSDP2. Every run is tests/scripts/dist_scale.py in a fresh process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "dist_scale.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run(tokenizer_dir: Path, out: Path, *args: str, expect_kill: bool = False) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--tokenizer", str(tokenizer_dir), "--out", str(out), *args]
    # its own session, so a SIGKILL of the run's process group cannot reach pytest
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out.with_suffix(".weights.pt"), weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_rank_without_images_does_not_hang_or_error(strategy, tokenizer_dir, tmp_path):
    """Rank 1's batches 1 and 2 have no image while rank 0's do; tower, connector and LM all train."""
    out = run(tokenizer_dir, tmp_path / "mixed.json", "--mode", "mixed", "--strategy", strategy)
    assert out["global_step"] == 4 and all(torch.isfinite(torch.tensor(out["losses"])))
    sums = [r["checksum"] for r in out["ranks"]]
    assert sums[0] == sums[1]  # the ranks hold the same model after every step's gradient sync


@pytest.fixture(scope="module")
def reference(tokenizer_dir, tmp_path_factory) -> tuple[dict, Path]:
    """Six uninterrupted FSDP2 steps on 2 processes."""
    d = tmp_path_factory.mktemp("reference")
    return run(
        tokenizer_dir, d / "ref.json", "--mode", "train", "--devices", "2", "--steps", "6", "--dir", str(d / "ckpt")
    ), d / "ref.json"


@pytest.mark.parametrize("save, load", [(2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_with_another_process_count(save, load, reference, tokenizer_dir, tmp_path):
    ref, ref_out = reference
    ckpt = tmp_path / "ckpt"
    first = run(tokenizer_dir, tmp_path / "a.json", "--mode", "train", "--devices", str(save), "--steps", "4",
                "--dir", str(ckpt), *(["--activation_checkpointing"] if save == 1 else []))  # fmt: skip
    assert first["losses"] == pytest.approx(ref["losses"][:4], abs=1e-5)
    if save == 1:  # the stage's switch reaches every LM and tower block under FSDP2, and changes no number
        assert first["checkpointed_blocks"] == first["blocks"] == 5
    link = ckpt / "last.ckpt"
    assert link.is_symlink() and (link / ".metadata").is_file() and (link / "meta.pt").is_file()
    resumed = run(tokenizer_dir, tmp_path / "b.json", "--mode", "train", "--devices", str(load), "--steps", "6",
                  "--dir", str(ckpt), "--resume", str(link))  # fmt: skip
    assert resumed["world_size"] == load and resumed["global_step"] == 6
    assert resumed["losses"] == pytest.approx(
        ref["losses"][4:], abs=1e-5
    )  # optimizer state and data position came back
    assert max_diff(weights(tmp_path / "b.json"), weights(ref_out)) < 1e-4
    assert sorted(p.name for p in ckpt.iterdir())[0] == "last.ckpt" and len(list(ckpt.iterdir())) == 2  # link + target


def test_kill_while_saving_leaves_the_previous_checkpoint(reference, tokenizer_dir, tmp_path):
    ref, _ = reference
    ckpt = tmp_path / "ckpt"
    run(tokenizer_dir, tmp_path / "k.json", "--mode", "train", "--devices", "2", "--steps", "6", "--dir", str(ckpt),
        "--kill_at_save", "2", expect_kill=True)  # fmt: skip
    assert list(ckpt.glob("last.ckpt.tmp-*")), "the killed save's partial folder"
    meta = torch.load(ckpt / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2  # the previous, complete checkpoint
    resumed = run(tokenizer_dir, tmp_path / "r.json", "--mode", "train", "--devices", "2", "--steps", "6",
                  "--dir", str(ckpt), "--resume", str(ckpt / "last.ckpt"))  # fmt: skip
    assert resumed["losses"] == pytest.approx(ref["losses"][2:], abs=1e-5)
    assert not list(ckpt.glob("last.ckpt.tmp-*")), "the next save removed the stale partial folder"


def test_kill_while_saving_in_place_corrupts_silently(reference, tokenizer_dir, tmp_path):
    """Why the save is atomic: Lightning's stock save writes the new shards over the old folder, and a kill before its
    `meta.pt` leaves step-4 weights under step-2 loop state, which loads without any error."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = tmp_path / "ckpt"
    run(tokenizer_dir, tmp_path / "n.json", "--mode", "train", "--devices", "2", "--steps", "6", "--dir", str(ckpt),
        "--kill_at_save", "2", "--naive", expect_kill=True)  # fmt: skip
    assert torch.load(ckpt / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2
    dcp_to_torch_save(ckpt / "last.ckpt", tmp_path / "flat.pt")
    flat = torch.load(tmp_path / "flat.pt", weights_only=True)["state_dict"]  # the LightningModule's keys: model.<...>
    shards = {k.removeprefix("model."): v for k, v in flat.items()}
    step4 = run(
        tokenizer_dir,
        tmp_path / "a.json",
        "--mode",
        "train",
        "--devices",
        "2",
        "--steps",
        "4",
        "--dir",
        str(tmp_path / "x"),
    )
    assert step4["global_step"] == 4
    assert max_diff({k: v.float() for k, v in shards.items()}, weights(tmp_path / "a.json")) == 0.0  # step-4 weights


def test_fsdp2_bf16_parameter_policy_runs(reference, tokenizer_dir, tmp_path):
    ref, _ = reference
    out = run(tokenizer_dir, tmp_path / "bf.json", "--mode", "train", "--devices", "2", "--steps", "4",
              "--dir", str(tmp_path / "ckpt"), "--param_dtype", "bfloat16")  # fmt: skip
    assert out["compute_dtypes"] == ["torch.bfloat16"]  # the LM's matmuls ran in bf16
    assert out["param_dtypes"] == ["torch.float32"]  # sharded master weights (and AdamW state) stay fp32
    assert out["losses"] == pytest.approx(ref["losses"][:4], abs=5e-3)  # bf16 rounding, same trajectory
    assert out["losses"] != ref["losses"][:4]


def test_plan_memory_matches_the_fsdp2_shards_each_rank_holds(reference):
    """`visprior plan`'s weights and AdamW state per GPU against what each of the 2 ranks really holds after training."""
    from visprior.plan import Hardware, StageConfig, memory_per_gpu, meta_components

    sys.path.insert(0, str(SCRIPT.parent))
    import dist_scale

    ref, _ = reference
    stage = StageConfig("x", "X", {"config": {**dist_scale.LM, "vocab_size": ref["vocab_size"]}},
                        {"config": dist_scale.TOWER, "feature_layer": -2}, {"name": "mlp2x_gelu"},
                        dict.fromkeys(["vision_tower", "connector", "language_model"], 1.0), param_dtype="float32")  # fmt: skip
    mem = memory_per_gpu(stage, meta_components(stage), Hardware(gpus=2))
    for rank in ref["ranks"]:  # FSDP2 pads each shard to equal sizes: within 2 %
        assert rank["param_bytes"] == pytest.approx(mem.weights, rel=0.02)
        assert rank["optimizer_bytes"] == pytest.approx(mem.optimizer, rel=0.02)
