"""Tiny stand-in models for evaluation tests and chance baselines.

The evaluation harness only needs the `VisionLanguageModel` surface from docs/contracts.md (`embed`, `language_model`,
`tokenizer`, `image_transform`, `num_image_tokens`, `image_token_id`). `TinyVLM` provides exactly that with a random tiny
Llama, a byte-level tokenizer carrying the project's special tokens, and a "vision tower" that mean-pools pixels; so the harness
can be tested without the real model code and a random-answer baseline costs nothing.
"""

from __future__ import annotations

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) plus the project's special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_image_transform(image: Image.Image, size: int = 8) -> torch.Tensor:
    img = image.convert("RGB").resize((size, size))
    return torch.tensor(list(img.getdata()), dtype=torch.float32).view(size, size, 3).permute(2, 0, 1) / 255.0


class TinyVisionTower(nn.Module):
    """Patch means -> linear: [N, 3, H, W] -> [N, 4, D]; enough to make image content reach the LM."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(3, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixel_values.shape
        patches = pixel_values.view(n, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # [N, 4, 3]
        return self.proj(patches)


class TinyVLM(nn.Module):
    """The VisionLanguageModel surface with a random 2-layer Llama; each image becomes 4 tokens."""

    def __init__(self, hidden: int = 32, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tokenizer = byte_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(self.tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.eos_token_id,
        )
        self.language_model = LlamaForCausalLM(cfg).eval()
        self.vision_tower = TinyVisionTower(hidden)
        self.connector = nn.Identity()
        self.num_image_tokens = 4
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.image_transform = tiny_image_transform

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions, in row-major order."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, T, D]
        mask = input_ids == self.image_token_id
        if pixel_values is not None and mask.any():
            feats = self.connector(self.vision_tower(pixel_values)).reshape(-1, embeds.shape[-1])  # [N*4, D]
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds
