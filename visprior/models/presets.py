"""Named model configurations: the toy models tests and demos train on CPU, and the paper-scale ones `visprior plan` sizes.

Each preset is a plain dict of transformers config kwargs including `model_type`, so it drops straight into
`LanguageModelSpec(config=...)` / `VisionTowerSpec(config=...)` and into recipe YAML. Language-model presets leave out
`vocab_size` on purpose when the tokenizer decides it (toy); paper presets keep the real vocabulary so meta-device
instantiation gives the published parameter counts without a tokenizer.
"""

from __future__ import annotations

from typing import Any

# --- toy scale: a ~10M-parameter VLM that trains on 2 CPU cores (FACTS.md: ~1.2-1.9 s/step at 8 x 256 tokens) ---

TOY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 688,  # ~8/3 x hidden, rounded to a multiple of 16 as Llama does
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,  # at toy scale the embedding matrix is a third of the model; tying halves it
}

TOY_SIGLIP: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "image_size": 64,
    "patch_size": 8,  # 8 x 8 = 64 patches
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "vision_use_head": False,  # the pooling head never reaches the LM: unused parameters break DDP
}

# --- paper scale: instantiated on the meta device only (no weights), for `visprior plan` ---

LLAMA2_7B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

QWEN2_7B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
}

SIGLIP_SO400M_384: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "image_size": 384,
    "patch_size": 14,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "vision_use_head": False,  # VLMs read patch features; the MAP head is unused
}

CLIP_L14_336: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

LANGUAGE_PRESETS: dict[str, dict[str, Any]] = {"toy_llama": TOY_LLAMA, "llama2_7b": LLAMA2_7B, "qwen2_7b": QWEN2_7B}
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "toy_siglip": TOY_SIGLIP,
    "siglip_so400m_384": SIGLIP_SO400M_384,
    "clip_l14_336": CLIP_L14_336,
}
