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

from collections.abc import Iterator

import torch
from transformers import Llama4TextConfig

from .configuration_llama4x import Llama4XTextConfig

# Fields with the same name and meaning in both text configs.
SHARED_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "num_local_experts", "num_experts_per_tok", "moe_layers", "attention_chunk_size", "layer_types",
    "attn_temperature_tuning", "floor_scale", "attn_scale", "router_aux_loss_coef", "router_jitter_noise",
    "output_router_logits",
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
    )
    return Llama4XTextConfig(**fields)


def text_config_to_llama4(config: Llama4XTextConfig) -> Llama4TextConfig:
    """The transformers `Llama4TextConfig` of a llama4x text config; ValueError if Llama 4 cannot express it."""
    for field, required in LLAMA4_FIXED_SETTINGS.items():
        if getattr(config, field) != required:
            raise ValueError(
                f"Cannot convert to Llama 4: `{field}`={getattr(config, field)!r}, Llama 4 only supports {required!r}."
            )
    if config.use_qk_norm == "rms":
        raise ValueError("Cannot convert to Llama 4: `use_qk_norm`='rms', Llama 4 only supports 'l2' or 'none'.")
    fields = {name: getattr(config, name) for name in SHARED_TEXT_FIELDS}
    return Llama4TextConfig(
        **fields,
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


def _convert_all(state_dict: dict[str, torch.Tensor], convert) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state_dict.items():
        yield convert(name, tensor)


def state_dict_from_llama4(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Llama4ForCausalLM` / `Llama4TextModel` state dict as a llama4x one (same prefixes)."""
    return dict(_convert_all(state_dict, text_tensor_from_llama4))


def state_dict_to_llama4(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Llama4XForCausalLM` / `Llama4XTextModel` state dict as a Llama 4 one (same prefixes)."""
    return dict(_convert_all(state_dict, text_tensor_to_llama4))
