"""Issue 6 on the real stages: `visprior fit` on recipes/_base/stages/{align,sft}.yaml (trainer fragment with all the
robustness callbacks), smoke toy world, tiny models. Signals and kills with bit-exact resume, bad data through the real
loader, DDP with unequal shards, NaN losses, and bad configs that must fail before the first step.

Runs go through tests/scripts/stage_fit.py, which calls the CLI in a subprocess with a recording callback (per-step losses
as Python floats, sample keys, trainable-parameter checksums); the bad-config cases call the CLI in this process. The
2-worker variants are marked slow (about 55 s together on 2 cores); the rest takes about 65 s."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from visprior.training.data_health import by_reason, merge_skips

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "stage_fit.py"
N = 8

TINY = """
trainer:
  max_steps: {steps}
  val_check_interval: null
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
model:
  init_args:
    language_model:
      tokenizer: data/toyworld/tokenizer
      config: {{model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4,
               intermediate_size: 128, tie_word_embeddings: true}}
    vision_tower:
      feature_layer: -1
      config: {{model_type: siglip_vision_model, image_size: 64, patch_size: 16, hidden_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, intermediate_size: 128, vision_use_head: false}}
    warmup_steps: 2
data:
  init_args:
    batch_size: 2
    seq_len: {seq_len}
    packing: true
    batches_per_epoch: 4
    pack_buffer: 8
"""


def workdir(root: Path, toyworld: Path, steps: int = N, seq_len: int = 96) -> Path:
    """A run folder like a user's checkout: recipes/ and data/toyworld as symlinks, plus the tiny-model overrides."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    for link, target in ((root / "data" / "toyworld", toyworld), (root / "recipes", REPO / "recipes")):
        if not link.exists():
            os.symlink(target, link)
    (root / "tiny.yaml").write_text(TINY.format(steps=steps, seq_len=seq_len))
    return root


def command(stage: str, *cli: str, record: str = "rec.json", **probe: object) -> list[str]:
    own = [f"--{k.replace('_', '-')}={v}" for k, v in probe.items()]
    own = [part for item in own for part in item.split("=", 1)]
    return [
        sys.executable,
        str(SCRIPT),
        "--record",
        record,
        *own,
        "--",
        "fit",
        "--config",
        f"recipes/_base/stages/{stage}.yaml",
        "--config",
        "tiny.yaml",
        *cli,
    ]


def launch(root: Path, cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(root: Path, cmd: list[str], ok: bool = True, timeout: float = 240) -> str:
    proc = launch(root, cmd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (hang?):\n{out[-4000:]}")
    assert (proc.returncode == 0) == ok, out[-6000:]
    return out


def record(root: Path, name: str = "rec.json") -> dict:
    return json.loads((root / name).read_text())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def checkpoints(root: Path) -> list[Path]:
    return sorted((root / "runs").rglob("*.ckpt")) if (root / "runs").exists() else []


# ------------------------------------------------------------------------------------------- 1. signals, kills, resume


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_align_stage_sigterm_and_sigkill_resume_bit_exact(toyworld_dir, tokenizer_dir, tmp_path, workers):
    """Reference: 8 steps. Interrupted: SIGTERM at step 3 (saves last.ckpt at 4, exit 0); relaunch, SIGKILL at the start
    of step 7 (last checkpoint: the every-2-steps one at 6); relaunch to 8. Same command each time."""
    cli = (f"--data.init_args.num_workers={workers}",)
    ref = workdir(tmp_path / "reference", toyworld_dir)
    run(ref, command("align", *cli, ckpt_every=2))
    reference = record(ref)
    assert sorted(map(int, reference["losses"])) == list(range(N))
    assert all(isinstance(v, float) for v in reference["losses"].values())

    root = workdir(tmp_path / "interrupted", toyworld_dir)
    proc = launch(root, command("align", *cli, ckpt_every=2, record="a.json", pause_at=3))
    wait_for(root / "a.json.paused", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "preemption (SIGTERM)" in out
    a = record(root, "a.json")
    assert sorted(map(int, a["losses"])) == [0, 1, 2, 3]
    last = root / "runs/align/run/checkpoints/last.ckpt"
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == 4

    proc = launch(root, command("align", *cli, ckpt_every=2, record="b.json", pause_at=7))
    wait_for(root / "b.json.paused", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    b = record(root, "b.json")
    assert sorted(map(int, b["losses"])) == [4, 5, 6]
    assert torch.load(last, weights_only=True)["global_step"] == 6

    run(root, command("align", *cli, ckpt_every=2, record="c.json"))
    c = record(root, "c.json")
    assert sorted(map(int, c["losses"])) == [6, 7]  # step 6 trained again after the kill
    assert b["losses"]["6"] == c["losses"]["6"] == reference["losses"]["6"]
    for field in ("losses", "keys", "params"):
        merged = {**a[field], **b[field], **c[field]}
        assert merged == reference[field], field  # floats compared exactly


# ------------------------------------------------------------------------------------------- 2. bad data


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a plain tar, member by member: `edit(name, data)` returns new bytes (or the same)."""
    with tarfile.open(path) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for member, data in items:
            data = edit(member.name, data)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def member(path: Path, suffix: str, index: int = 0) -> str:
    """The name of the `index`-th member of `path` ending in `suffix`."""
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers() if m.name.endswith(suffix)][index]


def first_read_shards(dataset: Path, count: int, readers: int) -> list[Path]:
    """The shards that each of `readers` readers of pass 0 reads first, `count` per reader, in reading order."""
    from visprior.data.stream import ShardStream, Split

    stream = ShardStream(dataset, seed=0)
    firsts = [stream.plan(0, Split(r, readers))[0][:count] for r in range(readers)]
    return [Path(stream.shards[i]) for first in firsts for i in first]


def bad_datasets(toyworld: Path, out: Path) -> tuple[Path, Path]:
    """A conversation set (bad PNG, bad JSON, extra <image> mark, too long, truncated shard) and a pair set (empty text),
    one of each fault, all in the shards read first in pass 0 whether one reader or two read the set.

    4 conversation shards of 32: the faults sit in the two read first by one reader, which are also the first of each of
    two readers; 8 pair shards of 6, the empty caption in the first one read. A run that reads those shards and stays in
    pass 0 meets every fault once with 0 or 2 loader workers, so the totals are exact (`EXPECTED_SKIPS`), and the test
    checks the run's data position proves it stayed in that window.
    """
    from visprior.data.shards import iter_samples, resolve_shards, write_shards

    convs = list(iter_samples(resolve_shards(toyworld / "sft"), "conversation"))[:128]
    assert len(convs) == 128, "the smoke toy world has 128 conversations"
    write_shards(convs, out / "convs", name="convs", kind="conversation", maxcount=32)
    first, second = first_read_shards(out / "convs", 1, 2)
    assert first_read_shards(out / "convs", 2, 1) == [first, second]
    faults = {  # member -> new bytes (a function of the old)
        member(first, ".json", 0): lambda data: too_long(data),
        member(first, ".json", 1): lambda data: extra_image_mark(data),
        member(second, ".png", 0): lambda data: b"\x89PNG not really",
        member(second, ".json", 2): lambda data: b'{"conversations": [oops',
    }
    for shard in (first, second):
        rewrite_tar(shard, lambda name, data: faults[name](data) if name in faults else data)
    # truncate the first shard in its last quarter: the samples after the damage are lost, one corrupt_tar per read
    size = first.stat().st_size
    first.write_bytes(first.read_bytes()[: size * 3 // 4])

    pairs = list(iter_samples(resolve_shards(toyworld / "pairs"), "pair"))[:48]
    write_shards(pairs, out / "pairs", name="pairs", kind="pair", maxcount=6)
    (empty,) = first_read_shards(out / "pairs", 1, 1)
    assert first_read_shards(out / "pairs", 1, 2)[0] == empty  # reader 0 of two reads it first too
    rewrite_tar(empty, lambda name, data: b"" if name == member(empty, ".txt", 0) else data)
    return out / "convs", out / "pairs"


def too_long(data: bytes) -> bytes:
    meta = json.loads(data)
    meta["conversations"][1]["value"] = "red circle " * 400  # far beyond seq_len 256
    return json.dumps(meta).encode()


def extra_image_mark(data: bytes) -> bytes:
    meta = json.loads(data)
    meta["conversations"][0]["value"] = "<image>\n" + meta["conversations"][0]["value"]
    return json.dumps(meta).encode()


def stream_positions(ckpt: Path) -> dict[tuple[int, int, str], tuple[int, int, int]]:
    """(split index, split count, source) -> (pass, shard index in the pass, offset in the shard) of every reader of
    every rank, from a checkpoint's loader state (the position of the last trained batch: `ExactLoaderResume`)."""
    import torch

    found: dict[tuple[int, int, str], tuple[int, int, int]] = {}

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if "sources" in node and isinstance(node["sources"], dict) and node.get("split"):
                for name, pos in node["sources"].items():
                    found[(*node["split"], name)] = (pos["pass"], pos["shard"], pos["offset"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list | tuple):
            for value in node:
                visit(value)

    ckpt = torch.load(ckpt, weights_only=True)
    visit(ckpt.get("loader_state_per_rank") or ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"])
    return found


EXPECTED_SKIPS = {
    "convs": {"bad_image": 1, "bad_json": 1, "corrupt_tar": 1, "image_count_mismatch": 1, "too_long": 1},
    "pairs": {"empty_text": 1},
}
"""One of each fault planted, each read once (see `bad_datasets`): double counting per worker, or at tokenizing and
again at packing, shows as a 2."""


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_bad_data_is_skipped_counted_logged_and_threshold_stops(toyworld_dir, tokenizer_dir, tmp_path, workers):
    convs, pairs = bad_datasets(toyworld_dir, tmp_path / "bad")
    sources = f"[{{path: {convs}, weight: 3}}, {{path: {pairs}, weight: 1}}]"
    root = workdir(tmp_path / "skips", toyworld_dir, steps=12, seq_len=256)
    out = run(
        root,
        command(
            "sft",
            f"--data.init_args.sources={sources}",
            "--data.init_args.val_sources=null",
            "--data.init_args.max_skip_rate=0.5",
            f"--data.init_args.num_workers={workers}",
        ),
    )
    run_dir = root / "runs/sft/run"
    positions = stream_positions(run_dir / "checkpoints/last.ckpt")
    readers = max(workers, 1)
    assert len(positions) == 2 * readers, positions
    # every reader is still in pass 0 and past the shards holding its faults: each fault was read exactly once
    past = {"convs": [2 // readers] * readers, "pairs": [1] + [0] * (readers - 1)}  # shards to be past, per reader
    for (index, count, source), (pass_index, shard, _) in positions.items():
        assert count == readers and pass_index == 0 and shard >= past[source][index], positions
    saved = json.loads((run_dir / "data_skips.json").read_text())
    assert saved["when"] == "train_end" and saved["step"] == 12
    assert saved["by_source"] == EXPECTED_SKIPS, saved
    expected = set(by_reason(EXPECTED_SKIPS))
    tb = scalars(run_dir)
    for reason, count in saved["by_reason"].items():
        assert tb[f"data/skips/{reason}"][-1][1] == count, reason
    for source, reasons in saved["by_source"].items():
        for reason, count in reasons.items():
            assert tb[f"data/skips/{source}/{reason}"][-1][1] == count
    summaries = [line for line in out.splitlines() if line.startswith("data skips after epoch")]
    assert len(summaries) == 3, out[-3000:]  # 12 steps, 4 batches per epoch
    assert all(f"{reason}=" in summaries[-1] for reason in expected)
    losses = record(root)["losses"]
    assert sorted(map(int, losses)) == list(range(12)) and all(v is not None for v in losses.values())

    # the same data at the default threshold (1 %): the run stops naming the source, the worst shard and the reason
    root = workdir(tmp_path / "threshold", toyworld_dir, steps=400, seq_len=256)
    cli = (
        f"--data.init_args.sources={sources}",
        "--data.init_args.val_sources=null",
        f"--data.init_args.num_workers={workers}",
    )
    out = run(root, command("sft", *cli), ok=False)
    assert "DataQualityError" in out
    assert "> max_skip_rate 1.0%" in out and "source 'convs'" in out
    assert "worst shard " in out and "convs-00000" in out and "most common reason" in out
    saved = json.loads((root / "runs/sft/run/data_skips.json").read_text())
    assert saved["when"].startswith("exception")


# ------------------------------------------------------------------------------------------- 3. DDP, unequal shards


def break_first_image(shard: Path) -> None:
    """The shard's first sample (in file order) gets an image that does not decode."""
    first = member(shard, ".png", 0)
    rewrite_tar(shard, lambda name, data: b"\x89PNG broken" if name == first else data)


def three_shards(toyworld: Path, out: Path) -> Path:
    """80 pairs in 3 shards of 32 / 32 / 16 (rank 0 of 2 reads two shards, rank 1 one), the first sample of each broken."""
    from visprior.data.shards import iter_samples, read_manifest, resolve_shards, write_shards

    pairs = list(iter_samples(resolve_shards(toyworld / "pairs"), "pair"))[:80]
    manifest = write_shards(pairs, out, name="pairs3", kind="pair", maxcount=32)
    assert [s["num_samples"] for s in manifest["shards"]] == [32, 32, 16]
    for shard in read_manifest(out)["shards"]:
        break_first_image(out / shard["path"])
    return out


DDP_ALIGN = (
    "--trainer.devices=2",
    "--trainer.strategy=ddp",
    "--data.init_args.packing=false",  # one sample per row, in stream order
    "--data.init_args.block_size=1",  # shards read in file order: each shard's broken first sample is read on entry
)


@pytest.mark.distributed
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_ddp_two_processes_three_shards_same_steps(toyworld_dir, tokenizer_dir, tmp_path, workers):
    """3 unequal shards on 2 ranks: by shard with 0 workers (2 vs 1 shards), by sample index with 2 (4 readers > 3
    shards). The run stays in the first pass, so no sample may be trained twice, on one rank or on both; every rank's
    skips (in its batches) add up to data_skips.json, and with 0 workers each rank met exactly one broken sample."""
    pairs3 = three_shards(toyworld_dir, tmp_path / "pairs3")
    root = workdir(tmp_path / "ddp", toyworld_dir, steps=6)
    sources = f"--data.init_args.sources=[{{path: {pairs3}}}]"
    run(root, command("align", sources, *DDP_ALIGN, f"--data.init_args.num_workers={workers}"), timeout=300)
    ranks = [record(root, f"rec-rank{r}.json") for r in (0, 1)]
    for r, rec in enumerate(ranks):
        assert rec["world_size"] == 2 and rec["rank"] == r
        assert sorted(map(int, rec["losses"])) == list(range(6))
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas equal

    positions = stream_positions(root / "runs/align/run/checkpoints/last.ckpt")
    assert sorted(index for index, _, _ in positions) == list(range(2 * max(workers, 1))), positions  # both ranks
    assert all(pass_index == 0 for pass_index, _, _ in positions.values()), positions  # the run is the first pass
    keys = [[k for step in sorted(rec["keys"], key=int) for k in rec["keys"][step]] for rec in ranks]
    assert all(len(k) == 12 and len(set(k)) == 12 for k in keys), keys  # 6 steps x 2 rows, no repeat within a rank
    assert not set(keys[0]) & set(keys[1]), "the ranks read overlapping data"

    def total(recs: list[dict]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for rec in recs:
            for skips in rec["skips"].values():
                merge_skips(out, skips)
        return out

    saved = json.loads((root / "runs/align/run/data_skips.json").read_text())
    assert saved["by_source"] == total(ranks), (saved, [total([rec]) for rec in ranks])  # the file sums the ranks
    if workers == 0:  # each rank entered exactly one shard (13 of >= 16 samples read) and met its broken first sample
        assert [(shard, offset > 0) for _, shard, offset in sorted(positions.values())] == [(0, True), (0, True)]
        assert [total([rec]) for rec in ranks] == [{"pairs3": {"bad_image": 1}}] * 2


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_resume_on_the_real_stage_is_exact_on_both_ranks(toyworld_dir, tokenizer_dir, tmp_path):
    """Align under DDP: 2 steps, then the same command to 4 resumes from last.ckpt; each rank continues its own part of
    the data (Lightning writes rank 0's loader state only; ExactLoaderResume keeps every rank's) and both ranks' losses,
    keys and parameters equal the uninterrupted 4-step run."""
    pairs3 = three_shards(toyworld_dir, tmp_path / "pairs3")
    cli = (f"--data.init_args.sources=[{{path: {pairs3}}}]", *DDP_ALIGN)
    ref = workdir(tmp_path / "reference", toyworld_dir, steps=4)
    run(ref, command("align", *cli), timeout=300)
    root = workdir(tmp_path / "resumed", toyworld_dir, steps=2)
    run(root, command("align", *cli, record="a.json"), timeout=300)
    workdir(root, toyworld_dir, steps=4)  # the same run, now to 4 steps
    run(root, command("align", *cli, record="b.json"), timeout=300)
    for r in (0, 1):
        reference, a, b = (record(d, f"{name}-rank{r}.json") for d, name in ((ref, "rec"), (root, "a"), (root, "b")))
        assert sorted(map(int, a["losses"])) == [0, 1] and sorted(map(int, b["losses"])) == [2, 3]
        for field in ("losses", "keys", "params"):
            assert {**a[field], **b[field]} == reference[field], (r, field)


# ------------------------------------------------------------------------------------------- 4. NaN


def test_nan_batch_is_skipped_and_consecutive_nans_stop(toyworld_dir, tokenizer_dir, tmp_path):
    root = workdir(tmp_path / "one", toyworld_dir, steps=5)
    run(root, command("align", nan_at=2))
    rec = record(root)
    assert rec["losses"]["2"] is None and all(rec["losses"][s] is not None for s in ("0", "1", "3", "4"))
    assert rec["params"]["2"] == rec["params"]["1"]  # the NaN step moved no parameter
    assert rec["params"]["3"] != rec["params"]["2"]  # training went on
    tb = scalars(root / "runs/align/run")
    assert [v for _, v in tb["train/skipped_nonfinite"]] == [0.0, 0.0, 1.0, 1.0, 1.0]

    root = workdir(tmp_path / "many", toyworld_dir, steps=12)
    out = run(root, command("align", nan_at="2,3,4,5,6,7,8", ckpt_every=2), ok=False)
    assert "FloatingPointError: 5 consecutive non-finite steps" in out
    assert "at step 6;" in out and "batch keys: ['pair-" in out
    assert f"last good checkpoint: {root / 'runs/align/run/checkpoints/last.ckpt'}" in out, out[-3000:]
    assert sorted(map(int, record(root)["losses"])) == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------- 5. bad configs


def no_tokenizer_image(tokenizer: Path, out: Path) -> Path:
    """A copy of the toy tokenizer whose special token `<image>` is renamed `<img>` (in the vocabulary too)."""
    import shutil

    shutil.copytree(tokenizer, out)
    for path in out.glob("*.json"):
        path.write_text(path.read_text().replace('"<image>"', '"<img>"'))
    return out


BAD_CONFIGS = {
    "unknown key": (["--model.init_args.warmup_stepz=3"], ["Option 'warmup_stepz' is not accepted"]),
    "wrong type": (
        ["--model.init_args.warmup_steps=many"],
        ["model.warmup_steps: expected int, got 'many'"],
    ),
    "missing dataset": (
        ["--data.init_args.sources=[{path: data/toyworld/nope}]"],
        ["data.sources[0].path: 'data/toyworld/nope' does not exist; expected a dataset folder"],
    ),
    "missing shard": (["--data.init_args.sources=[{path: SHARDLESS}]"], ["pairs-000001.tar"]),
    "missing init_from": (
        ["--model.init_args.init_from=[{path: runs/earlier/nope.ckpt, components: [language_model]}]"],
        ["init_from: checkpoint not found: runs/earlier/nope.ckpt"],
    ),
    "missing ckpt_path": (["--ckpt_path=runs/old/nope.ckpt"], ["ckpt_path: 'runs/old/nope.ckpt' does not exist"]),
    "truncated last.ckpt": ([], ["ckpt_path: ", "last.ckpt' is not a complete checkpoint"]),
    "tokenizer without <image>": (["--model.init_args.language_model.tokenizer=NOIMAGE"], ["noimage", "<image>"]),
    "image size": (
        ["--model.init_args.vision_tower.image_size=100"],
        ["image_size 100 is not a multiple of patch_size 16"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_before_the_first_step(toyworld_dir, tokenizer_dir, tmp_path, case, monkeypatch, capfd):
    """In this process (the CLI is the same; no interpreter start per case): the error, then no step and no checkpoint."""

    root = workdir(tmp_path / "run", toyworld_dir)
    args, expected = BAD_CONFIGS[case]
    if case == "missing shard":
        import shutil

        shutil.copytree(toyworld_dir / "pairs", tmp_path / "shardless")
        (tmp_path / "shardless" / "pairs-000001.tar").unlink()
    if case == "tokenizer without <image>":
        no_tokenizer_image(tokenizer_dir, tmp_path / "noimage")
    garbage = root / "runs/align/run/checkpoints/last.ckpt"
    if case == "truncated last.ckpt":  # what a non-atomic writer leaves after a kill; `ckpt_path: last` picks it up
        garbage.parent.mkdir(parents=True)
        garbage.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 20)
    args = [
        a.replace("SHARDLESS", str(tmp_path / "shardless")).replace("NOIMAGE", str(tmp_path / "noimage")) for a in args
    ]
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    probe = json.dumps({"class_path": "stage_fit.StageProbe", "init_args": {"out": str(root / "rec.json")}})
    cmd = command("align", *args, f"--trainer.callbacks+={probe}")
    from visprior.cli import main

    with pytest.raises(SystemExit) as info:  # every one of these is a user error: one line on stderr, exit code 2
        main(cmd[cmd.index("--") + 1 :])
    captured = capfd.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert info.value.code == 2 and len(errors) == 1, captured.err[-3000:]
    for word in expected:
        assert word in errors[0], (word, errors[0])
    assert not (root / "rec.json.started").exists(), "a training step started"
    if case == "truncated last.ckpt":
        assert checkpoints(root) == [garbage] and garbage.read_bytes().startswith(b"PK\x03\x04\x00\x01")
    else:
        assert checkpoints(root) == [], checkpoints(root)
