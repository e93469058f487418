"""Tiny checkpoints in the exact layouts users download, written with `save_pretrained` (plus the files each layout adds).

- `hf_pair`: an HF causal-LM folder (Llama, tokenizer without `<image>`) and an HF CLIP vision folder with its processor.
- `llava_hf`: a `LlavaForConditionalGeneration` folder with tokenizer and `LlavaProcessor`; `pickled=True` rewrites the weights
  as transformers-4-era sharded `pytorch_model-*.bin` files with `vision_tower.vision_model.*` names and an index.
- `original_llava`: haotian-liu/LLaVA's layout: a Llama folder whose config adds `mm_*` keys and whose pickled state dict adds
  `model.mm_projector.*`; the tower is named by hub id and lives in a sibling folder named like the hub id's last part.
- `vila`: NVlabs/VILA's layout: `llm/`, `vision_tower/` (SigLIP), `mm_projector/` (`v2l_projector`, `layers.*`), root config.

Every builder returns the pieces it saved, so tests can recompose LLaVA's forward pass by hand (`reference_logits`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "max_position_embeddings": 1024}  # fmt: skip
TOWER = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4}  # fmt: skip
PATCHES = (TOWER["image_size"] // TOWER["patch_size"]) ** 2  # 16
HUB_TOWER = "openai/clip-vit-tiny-patch8-32"  # what mm_vision_tower says; never downloaded


def llama_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama's special tokens and no `<image>` (as LLaMA / Vicuna tokenizers ship).

    It also has ChatML's `<|im_start|>` / `<|im_end|>` (as Qwen2-based LLaVA / VILA releases do), because the toy SFT data is
    ChatML and the data module has no LLaVA-v1 (`USER: ... ASSISTANT:`) chat format.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["a red circle on a blue square", "what shape is in the image", "the answer is a triangle",
            "USER: describe the picture ASSISTANT: a small green star", "yes no left right top bottom"] * 20  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.save_pretrained(out)
    return fast


def llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **LM)).eval()


def clip_tower(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()


def mlp_projector(seed: int, dim: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(TOWER["hidden_size"], dim), nn.GELU(), nn.Linear(dim, dim)).eval()


def hf_pair(root: Path) -> dict:
    """An HF LM folder and an HF CLIP folder: the LLaVA / VILA / LSBS starting point (connector trained from scratch)."""
    lm_dir, tower_dir = root / "llama", root / "clip"
    tok = llama_tokenizer(lm_dir)
    lm = llama(len(tok), 1)
    lm.save_pretrained(lm_dir)
    tower = clip_tower(2)
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)
    return {"lm_dir": lm_dir, "tower_dir": tower_dir, "lm": lm, "tower": tower, "tokenizer": tok}


def llava_hf(
    root: Path, toy_tokenizer: Path, strategy: str = "default", act: str = "gelu", pickled: bool = False
) -> dict:
    """A llava-hf folder; the vocabulary is padded past the tokenizer, as llava-1.5's (32064 rows, 32002 tokens)."""
    out = root / ("llava-hf-bin" if pickled else f"llava-hf-{strategy}-{act}")
    tok = AutoTokenizer.from_pretrained(toy_tokenizer)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(tok) + 6,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **LM,
        ).to_dict(),  # fmt: skip
        vision_config=CLIPVisionConfig(**TOWER).to_dict(),
        image_token_index=image_id,
        image_seq_length=PATCHES if strategy == "default" else PATCHES + 1,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
        projector_hidden_act=act,
    )
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
    )  # fmt: skip
    processor.save_pretrained(out)
    if pickled:
        to_legacy_bin(out)
    return {"dir": out, "model": model, "image_id": image_id}


def to_legacy_bin(folder: Path) -> None:
    """Rewrite a llava-hf folder's weights as transformers-4 releases shipped them: two pickled shards plus an index."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    legacy = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        legacy[key] = value
    names = sorted(legacy)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: legacy[k].clone() for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def original_llava(root: Path, tower_weights_inside: bool = False) -> dict:
    """haotian-liu/LLaVA-1.5's layout; the tower folder sits beside it under the hub id's last name part."""
    out, tower_dir = root / "llava-v1.5-tiny", root / HUB_TOWER.split("/")[-1]
    tok = llama_tokenizer(out)
    lm = llama(len(tok), 4)
    lm.save_pretrained(out)
    tower = clip_tower(5)
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)
    projector = mlp_projector(6)
    config = json.loads((out / "config.json").read_text())
    config.update({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": HUB_TOWER,
                   "mm_hidden_size": TOWER["hidden_size"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                   "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                   "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False,
                   "freeze_mm_mlp_adapter": False})  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = dict(load_file(str(out / "model.safetensors")))
    (out / "model.safetensors").unlink()
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    inside = None
    if tower_weights_inside:  # LLaVA with an unfrozen tower saves it inside the LM's state dict
        inside = clip_tower(7)
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in inside.state_dict().items()})
    torch.save(state, out / "pytorch_model.bin")
    return {
        "dir": out,
        "tower_dir": tower_dir,
        "lm": lm,
        "tower": inside or tower,
        "projector": projector,
        "tokenizer": tok,
    }


def vila(root: Path) -> dict:
    """NVlabs/VILA's folder layout with a SigLIP tower read at every token (`cls_patch`) and an mlp2x_gelu projector."""
    out = root / "vila-tiny"
    tok = llama_tokenizer(out / "llm")
    lm = llama(len(tok), 8)
    lm.save_pretrained(out / "llm")
    torch.manual_seed(9)
    tower = SiglipVisionModel(SiglipVisionConfig(**TOWER)).eval()
    tower.save_pretrained(out / "vision_tower")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out / "vision_tower")
    projector = mlp_projector(10)
    (out / "mm_projector").mkdir(parents=True)
    save_file(
        {f"layers.{k}": v.contiguous() for k, v in projector.state_dict().items()},
        str(out / "mm_projector" / "model.safetensors"),
    )
    proj_cfg = {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": "mlp2x_gelu",
    }
    (out / "mm_projector" / "config.json").write_text(json.dumps(proj_cfg))
    root_cfg = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": LM["hidden_size"],
                "mm_hidden_size": TOWER["hidden_size"], "llm_cfg": {**lm.config.to_dict(), "_name_or_path": "./llm"},
                "vision_tower_cfg": {**tower.config.to_dict(), "_name_or_path": "./vision_tower"},
                "mm_projector_cfg": {**proj_cfg, "_name_or_path": "./mm_projector"}, "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize", "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "model_dtype": "torch.float32", "s2": False}  # fmt: skip
    (out / "config.json").write_text(json.dumps(root_cfg, indent=2))
    return {"dir": out, "lm": lm, "tower": tower, "projector": projector, "tokenizer": tok}


@torch.no_grad()
def reference_logits(
    lm, tower, projector, input_ids, pixel_values, image_id, layer=-2, drop_first=True
) -> torch.Tensor:
    """LLaVA's forward written out: tower hidden state `layer` (CLS dropped or not) -> projector -> spliced at `<image>`."""
    feats = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    feats = projector(feats[:, 1:] if drop_first else feats)  # [N, K, D]
    is_image = input_ids == image_id
    embeds = lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0)).clone()
    embeds[is_image] = feats.reshape(-1, feats.shape[-1])
    return lm(inputs_embeds=embeds).logits
