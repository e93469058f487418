"""Loading a VLM stage checkpoint for evaluation, and the demo's evaluation step."""

from __future__ import annotations

import pytest
import torch

from visprior.eval.demo_report import evaluate_demo
from visprior.eval.load import load_vlm, resolve_checkpoint


@pytest.fixture(scope="module")
def stage_ckpt(tokenizer_dir, tmp_path_factory):
    from visprior.models.connectors import ConnectorSpec
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.stages.vision_language import VisionLanguagePretraining

    torch.manual_seed(0)
    lm = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 512}  # fmt: skip
    tower = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vision_use_head": False}  # fmt: skip
    stage = VisionLanguagePretraining(
        LanguageModelSpec(config=lm, tokenizer=str(tokenizer_dir)),
        VisionTowerSpec(config=tower),
        ConnectorSpec("mlp2x_gelu", 4),
    )
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    path = run / "checkpoints" / "last.ckpt"
    # the two entries Lightning's checkpoint holds that loading needs
    torch.save({"hyper_parameters": dict(stage.hparams), "state_dict": stage.state_dict()}, path)
    return stage, run, path


def test_loaded_model_equals_the_stage_model(stage_ckpt):
    stage, run, path = stage_ckpt
    assert resolve_checkpoint(run) == path
    model = load_vlm(run)
    ids = torch.tensor([[model.image_token_id] * 4 + [5, 6, 7]])
    pv = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = stage.model.eval().language_model(inputs_embeds=stage.model.embed(ids, pv)).logits
        got = model.language_model(inputs_embeds=model.embed(ids, pv)).logits
    assert torch.equal(want, got)


def test_missing_weights_are_an_error(stage_ckpt, tmp_path):
    stage, _, path = stage_ckpt
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "connector" not in k}
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="lacks"):
        load_vlm(tmp_path / "broken.ckpt")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path)


def test_evaluate_demo_prints_the_mle_table(stage_ckpt, toyworld_dir, tmp_path, capsys):
    _, _, path = stage_ckpt
    out = evaluate_demo(path, toyworld_dir, tmp_path, limit=3)
    assert out == tmp_path / "results.json" and out.exists()
    printed = capsys.readouterr().out
    assert "| MLE-Bench | small | medium | large | average |" in printed and "| likelihood |" in printed


def test_visprior_eval_command_writes_results(stage_ckpt, toyworld_dir, tmp_path, capsys):
    import json

    from visprior.cli import main

    _, run, _ = stage_ckpt
    main(["eval", "--checkpoint", str(run), "--tasks", "mle_bench,vqa", "--limit", "2",
          "--data", str(toyworld_dir), "--out", str(tmp_path)])  # fmt: skip
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["tasks"]) == {"mle_bench", "vqa"}
    assert "MLE-Bench" in capsys.readouterr().out


def test_visprior_eval_runs_the_shots_asked_for(stage_ckpt, toyworld_dir, tmp_path, capsys):
    import json

    from visprior.cli import main

    _, run, _ = stage_ckpt
    main(["eval", "--checkpoint", str(run), "--tasks", "fewshot", "--shots", "0,2", "--limit", "2",
          "--data", str(toyworld_dir), "--out", str(tmp_path)])  # fmt: skip
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["tasks"]["fewshot"]["metrics"]) == {"0-shot", "2-shot"}
    with pytest.raises(SystemExit, match=r"--shots '0,four' is not a comma-separated list of integers"):
        main(["eval", "--checkpoint", str(run), "--tasks", "fewshot", "--shots", "0,four"])


def test_visprior_eval_refuses_an_unknown_task_before_loading(tmp_path, capsys):
    from visprior.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "nowhere.ckpt"), "--tasks", "mle_bench,vqq"])
    assert "unknown evaluation task(s) ['vqq']" in capsys.readouterr().err  # one line, before any loading
