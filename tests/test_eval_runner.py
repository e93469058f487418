"""The runner on the smoke toy world: every task with the real VisionLanguageModel, results.json, and the training callback."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from visprior.eval.mle_bench import format_mle_table
from visprior.eval.results import format_table
from visprior.eval.runner import TASKS, EvalOptions, EvaluationCallback, evaluate, parse_tasks


@pytest.fixture(scope="module")
def vlm(tokenizer_dir):
    from visprior.models.connectors import ConnectorSpec
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.models.vlm import VLMSpec, build_vlm

    torch.manual_seed(0)
    lm = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 2048}  # fmt: skip
    tower = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vision_use_head": False}  # fmt: skip
    spec = VLMSpec(
        LanguageModelSpec(config=lm, tokenizer=str(tokenizer_dir)),
        VisionTowerSpec(config=tower),
        ConnectorSpec("mlp2x_gelu", 4),
    )
    return build_vlm(spec).eval()


def test_parse_tasks():
    assert parse_tasks("mle_bench, vqa") == ["mle_bench", "vqa"]
    with pytest.raises(ValueError, match="unknown"):
        parse_tasks("mle_bench,imagenet")


def test_every_task_writes_one_results_json(vlm, toyworld_dir, tmp_path):
    doc = evaluate(
        vlm, list(TASKS), toyworld_dir, tmp_path, model_name="tiny", options=EvalOptions(limit=3, shots=(0, 2))
    )
    back = json.loads((tmp_path / "results.json").read_text())
    assert back == json.loads(json.dumps(doc))
    assert set(back["tasks"]) == set(TASKS) and back["model"] == "tiny" and back["seed"] == 0
    mle = back["tasks"]["mle_bench"]
    assert mle["dataset"]["count"] == 3 and len(mle["dataset"]["sha256"]) == 64
    assert {"gen/small", "gen/medium", "gen/large", "gen/average", "ll/average"} <= set(mle["metrics"])
    assert set(back["tasks"]["fewshot"]["metrics"]) == {"0-shot", "2-shot"}
    for body in back["tasks"].values():
        for m in body["metrics"].values():
            assert m["n"] > 0 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert "| mle_bench | gen/average |" in format_table(back)
    table = format_mle_table(back).splitlines()
    assert table[0] == "| MLE-Bench | small | medium | large | average |" and len(table) == 10
    assert table[2].startswith("| letter (greedy, lmms-eval rules) | ") and table[4].startswith("| likelihood | ")
    assert table[3].startswith("| letter (greedy, strict rules) | ")
    assert table[5].startswith("| letter likelihood | ") and table[8].startswith("| blind likelihood (grey image) | ")
    assert {"gen_strict/average", "blind/gen_strict/average"} <= set(mle["metrics"])
    assert "gen" in mle["extra"]["scoring"]
    assert {"blind/ll/small", "blind/ll/medium", "blind/ll/large", "blind/ll/average"} <= set(mle["metrics"])


class _Stage(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def test_evaluate_restores_each_module_mode(vlm, toyworld_dir):
    vlm.train()
    vlm.vision_tower.eval()  # a frozen component, as the stages leave it
    evaluate(vlm, "vqa", toyworld_dir, options=EvalOptions(limit=1))
    assert vlm.language_model.training and not vlm.vision_tower.training
    vlm.eval()


def test_callback_logs_every_n_steps(vlm, toyworld_dir, tmp_path):
    logged: list[tuple[int, dict]] = []

    class Capture(L.pytorch.loggers.Logger):
        name, version = "capture", 0

        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    cb = EvaluationCallback("vqa", str(toyworld_dir), every_n_steps=2, limit=2)
    trainer = L.Trainer(max_steps=4, logger=Capture(), callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(_Stage(vlm), train_dataloaders=torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1))
    steps = [s for s, m in logged if "eval/vqa/all" in m]
    assert steps == [2, 4]


def test_a_limit_per_task_caps_the_named_tasks_only(vlm, toyworld_dir, tmp_path):
    doc = evaluate(vlm, ["mle_bench", "vqa"], toyworld_dir, tmp_path, options=EvalOptions(limit={"mle_bench": 6}))
    assert doc["tasks"]["mle_bench"]["dataset"]["count"] == 6
    assert doc["tasks"]["vqa"]["dataset"]["count"] == 160  # every item of the smoke world's eval/vqa
