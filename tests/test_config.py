"""Config validation, presets (published Llama 4 shapes), serialisation round trips and default derivations."""

import re

import pytest
from transformers import AutoConfig, LlamaConfig

import llama4x  # noqa: F401  (registers the llama4x configs with AutoConfig)
from llama4x import Llama4XConfig, Llama4XTextConfig
from tiny import tiny_text_config

INVALID_CASES = [
    ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef"),
    ({"router_bias_update_rate": float("inf")}, "router_bias_update_rate"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # top-k > num_local_experts=8
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 4 heads not divisible by 3
    ({"attention_chunk_size": 0}, "attention_chunk_size"),
    ({"attention_chunk_size": -8}, "attention_chunk_size"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),  # 4 layers
    ({"layer_types": ["full_attention"] * 5}, "layer_types"),
    ({"moe_layers": [4]}, "moe_layers"),
    ({"moe_layers": [-1]}, "moe_layers"),
    ({"moe_layers": [0, 0]}, "moe_layers"),
    ({"nope_layers": [4]}, "nope_layers"),
    ({"nope_layers": [-1]}, "nope_layers"),
    ({"attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4}, "attention_chunk_size"),
    ({"use_qk_norm": "layer"}, "use_qk_norm"),
    ({"router_score_func": "relu"}, "router_score_func"),
    ({"norm_placement": "sandwich"}, "norm_placement"),
    ({"hidden_act": "swiglu"}, "hidden_act"),
    ({"head_dim": 7}, "head_dim"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
    ({"residual_dropout": 1.5}, "residual_dropout"),
    ({"rope_parameters": {"rope_type": "no_such_rope", "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ({"hidden_size": -32}, "hidden_size"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_local_experts": 0}, "num_local_experts"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"floor_scale": 0}, "floor_scale"),
    ({"use_scalable_softmax": True, "scalable_softmax_init": 0.0}, "scalable_softmax_init"),
    ({"no_rope_layer_interval": -1}, "no_rope_layer_interval"),
    ({"interleave_moe_layer_step": -1}, "interleave_moe_layer_step"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),  # no factor
    ({"attn_scale": float("nan")}, "attn_scale"),
    ({"use_scalable_softmax": True, "scalable_softmax_init": float("nan")}, "scalable_softmax_init"),
    ({"use_scalable_softmax": True, "scalable_softmax_init": float("inf")}, "scalable_softmax_init"),
    ({"initializer_range": -1.0}, "initializer_range"),
    ({"initializer_range": float("nan")}, "initializer_range"),
    ({"pad_token_id": 97}, "pad_token_id"),  # vocab_size=97
]


@pytest.mark.parametrize(
    ("overrides", "field"), INVALID_CASES, ids=[f"{field}-{i}" for i, (_, field) in enumerate(INVALID_CASES)]
)
def test_invalid_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        tiny_text_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"n_group": 3}, "n_group"), ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
     ({"router_score_func": "relu"}, "router_score_func"), ({"num_hidden_layers": 2}, "layer_types"),
     ({"attention_chunk_size": 0}, "attention_chunk_size")],
)  # fmt: skip
def test_overrides_at_load_time_are_validated_like_construction(tmp_path, overrides, field):
    """transformers sets `from_pretrained(folder, field=value)` overrides after building the config."""
    tiny_text_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(field)):
        AutoConfig.from_pretrained(tmp_path, **overrides)
    with pytest.raises(ValueError, match=re.escape(field)):
        Llama4XTextConfig.from_dict(tiny_text_config().to_dict(), **overrides)
    assert AutoConfig.from_pretrained(tmp_path, router_aux_loss_coef=0.5).router_aux_loss_coef == 0.5


def test_vision_and_composite_overrides_at_load_time_are_validated(tmp_path):
    config = Llama4XConfig.from_preset("tiny")
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="image_token_index"):
        AutoConfig.from_pretrained(tmp_path, image_token_index=10**9)
    with pytest.raises(ValueError, match="initializer_range"):
        type(config.vision_config).from_dict(config.vision_config.to_dict(), initializer_range=-1.0)


def test_valid_tiny_config_constructs_without_error():
    config = tiny_text_config()
    assert config.num_experts_per_tok == 2 and config.num_local_experts == 8


def test_scout_preset_has_metas_published_shapes():
    config = Llama4XTextConfig.from_preset("scout")
    expected = {
        "num_hidden_layers": 48,
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "num_shared_experts": 1,
        "moe_intermediate_size": 8192,
        "intermediate_size": 16384,
        "vocab_size": 202048,
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "use_qk_norm": "l2",
        "router_score_func": "sigmoid",
        "router_weight_on_input": True,
        "max_position_embeddings": 10485760,
    }
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.nope_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
    assert config.moe_layers == list(range(48))
    assert config.layer_types == [
        "full_attention" if i in config.nope_layers else "chunked_attention" for i in range(48)
    ]
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["factor"] == 16.0
    assert config.rope_parameters["original_max_position_embeddings"] == 8192


def test_maverick_preset_has_128_experts_every_other_layer_moe_and_no_qk_norm():
    config = Llama4XTextConfig.from_preset("maverick")
    assert config.num_local_experts == 128
    assert config.num_experts_per_tok == 1
    assert config.moe_layers == list(range(1, 48, 2))
    assert config.moe_layers[:3] == [1, 3, 5] and config.moe_layers[-1] == 47
    assert config.use_qk_norm == "none"
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (48, 5120, 128)
    assert config.nope_layers == list(range(3, 48, 4))
    assert config.rope_parameters["rope_type"] == "default"


def test_preset_overrides_apply_and_do_not_mutate_the_preset():
    config = Llama4XTextConfig.from_preset("tiny", num_hidden_layers=2, no_rope_layer_interval=2)
    assert config.num_hidden_layers == 2 and config.nope_layers == [1]
    config.rope_parameters["rope_theta"] = 1.0
    assert Llama4XTextConfig.from_preset("tiny").rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("factory", [Llama4XTextConfig.from_preset, Llama4XConfig.from_preset])
def test_unknown_preset_raises_value_error_naming_the_preset(factory):
    with pytest.raises(ValueError, match="behemoth"):
        factory("behemoth")


def text_fields(config: Llama4XTextConfig) -> dict:
    """Serialised fields, without the bookkeeping that legitimately changes on save/load."""
    return {
        key: value for key, value in config.to_dict().items() if key not in ("transformers_version", "_name_or_path")
    }


def test_tiny_preset_round_trips_through_to_dict_and_from_dict():
    config = Llama4XConfig.from_preset("tiny")
    restored = Llama4XConfig.from_dict(config.to_dict())
    assert isinstance(restored, Llama4XConfig)
    assert isinstance(restored.text_config, Llama4XTextConfig)
    assert text_fields(restored.text_config) == text_fields(config.text_config)
    assert restored.text_config.layer_types == config.text_config.layer_types


def test_tiny_preset_round_trips_through_save_pretrained_and_auto_config(tmp_path):
    config = Llama4XConfig.from_preset("tiny", use_scalable_softmax=True, norm_topk_prob=True)
    config.save_pretrained(tmp_path)
    restored = AutoConfig.from_pretrained(tmp_path)
    assert type(restored) is Llama4XConfig
    assert isinstance(restored.text_config, Llama4XTextConfig)
    assert text_fields(restored.text_config) == text_fields(config.text_config)
    assert restored.text_config.use_scalable_softmax and restored.text_config.norm_topk_prob


def test_text_config_round_trips_through_save_pretrained_and_auto_config(tmp_path):
    config = tiny_text_config(moe_layers=[0, 2], nope_layers=[0], router_score_func="softmax")
    config.save_pretrained(tmp_path)
    restored = AutoConfig.from_pretrained(tmp_path)
    assert type(restored) is Llama4XTextConfig
    assert text_fields(restored) == text_fields(config)


def test_composite_config_builds_text_config_from_dict_and_rejects_other_config_classes():
    config = Llama4XConfig(
        text_config={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    )
    assert isinstance(config.text_config, Llama4XTextConfig) and config.text_config.head_dim == 16
    with pytest.raises(ValueError, match="text_config"):
        Llama4XConfig(text_config=LlamaConfig())


def expected_layer_types(num_layers: int, interval: int, chunk: int | None) -> tuple[list[int], list[str]]:
    nope = [i for i in range(num_layers) if interval > 0 and (i + 1) % interval == 0]
    types = [
        "chunked_attention" if chunk is not None and i not in nope else "full_attention" for i in range(num_layers)
    ]
    return nope, types


@pytest.mark.parametrize("num_layers", [1, 4, 6])
@pytest.mark.parametrize("interval", [0, 1, 2, 4])
@pytest.mark.parametrize("chunk", [8, None])
def test_default_layer_types_follow_nope_layers_and_attention_chunk_size(num_layers, interval, chunk):
    config = tiny_text_config(
        num_hidden_layers=num_layers, no_rope_layer_interval=interval, attention_chunk_size=chunk
    )
    nope, types = expected_layer_types(num_layers, interval, chunk)
    assert config.nope_layers == nope
    assert config.layer_types == types
    if chunk is None:
        assert set(config.layer_types) == {"full_attention"}


def test_explicit_nope_layers_drive_default_layer_types():
    config = tiny_text_config(nope_layers=[0, 3])
    assert config.layer_types == ["full_attention", "chunked_attention", "chunked_attention", "full_attention"]


@pytest.mark.parametrize(("step", "expected"), [(0, []), (1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (5, [])])
def test_default_moe_layers_follow_interleave_step(step, expected):
    config = tiny_text_config(interleave_moe_layer_step=step)
    assert config.moe_layers == expected


def test_head_dim_defaults_to_hidden_size_over_heads():
    config = tiny_text_config(head_dim=None, hidden_size=48, num_attention_heads=4)
    assert config.head_dim == 12


@pytest.mark.parametrize(
    "legacy_kwargs", [{"rope_scaling": None}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}]
)
def test_legacy_rope_scaling_kwarg_without_rope_theta_keeps_default_theta_500000(legacy_kwargs):
    assert Llama4XTextConfig().rope_parameters["rope_theta"] == 500000.0
    config = Llama4XTextConfig(**legacy_kwargs)
    assert config.rope_parameters["rope_theta"] == 500000.0
