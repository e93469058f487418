"""llava-hf folders (`LlavaForConditionalGeneration`): import into a `VisionLanguageModel`, and export back.

A llava-hf folder holds `config.json` (`model_type: llava`, `text_config`, `vision_config`, `vision_feature_layer`,
`vision_feature_select_strategy`, `image_seq_length`, `image_token_index`, `projector_hidden_act`), the weights (safetensors,
or pickled `pytorch_model*.bin` in older releases), the tokenizer with its `<image>` token, and the processor files.
Releases written by transformers 4 name weights `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`; transformers 5 writes `vision_tower.*` without the
`vision_model.` level and holds `model.language_model.*`, `model.vision_tower.*`, `lm_head.*` in memory. All are read.

LLaVA's projector is always Linear -> act -> Linear. Our `mlp2x_gelu` is exactly that with `gelu`; our `linear` connector
exports as `linear_1` = the map, act `linear` (identity), `linear_2` = the identity matrix, which is exact in floating point
(each output is one product by 1.0 plus zeros) and imports back as a single linear. Connectors that merge patches or pool
(`num_tokens` below the patch count, `avg_pool`, `attention_pool`, `c_abstractor`) have no llava-hf form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visprior.checkpoints.common import (
    Layout,
    architecture,
    drops_first_token,
    load_config,
    read_json,
    select_for,
    tokenizer_folder,
)
from visprior.checkpoints.weights import CheckpointFormatError, load_weights, read_weights
from visprior.models.connectors import ConnectorSpec, Linear, MLP2xGELU
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.models.vlm import VisionLanguageModel, VLMSpec

LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")


class NotExpressibleError(CheckpointFormatError):
    """The model has a part the target format cannot represent; the message says which and what to use instead."""


def is_llava_hf(config: dict) -> bool:
    return config.get("model_type") == "llava" and "text_config" in config and "vision_config" in config


class LlavaHFLayout(Layout):
    format = "llava-hf"
    description = "llava-hf folder (LlavaForConditionalGeneration)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        raw = read_json(self.path / "config.json", "the llava-hf config")
        if not is_llava_hf(raw):
            raise CheckpointFormatError(f"{self.path}: not a llava-hf folder (config.json needs model_type 'llava' "
                                        "with text_config and vision_config)")  # fmt: skip
        self.config = load_config(self.path)

    def spec(self) -> VLMSpec:
        cfg, where = self.config, f"llava-hf checkpoint {self.path}"
        tower_type = cfg.vision_config.model_type
        if tower_type not in LLAVA_TOWERS:
            raise CheckpointFormatError(
                f"{where}: vision tower {tower_type!r} is not supported (visprior reads {LLAVA_TOWERS})"
            )
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise CheckpointFormatError(
                f"{where}: vision_feature_layer {layer} concatenates several layers; visprior reads one"
            )
        select = select_for(tower_type, cfg.vision_feature_select_strategy == "default", where)
        if cfg.projector_hidden_act == "gelu":
            connector = ConnectorSpec("mlp2x_gelu")
        elif cfg.projector_hidden_act == "linear":
            connector = ConnectorSpec("linear")
        else:
            raise CheckpointFormatError(f"{where}: projector_hidden_act {cfg.projector_hidden_act!r} has no visprior "
                                        "connector (gelu -> mlp2x_gelu, linear -> linear)")  # fmt: skip
        tower = VisionTowerSpec(config=architecture(cfg.vision_config), feature_layer=layer, select=select)
        language = LanguageModelSpec(
            config=architecture(cfg.text_config), tokenizer=tokenizer_folder(self.path, where=where)
        )
        return VLMSpec(language, tower, connector)

    def state(self) -> dict[str, torch.Tensor]:
        where = f"llava-hf checkpoint {self.path}"
        out: dict[str, torch.Tensor] = {}
        projector: dict[str, torch.Tensor] = {}
        for key, value in read_weights(self.path).items():
            k = key.removeprefix("model.")
            if k.startswith(("lm_head.", "language_model.lm_head.")):
                out["language_model.lm_head." + k.split("lm_head.", 1)[1]] = value
            elif k.startswith("language_model.model."):
                out[k] = value
            elif k.startswith("language_model."):
                out["language_model.model." + k[len("language_model.") :]] = value
            elif k.startswith("vision_tower."):
                out["vision_tower.model." + k[len("vision_tower.") :].removeprefix("vision_model.")] = value
            elif k.startswith("multi_modal_projector."):
                projector[k[len("multi_modal_projector.") :]] = value
            else:
                raise CheckpointFormatError(f"{where}: unexpected weight {key!r}")
        out.update(self._projector(projector, where))
        return out

    def _projector(self, p: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        if "linear_1.weight" not in p or "linear_2.weight" not in p:
            raise CheckpointFormatError(f"{where}: projector weights missing (have {sorted(p)})")
        d_out = p["linear_2.weight"].shape[0]
        b1 = p.get("linear_1.bias", torch.zeros(p["linear_1.weight"].shape[0]))
        b2 = p.get("linear_2.bias", torch.zeros(d_out))
        if self.config.projector_hidden_act == "gelu":
            return {"connector.proj.0.weight": p["linear_1.weight"], "connector.proj.0.bias": b1,
                    "connector.proj.2.weight": p["linear_2.weight"], "connector.proj.2.bias": b2}  # fmt: skip
        # act = identity: W2 (W1 x + b1) + b2 is one linear map (exactly W1, b1 when linear_2 is our identity export)
        w2 = p["linear_2.weight"].double()
        weight = (w2 @ p["linear_1.weight"].double()).to(p["linear_1.weight"].dtype)
        bias = (w2 @ b1.double() + b2.double()).to(b1.dtype)
        return {"connector.proj.weight": weight, "connector.proj.bias": bias}

    def image_processor(self) -> str | None:
        return str(self.path) if (self.path / "preprocessor_config.json").is_file() else None


# ------------------------------------------------------------------------------------------------------------ export


def llava_connector(model: VisionLanguageModel) -> tuple[str, dict[str, torch.Tensor]]:
    """`(projector_hidden_act, multi_modal_projector state)` for our connector, or `NotExpressibleError`."""
    conn = model.connector
    name = type(conn).__name__
    if not isinstance(conn, Linear | MLP2xGELU):
        raise NotExpressibleError(
            f"connector {name} has no LlavaForConditionalGeneration form (llava-hf's projector is Linear -> act -> Linear "
            "per patch); export with --format visprior instead"
        )
    if conn.ratio != 1:
        raise NotExpressibleError(
            f"connector {conn.name} with num_tokens={conn.num_tokens} merges {conn.ratio}x{conn.ratio} patches into one token "
            f"({conn.num_patches} patches -> {conn.num_tokens} tokens), which LlavaForConditionalGeneration cannot express; "
            "export with --format visprior instead"
        )
    sd = {k: v.detach() for k, v in conn.proj.state_dict().items()}
    if isinstance(conn, MLP2xGELU):
        return "gelu", {"linear_1.weight": sd["0.weight"], "linear_1.bias": sd["0.bias"],
                        "linear_2.weight": sd["2.weight"], "linear_2.bias": sd["2.bias"]}  # fmt: skip
    d_out = sd["weight"].shape[0]
    eye = torch.eye(d_out, dtype=sd["weight"].dtype)
    return "linear", {"linear_1.weight": sd["weight"], "linear_1.bias": sd["bias"],
                      "linear_2.weight": eye, "linear_2.bias": torch.zeros(d_out, dtype=sd["bias"].dtype)}  # fmt: skip


def check_tower(model: VisionLanguageModel) -> str:
    """The llava-hf strategy for our tower, or `NotExpressibleError` for what LLaVA cannot reproduce."""
    tower = model.vision_tower
    if tower is None:
        raise NotExpressibleError("a text-only model has no llava-hf form; export its language_model as an HF folder")
    if tower.model_type not in LLAVA_TOWERS:
        raise NotExpressibleError(
            f"vision tower {tower.model_type!r} cannot be exported to llava-hf (only {LLAVA_TOWERS})"
        )
    if tower.image_size != tower.model.config.image_size:
        raise NotExpressibleError(
            f"the tower runs at {tower.image_size} px with interpolated position embeddings (its config says "
            f"{tower.model.config.image_size}); llava-hf does not interpolate: export with --format visprior"
        )
    return "default" if drops_first_token(tower.model_type, tower.select) else "full"


def to_llava_hf(model: VisionLanguageModel) -> nn.Module:
    """An in-memory `LlavaForConditionalGeneration` with our weights (no visprior code needed to run it)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    strategy = check_tower(model)
    act, projector = llava_connector(model)
    tower, lm = model.vision_tower, model.language_model
    config = LlavaConfig(
        text_config=lm.config.to_dict(),
        vision_config=tower.model.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=tower.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(lm.config.tie_word_embeddings),
    )
    config.text_config.dtype = config.vision_config.dtype = config.dtype = torch.float32
    with no_init_weights():  # transformers ties embeddings while initialising: tie them again afterwards
        llava = LlavaForConditionalGeneration(config)
    llava.tie_weights()
    state = {f"model.multi_modal_projector.{k}": v for k, v in projector.items()}
    state.update({f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()})
    for key, value in lm.state_dict().items():  # a causal LM's `model.*` is llava's `model.language_model.*`
        state[key if key.startswith("lm_head.") else "model.language_model." + key.removeprefix("model.")] = value
    load_weights(llava, state, "llava-hf export")
    llava.generation_config = lm.generation_config
    return llava.eval()


def save_llava_hf(model: VisionLanguageModel, out: Path) -> None:
    """Write `model` as a llava-hf folder: weights (safetensors), tokenizer, image processor and `LlavaProcessor`."""
    from transformers import LlavaProcessor

    llava = to_llava_hf(model)
    llava.save_pretrained(out)
    tower = model.vision_tower
    processor = LlavaProcessor(
        image_processor=tower.image_transform.processor,
        tokenizer=model.tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if tower.has_cls else 0,
        chat_template=getattr(model.tokenizer, "chat_template", None),
    )
    processor.save_pretrained(out)
