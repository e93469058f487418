"""The data module: late binding from the model, epochs as windows on one stream, exact resume of the data position
(loader level with 0 and 2 workers, and through a Lightning checkpoint: N steps == N/2 + resume + N/2, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from visprior.data.datamodule import EpochWindowLoader, SourceSpec, VisionLanguageDataModule, source_names
from visprior.models.language import LanguageModelSpec
from visprior.stages import LanguagePretraining

TINY_LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}
TEXT = ["text/web", "text/code", "text/math"]


def text_data(root: Path, tokenizer, **kwargs) -> VisionLanguageDataModule:
    kwargs = {"batch_size": 2, "seq_len": 64, "batches_per_epoch": 3, **kwargs}
    dm = VisionLanguageDataModule([SourceSpec(str(root / s), weight=w) for s, w in zip(TEXT, (3, 1, 1))], **kwargs)
    dm.connect(tokenizer, image_transform=None, num_image_tokens=0)
    return dm


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids", "document_ids")) and (
        a["keys"] == b["keys"]
    )


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from visprior.models.language import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_continue_the_stream_and_state_resumes_exactly(toyworld_dir, tokenizer, workers):
    loader = text_data(toyworld_dir, tokenizer, num_workers=workers).train_dataloader()
    assert isinstance(loader, EpochWindowLoader) and len(loader) == 3
    epochs = [list(loader) for _ in range(2)]  # two epochs of 3 batches
    flat = [b for e in epochs for b in e]
    assert not same(flat[0], flat[3]), "the second epoch must continue the stream, not restart it"
    assert len({tuple(b["keys"]) for b in flat}) == 6

    first = text_data(toyworld_dir, tokenizer, num_workers=workers).train_dataloader()
    head = list(first)
    it = iter(first)
    head.append(next(it))  # one batch into the second epoch
    state = first.state_dict()
    resumed = text_data(toyworld_dir, tokenizer, num_workers=workers).train_dataloader()
    resumed.load_state_dict(state)
    tail = list(iter(resumed))[:2]
    for a, b in zip(head + tail, flat):
        assert same(a, b)


def test_setup_takes_tokenizer_and_image_settings_from_the_model(toyworld_dir, tokenizer_dir):
    stage = LanguagePretraining(LanguageModelSpec(config=TINY_LM, tokenizer=str(tokenizer_dir)))
    dm = VisionLanguageDataModule([SourceSpec(str(toyworld_dir / "text/web"))], batch_size=2, seq_len=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False)
    trainer.strategy.connect(stage)
    trainer.datamodule = dm
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.tokenizer is stage.tokenizer and dm.num_image_tokens == 0 and dm.image_transform is None


def test_bad_paths_and_changed_config_are_named(toyworld_dir, tokenizer):
    with pytest.raises(
        FileNotFoundError, match=r"data\.sources\[0\]\.path: 'no/such/dataset' does not exist; expected a"
    ):
        VisionLanguageDataModule([SourceSpec("no/such/dataset")])
    with pytest.raises(FileNotFoundError, match=r"data\.val_sources\[0\]\.path: '.*toyworld.*' has no manifest\.json"):
        VisionLanguageDataModule([SourceSpec(str(toyworld_dir / "pairs"))], val_sources=[SourceSpec(str(toyworld_dir))])
    dm = text_data(toyworld_dir, tokenizer)
    state = dm.state_dict()
    other = text_data(toyworld_dir, tokenizer, seq_len=128)
    with pytest.raises(ValueError, match="seq_len: checkpoint 64, now 128"):
        other.load_state_dict(state)
    assert source_names([SourceSpec("a/text/web"), SourceSpec("b/eval/text/web")]) == ["a/text/web", "eval/text/web"]
    assert source_names([SourceSpec("d/text/web"), SourceSpec("d/text/code")]) == ["web", "code"]


class LossLog(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run(
    root: Path, tokenizer_dir: Path, ckdir: Path, steps: int, workers: int, resume: str | None = None
) -> list[float]:
    pl.seed_everything(0)
    stage = LanguagePretraining(
        LanguageModelSpec(config=TINY_LM, tokenizer=str(tokenizer_dir)),
        trainable={"language_model": 1e-2},
        decay_steps=4,  # the schedule of the full run, whatever max_steps this process stops at
    )
    dm = VisionLanguageDataModule(
        [SourceSpec(str(root / s), weight=w) for s, w in zip(TEXT, (3, 1, 1))],
        batch_size=2,
        seq_len=64,
        batches_per_epoch=3,
        num_workers=workers,
    )
    log = LossLog()
    ckpt = ModelCheckpoint(dirpath=ckdir, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[log, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(stage, dm, ckpt_path=resume)
    return log.losses


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_lightning_checkpoint_is_bit_identical(toyworld_dir, tokenizer_dir, tmp_path, workers):
    """4 steps straight vs 2 steps, a new process-like Trainer resuming from last.ckpt, 2 more (epochs of 3 batches)."""
    full = run(toyworld_dir, tokenizer_dir, tmp_path / "a", 4, workers)
    half = run(toyworld_dir, tokenizer_dir, tmp_path / "b", 2, workers)
    rest = run(toyworld_dir, tokenizer_dir, tmp_path / "b", 4, workers, resume=str(tmp_path / "b" / "last.ckpt"))
    assert len(full) == 4 and len(rest) == 2
    assert half + rest == full


def test_a_stage_that_lacks_a_value_is_named_not_zeroed(toyworld_dir, tokenizer):
    """The data module takes tokenizer, image transform and image-token count from the stage with no default."""

    class NoImageCount(pl.LightningModule):
        tokenizer = None
        image_transform = None

    dm = VisionLanguageDataModule([SourceSpec(str(toyworld_dir / "text/web"))], batch_size=2, seq_len=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False)
    stage = NoImageCount()
    stage.tokenizer = tokenizer
    trainer.strategy.connect(stage)
    dm.trainer = trainer
    with pytest.raises(TypeError, match="needs `num_image_tokens` from the stage, but NoImageCount"):
        dm.setup("fit")
