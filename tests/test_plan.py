"""`visprior plan`: paper-scale parameter counts against the released models' parts, and the memory model against what a
small model really saves and allocates on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from visprior.cli import main
from visprior.models import ConnectorSpec, LanguageModelSpec, VisionTowerSpec, VLMSpec, build_vlm
from visprior.plan import Hardware, StageConfig, activation_bytes, memory_per_gpu, meta_components, plan_stage

REPO = Path(__file__).resolve().parents[1]

# Parameter counts of the released parts, from their checkpoints (not from our presets):
LLAMA2_7B = 6_738_415_616  # meta-llama/Llama-2-7b-hf, safetensors metadata (also printed by PEFT for it)
CLIP_L14_336_TOWER = 303_507_456  # openai/clip-vit-large-patch14-336 vision model; open_clip lists 304.29M with the
#                                   1024x768 visual projection, which LLaVA / VILA do not use (304,293,888 - 786,432)
LINEAR_PROJECTOR = 1024 * 4096 + 4096  # VILA's linear projector, CLIP width -> Llama width
MLP2X_PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # LLaVA-1.5's mlp2x_gelu


@pytest.mark.parametrize("setup, projector", [("vila-7b", LINEAR_PROJECTOR), ("llava-1.5-7b", MLP2X_PROJECTOR)])
def test_paper_setup_counts_match_the_released_models(setup, projector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "plan.json"
    main(["plan", "recipes/_base/stages/sft.yaml", "--scale", "paper", "--setup", setup, "--seq_len", "2048",
          "--gpus", "8", "--gpu_mem", "80", "--json_out", str(out)])  # fmt: skip
    plan = json.loads(out.read_text())[0]
    counts = {c["name"]: c["total"] for c in plan["components"]}
    assert counts == {"vision_tower": CLIP_L14_336_TOWER, "connector": projector, "language_model": LLAMA2_7B}
    real = LLAMA2_7B + CLIP_L14_336_TOWER + projector  # VILA-7B: 7,046,121,472; LLaVA-1.5-7B: 7,062,902,784
    assert abs(plan["params"] - real) / real < 0.01
    trained = {c["name"]: c["trainable"] for c in plan["components"]}
    assert trained == {"vision_tower": 0, "connector": projector, "language_model": LLAMA2_7B}  # sft.yaml trains these
    mem = plan["memory_gib"]
    assert mem["total_checkpointed"] < mem["total"]
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "GPU-hours" in text


def test_image_tokens_longer_than_the_sequence_are_refused(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(
            ["plan", "recipes/_base/stages/sft.yaml", "--scale", "paper", "--setup", "llava-1.5-7b"]
        )  # 24 x 24 patches
    assert "576 image tokens per image do not fit in seq_len 512; pass --seq_len" in capsys.readouterr().err


LM = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "intermediate_size": 176, "max_position_embeddings": 1024, "vocab_size": 2048}  # fmt: skip
CLIP = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": 96}  # fmt: skip
SIGLIP = {**CLIP, "model_type": "siglip_vision_model", "vision_use_head": False}


def small_model(tokenizer_dir, tower, trainable, dtype):
    spec = VLMSpec(
        LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=tower), ConnectorSpec()
    )
    model = build_vlm(spec).to(dtype)
    model.requires_grad_(False)
    for name in trainable:
        getattr(model, name).requires_grad_(True)
    return model


def batch(model, b=2, s=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (b, s), generator=g)
    ids[:, 2 : 2 + model.num_image_tokens] = model.image_token_id
    return ids, ids.masked_fill(ids == model.image_token_id, -100), torch.randn(b, 3, 32, 32, generator=g).to(dtype)


def saved_activation_bytes(model, ids, labels, pv) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded (what activations cost)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels, pixel_values=pv)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tower", [CLIP, SIGLIP], ids=["clip", "siglip"])
@pytest.mark.parametrize(
    "trainable", [["connector"], ["connector", "language_model"], ["vision_tower", "connector", "language_model"]]
)
def test_activation_estimate_matches_what_a_small_model_saves_on_cpu(tokenizer_dir, tower, trainable, dtype):
    model = small_model(tokenizer_dir, tower, trainable, getattr(torch, dtype))
    ids, labels, pv = batch(model, dtype=getattr(torch, dtype))
    measured = saved_activation_bytes(model, ids, labels, pv)
    stage = StageConfig("x", "X", {"config": LM}, {"config": tower}, {"name": "mlp2x_gelu"}, dict.fromkeys(trainable, 1.0),
                        micro_batch=2, seq_len=64, param_dtype=dtype, sharding="single")  # fmt: skip
    act = activation_bytes(stage, meta_components(stage))
    assert act.layered + act.other == pytest.approx(measured, rel=0.03)


def test_weights_gradients_and_optimizer_state_match_a_real_step(tokenizer_dir):
    trainable = ["connector", "language_model"]
    model = small_model(tokenizer_dir, SIGLIP, trainable, torch.float32)
    ids, labels, pv = batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(ids, labels=labels, pixel_values=pv).loss.backward()
    opt.step()
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    stage = StageConfig("x", "X", {"config": LM}, {"config": SIGLIP}, {"name": "mlp2x_gelu"}, dict.fromkeys(trainable, 1.0),
                        micro_batch=2, seq_len=64, param_dtype="float32", sharding="single")  # fmt: skip
    mem = memory_per_gpu(stage, meta_components(stage), Hardware(gpus=1))
    assert (mem.weights, mem.gradients, mem.optimizer) == (weights, grads, state)
    sharded = memory_per_gpu(
        StageConfig(**{**stage.__dict__, "sharding": "fsdp2"}), meta_components(stage), Hardware(gpus=4)
    )
    assert sharded.weights == weights / 4 and sharded.optimizer == state / 4


def test_plan_reads_the_architecture_of_an_init_from_checkpoint(tokenizer_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    import tiny_checkpoints as tc

    src = tc.llava_hf(tmp_path, tokenizer_dir)
    from visprior.plan import stage_from_config

    config = {"model": {"class_path": "visprior.stages.InstructionTuning", "init_args": {"init_from": str(src["dir"])}},
              "data": {"init_args": {"batch_size": 2, "seq_len": 64}}, "trainer": {"max_steps": 10, "devices": 1}}  # fmt: skip
    plan = plan_stage(stage_from_config("ft", config), Hardware(gpus=1))
    counts = {c.name: c.total for c in plan.components}
    assert sum(counts.values()) == sum(p.numel() for p in src["model"].parameters())
