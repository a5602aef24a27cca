"""Conversion between transformers' Llama 4 (`Llama4ForCausalLM`, `Llama4ForConditionalGeneration`) and llama4x.

Configs map field by field; weights map name by name, one tensor at a time (so a checkpoint converts shard by
shard). The text stack differs from Llama 4 in three places only:

| llama4x                                          | transformers Llama 4                            |
|--------------------------------------------------|-------------------------------------------------|
| `feed_forward.experts.gate_up_proj (E, 2I, H)`   | `feed_forward.experts.gate_up_proj (E, H, 2I)`  |
| `feed_forward.experts.down_proj (E, H, I)`       | `feed_forward.experts.down_proj (E, I, H)`      |
| `feed_forward.shared_experts.*`                  | `feed_forward.shared_expert.*`                  |

Llama 4 behaviours that llama4x expresses as config switches: sigmoid router scores applied to the expert
*input* (`router_weight_on_input`), one shared expert as wide as a routed one, weightless QK "L2" norm after
RoPE on RoPE layers (`use_qk_norm="l2"`), `no_rope_layers` (1 = RoPE) <-> `nope_layers` (indices without RoPE).
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from transformers.dynamic_module_utils import custom_object_save

from .checkpoints import refuse_output_over_input
from .configuration_llama4x import Llama4XConfig, Llama4XTextConfig, Llama4XVisionConfig

# Fields with the same name and meaning in both text configs.
SHARED_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "num_local_experts", "num_experts_per_tok", "moe_layers", "attention_chunk_size", "layer_types",
    "attn_temperature_tuning", "floor_scale", "attn_scale", "router_jitter_noise", "output_router_logits",
)  # fmt: skip

# llama4x settings that Llama 4 hard-codes: a config must have these values to be expressible as Llama 4.
LLAMA4_FIXED_SETTINGS = {
    "router_score_func": "sigmoid",
    "router_weight_on_input": True,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "num_shared_experts": 1,
    "norm_placement": "pre",
    "residual_dropout": 0.0,
    "use_scalable_softmax": False,
    "n_group": 1,
    "router_bias_update_rate": 0.0,
    "use_router_selection_bias": False,
    "router_z_loss_coef": 0.0,
    "router_aux_loss_type": "global",
}

_EXPERT_WEIGHTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")


def text_config_from_llama4(config: Llama4TextConfig) -> Llama4XTextConfig:
    """The llama4x text config that computes what `config` computes in transformers' Llama 4."""
    fields = {name: getattr(config, name) for name in SHARED_TEXT_FIELDS}
    fields.update(
        LLAMA4_FIXED_SETTINGS,
        intermediate_size=config.intermediate_size_mlp,
        moe_intermediate_size=config.intermediate_size,
        rope_parameters=dict(config.rope_parameters),
        use_qk_norm="l2" if config.use_qk_norm else "none",
        nope_layers=[i for i, uses_rope in enumerate(config.no_rope_layers) if not uses_rope],
        router_aux_loss_coef=0.0,  # Llama 4 stores a coefficient, but its loss has no balancing term
    )
    return Llama4XTextConfig(**fields)


def _check_fixed_settings(config: Llama4XTextConfig | Llama4XVisionConfig, settings: dict) -> None:
    for field, required in settings.items():
        if getattr(config, field) != required:
            raise ValueError(
                f"Cannot convert to Llama 4: `{field}`={getattr(config, field)!r}, Llama 4 only supports {required!r}."
            )


def text_config_to_llama4(config: Llama4XTextConfig) -> Llama4TextConfig:
    """The transformers `Llama4TextConfig` of a llama4x text config; ValueError if Llama 4 cannot express it."""
    _check_fixed_settings(config, LLAMA4_FIXED_SETTINGS)
    if config.use_qk_norm == "rms":
        raise ValueError("Cannot convert to Llama 4: `use_qk_norm`='rms', Llama 4 only supports 'l2' or 'none'.")
    fields = {name: getattr(config, name) for name in SHARED_TEXT_FIELDS}
    return Llama4TextConfig(
        **fields,
        router_aux_loss_coef=config.router_aux_loss_coef,  # stored, unused by Llama 4
        intermediate_size=config.moe_intermediate_size,
        intermediate_size_mlp=config.intermediate_size,
        rope_parameters=dict(config.rope_parameters),
        use_qk_norm=config.use_qk_norm == "l2",
        no_rope_layers=[int(i not in config.nope_layers) for i in range(config.num_hidden_layers)],
    )


def text_tensor_from_llama4(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One text-stack weight of a Llama 4 checkpoint under its llama4x name and layout."""
    if name.endswith(_EXPERT_WEIGHTS):
        return name, tensor.transpose(-1, -2).contiguous()
    return name.replace(".feed_forward.shared_expert.", ".feed_forward.shared_experts."), tensor


def text_tensor_to_llama4(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One text-stack weight of a llama4x checkpoint under its Llama 4 name and layout."""
    if name.endswith(_EXPERT_WEIGHTS):
        return name, tensor.transpose(-1, -2).contiguous()
    return name.replace(".feed_forward.shared_experts.", ".feed_forward.shared_expert."), tensor


def state_dict_from_llama4(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` state dict as the llama4x model's."""
    multimodal = any(name.startswith("vision_model.") for name in state_dict)
    return dict(tensor_from_llama4(name, tensor, multimodal) for name, tensor in state_dict.items())


def state_dict_to_llama4(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Llama4XForCausalLM` / `Llama4XForConditionalGeneration` state dict as the Llama 4 model's."""
    multimodal = any(name.startswith("model.vision_model.") for name in state_dict)
    return dict(tensor_to_llama4(name, tensor, multimodal) for name, tensor in state_dict.items())


# --- the multimodal model -----------------------------------------------------------------------------------

SHARED_VISION_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "pixel_shuffle_ratio", "projector_input_dim", "projector_output_dim", "vision_output_dim",
    "initializer_range", "attention_dropout",
)  # fmt: skip
# What Llama 4's vision encoder hard-codes (exact GELU, LayerNorm eps 1e-5), whatever its `hidden_act` and `norm_eps`.
LLAMA4_FIXED_VISION_SETTINGS = {"hidden_act": "gelu", "norm_eps": 1e-5}
SPECIAL_TOKEN_FIELDS = ("image_token_index", "boi_token_index", "eoi_token_index")

# Whole-model names, applied in order (text-stack layouts are converted afterwards by the text rules above).
COMPOSITE_FROM_LLAMA4 = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_model\.model\.layers\.", "model.vision_model.layers."),
    (r"^vision_model\.positional_embedding_vlm$", "model.vision_model.positional_embedding"),
    (r"^vision_model\.vision_adapter\.mlp\.", "model.vision_model.vision_adapter."),
    (r"^vision_model\.", "model.vision_model."),
    (r"^multi_modal_projector\.linear_1\.", "model.multi_modal_projector."),
)
COMPOSITE_TO_LLAMA4 = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_model\.layers\.", "vision_model.model.layers."),
    (r"^model\.vision_model\.positional_embedding$", "vision_model.positional_embedding_vlm"),
    (r"^model\.vision_model\.vision_adapter\.", "vision_model.vision_adapter.mlp."),
    (r"^model\.vision_model\.", "vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector.linear_1."),
)


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        renamed = re.sub(pattern, replacement, name)
        if renamed != name:
            return renamed
    return name


def tensor_from_llama4(name: str, tensor: torch.Tensor, multimodal: bool) -> tuple[str, torch.Tensor]:
    """One weight of a `Llama4ForConditionalGeneration` (multimodal) / `Llama4ForCausalLM` checkpoint, under its
    llama4x name and layout."""
    return text_tensor_from_llama4(_rename(name, COMPOSITE_FROM_LLAMA4) if multimodal else name, tensor)


def tensor_to_llama4(name: str, tensor: torch.Tensor, multimodal: bool) -> tuple[str, torch.Tensor]:
    """One weight of a `Llama4XForConditionalGeneration` (multimodal) / `Llama4XForCausalLM` checkpoint, under its
    Llama 4 name and layout."""
    name, tensor = text_tensor_to_llama4(name, tensor)
    return (_rename(name, COMPOSITE_TO_LLAMA4) if multimodal else name), tensor


def vision_config_from_llama4(config: Llama4VisionConfig) -> Llama4XVisionConfig:
    if config.multi_modal_projector_bias:
        raise ValueError("Cannot convert from Llama 4: `multi_modal_projector_bias`=True is not supported.")
    fields = {name: getattr(config, name) for name in SHARED_VISION_FIELDS}
    return Llama4XVisionConfig(
        **fields, **LLAMA4_FIXED_VISION_SETTINGS, fusion="encoder", rope_theta=config.rope_parameters["rope_theta"]
    )


def vision_config_to_llama4(config: Llama4XVisionConfig) -> Llama4VisionConfig:
    if config.fusion != "encoder":
        raise ValueError(f"Cannot convert to Llama 4: `fusion`={config.fusion!r}, Llama 4 only has 'encoder'.")
    _check_fixed_settings(config, LLAMA4_FIXED_VISION_SETTINGS)
    # Llama 4 sizes its vision adapter by other fields (see vision.py): they must give the same numbers.
    adapter_sizes = {
        "intermediate_size": round(config.hidden_size / config.pixel_shuffle_ratio**2),
        "projector_input_dim": config.projector_output_dim,
    }
    for field, llama4_size in adapter_sizes.items():
        if getattr(config, field) != llama4_size:
            raise ValueError(
                f"Cannot convert to Llama 4: `{field}`={getattr(config, field)}, Llama 4 sizes its vision adapter "
                f"with it and needs {llama4_size} (hidden_size / pixel_shuffle_ratio**2 and projector_output_dim)."
            )
    fields = {name: getattr(config, name) for name in SHARED_VISION_FIELDS}
    return Llama4VisionConfig(
        **fields,
        **LLAMA4_FIXED_VISION_SETTINGS,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


def config_from_llama4(config: Llama4Config | Llama4TextConfig) -> Llama4XConfig | Llama4XTextConfig:
    """The llama4x config (composite or text) computing what a transformers Llama 4 config computes."""
    if isinstance(config, Llama4TextConfig):
        return text_config_from_llama4(config)
    return Llama4XConfig(
        text_config=text_config_from_llama4(config.text_config),
        vision_config=vision_config_from_llama4(config.vision_config),
        # Llama 4's LM head lives in its text model, tied or not by the text config; llama4x's by the composite one.
        tie_word_embeddings=config.text_config.tie_word_embeddings,
        **{name: getattr(config, name) for name in SPECIAL_TOKEN_FIELDS},
    )


def config_to_llama4(config: Llama4XConfig | Llama4XTextConfig) -> Llama4Config | Llama4TextConfig:
    """The transformers Llama 4 config (composite or text) of a llama4x config; ValueError if it has none."""
    if isinstance(config, Llama4XTextConfig):
        return text_config_to_llama4(config)
    text_config = text_config_to_llama4(config.text_config)
    text_config.tie_word_embeddings = config.tie_word_embeddings  # the flag Llama 4 ties its head by
    return Llama4Config(
        text_config=text_config,
        vision_config=vision_config_to_llama4(config.vision_config),
        tie_word_embeddings=config.tie_word_embeddings,
        **{name: getattr(config, name) for name in SPECIAL_TOKEN_FIELDS},
    )


# --- whole checkpoint folders ------------------------------------------------------------------------------------

SOURCE_KINDS = {"llama4_text": "llama4", "llama4": "llama4", "llama4x_text": "llama4x", "llama4x": "llama4x"}
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)  # fmt: skip
# Llama 4's processors and llama4x's take the same settings, so a processor file converts by its class names. Its
# `auto_map` (llama4x's remote code, which is not copied) is dropped.
PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
PROCESSOR_CLASSES = {
    "llama4": {"Llama4Processor": "Llama4XProcessor", "Llama4ImageProcessor": "Llama4XImageProcessor",
               "Llama4ImageProcessorFast": "Llama4XImageProcessor"},
    "llama4x": {"Llama4XProcessor": "Llama4Processor", "Llama4XImageProcessor": "Llama4ImageProcessor"},
}  # fmt: skip


def processor_settings_for_other_family(settings: Any, source: str) -> Any:
    """A processor JSON (`processor_class`, `image_processor_type`, nested image-processor settings) of the `source`
    family ("llama4" or "llama4x") with the other family's class names."""
    if not isinstance(settings, dict):
        return settings
    names = PROCESSOR_CLASSES[source]
    return {
        key: names.get(value, value)
        if key in ("processor_class", "image_processor_type")
        else processor_settings_for_other_family(value, source)
        for key, value in settings.items()
        if key != "auto_map"
    }


def _weight_files(folder: Path) -> tuple[list[str], dict | None]:
    """The safetensors shards of a checkpoint folder and its index (None for a single file)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"], None
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"{folder} has no safetensors weights (model.safetensors or its index); found {found}.")


def _check_folders(input_dir: Path, output_dir: Path, overwrite: bool) -> dict:
    if not (input_dir / "config.json").is_file():
        raise ValueError(f"{input_dir} is not a checkpoint folder: it has no config.json.")
    config = json.loads((input_dir / "config.json").read_text())
    if config.get("model_type") not in SOURCE_KINDS:
        raise ValueError(
            f"{input_dir} holds a {config.get('model_type')!r} checkpoint; expected one of model_type "
            f"{sorted(SOURCE_KINDS)}."
        )
    refuse_output_over_input(output_dir, input_dir, names=("The output folder", "the input folder"))
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"The output folder {output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    return config


def convert_checkpoint(
    input_dir: str | Path, output_dir: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Convert a saved Llama 4 checkpoint folder (text or multimodal) to llama4x, or a llama4x one to Llama 4 (by its
    model_type).

    Reads one safetensors shard at a time (memory bounded by the largest shard), writes the converted config,
    shards, index and tokenizer/processor files into a temporary folder next to `output_dir`, and moves it into
    place only when everything is written: a failure never leaves a partial checkpoint. The input is never
    modified. `dtype` casts floating-point weights (default: keep the source's dtype).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    model_type = _check_folders(input_dir, output_dir, overwrite)["model_type"]
    source = SOURCE_KINDS[model_type]
    shards, index = _weight_files(input_dir)
    multimodal = model_type in ("llama4", "llama4x")
    convert_tensor = tensor_from_llama4 if source == "llama4" else tensor_to_llama4

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        _write_config(input_dir, staging, model_type, dtype)
        weight_map, total_bytes = {}, 0
        total = sum(_shard_length(input_dir / shard) for shard in shards)
        with tqdm(total=total, desc=f"Converting {source} -> {'llama4x' if source == 'llama4' else 'llama4'}") as bar:
            for shard in shards:
                converted = {}
                with safe_open(input_dir / shard, framework="pt") as reader:
                    for name in reader.keys():
                        new_name, tensor = convert_tensor(name, reader.get_tensor(name), multimodal)
                        if dtype is not None and tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        converted[new_name] = tensor
                        weight_map[new_name] = shard
                        total_bytes += tensor.nbytes
                        bar.update(1)
                save_file(converted, staging / shard, metadata={"format": "pt"})
                del converted
        if index is not None:
            metadata = {**index.get("metadata", {}), "total_size": total_bytes}  # changed by a `dtype` cast
            index = {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in COPIED_FILES:
            if name in PROCESSOR_FILES and (input_dir / name).is_file():
                settings = processor_settings_for_other_family(json.loads((input_dir / name).read_text()), source)
                (staging / name).write_text(json.dumps(settings, indent=2) + "\n")
            elif (input_dir / name).is_file():
                shutil.copy2(input_dir / name, staging / name)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _shard_length(path: Path) -> int:
    with safe_open(path, framework="pt") as reader:
        return len(reader.keys())


def _write_config(input_dir: Path, output_dir: Path, model_type: str, dtype: torch.dtype | None) -> None:
    from .modeling_llama4x import Llama4XForCausalLM
    from .modeling_multimodal import Llama4XForConditionalGeneration

    source_class = {"llama4_text": Llama4TextConfig, "llama4": Llama4Config}.get(model_type)
    if source_class is not None:
        source = source_class.from_pretrained(input_dir)
        config = config_from_llama4(source)
        model_class = Llama4XForCausalLM if model_type == "llama4_text" else Llama4XForConditionalGeneration
    else:
        source_class = Llama4XTextConfig if model_type == "llama4x_text" else Llama4XConfig
        source = source_class.from_pretrained(input_dir)
        config = config_to_llama4(source)
        model_class = None
    config.dtype = dtype if dtype is not None else source.dtype
    if model_class is not None:
        with torch.device("meta"):  # only to copy the model code and write `auto_map` (trust_remote_code loading)
            custom_object_save(model_class(config), output_dir, config=config)
        config.architectures = [model_class.__name__]
    else:
        config.architectures = [
            "Llama4ForCausalLM" if model_type == "llama4x_text" else "Llama4ForConditionalGeneration"
        ]
    config.save_pretrained(output_dir)
