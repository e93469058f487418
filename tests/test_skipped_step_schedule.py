"""A step the non-finite guard skips moves neither the weights nor the learning-rate schedule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from visprior.models import LanguageModelSpec, VisionTowerSpec
from visprior.stages import VisionLanguagePretraining
from visprior.stages.base import schedule_factor
from visprior.training import NonFiniteGuard

LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
TOWER = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 4, "intermediate_size": 64, "vision_use_head": False}  # fmt: skip
NAN_AT = {2, 3}


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, image_id: int, tokens: int) -> None:
        self.image_id, self.tokens = image_id, tokens

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for step in range(6):
            ids = torch.cat(
                [torch.full((2, self.tokens), self.image_id), torch.randint(10, 300, (2, 8), generator=g)], 1
            )
            pixels = torch.randn(2, 3, 32, 32, generator=g)
            if step in NAN_AT:
                pixels[0, 0, 0, 0] = float("nan")  # the stage's own forward makes the loss NaN
            t = ids.shape[1]
            yield {"input_ids": ids, "labels": ids.masked_fill(ids == self.image_id, -100), "pixel_values": pixels,
                   "position_ids": torch.arange(t).expand(2, t).clone(), "document_ids": torch.zeros(2, t, dtype=torch.long),
                   "keys": [f"b{step}-0", f"b{step}-1"]}  # fmt: skip


class LearningRates(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.epochs: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.epochs.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)


def test_a_skipped_step_does_not_advance_the_schedule(tokenizer_dir):
    torch.manual_seed(0)
    stage = VisionLanguagePretraining(
        LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=TOWER),
        trainable={"connector": 1e-2}, warmup_steps=4, decay_steps=20,
    )  # fmt: skip
    lrs = LearningRates()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[NonFiniteGuard(max_consecutive=3), lrs])  # fmt: skip
    data = Batches(stage.model.image_token_id, stage.num_image_tokens)
    trainer.fit(stage, torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 6  # every batch counts as a step
    applied = [1, 2, 2, 2, 3, 4]  # scheduler steps after each batch: batches 2 and 3 were skipped
    assert lrs.epochs == applied
    assert lrs.lrs == [1e-2 * schedule_factor(a, 4, 20, 0.1) for a in applied]  # warmup resumes where it stopped
