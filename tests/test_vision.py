"""Vision front-ends: config validation, output shapes, and parity of the encoder with transformers' Llama 4 tower."""

import re

import pytest
import torch
from transformers import AutoConfig, Llama4Config, Llama4VisionConfig
from transformers.models.llama4.modeling_llama4 import (
    Llama4MultiModalProjector,
    Llama4VisionModel,
    Llama4VisionRotaryEmbedding,
)

from llama4x import Llama4XConfig, Llama4XVisionConfig, Llama4XVisionModel
from llama4x.vision import Llama4XVisionRotaryEmbedding, unfold_patches
from tiny import randomize_to_unit_scale, tiny_multimodal_config, tiny_multimodal_model

TILES = 3


def tiles(n: int = TILES, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- config -------------------------------------------------------------------------------------------------------

INVALID_VISION_CASES = [
    ({"fusion": "cross_attention"}, "fusion"),
    ({"patch_size": 5}, "patch_size"),  # does not divide image_size=32
    ({"image_size": 0}, "image_size"),
    ({"num_channels": 0}, "num_channels"),
    ({"num_attention_heads": 3}, "num_attention_heads"),  # hidden 32 not divisible by 3
    ({"num_attention_heads": 16}, "num_attention_heads"),  # head_dim 2: 2-D RoPE needs a multiple of 4
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio"),  # 4 * 0.3 patches is not whole
    ({"pixel_shuffle_ratio": 0.0}, "pixel_shuffle_ratio"),
    ({"pixel_shuffle_ratio": 0.75}, "pixel_shuffle_ratio"),  # 3x3 tokens, but 32 / 0.75 channels is not whole
    ({"vision_output_dim": 7680}, "vision_output_dim"),  # must equal projector_output_dim=64
    ({"hidden_act": "no_such_act"}, "hidden_act"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"norm_eps": 0.0}, "norm_eps"),
]


@pytest.mark.parametrize(
    ("overrides", "field"),
    INVALID_VISION_CASES,
    ids=[f"{field}-{i}" for i, (_, field) in enumerate(INVALID_VISION_CASES)],
)
def test_invalid_vision_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Llama4XVisionConfig.from_preset("tiny", **overrides)


def test_patch_fusion_ignores_encoder_only_fields():
    config = Llama4XVisionConfig.from_preset("tiny", fusion="patch", num_attention_heads=3, vision_output_dim=7)
    assert config.tokens_per_tile == 16 and config.output_dim == 3 * 8 * 8


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image_token_id": 97}, "image_token_index"),  # tiny vocab is 97
        ({"boi_token_id": -1}, "boi_token_index"),
        ({"eoi_token_id": 5}, "eoi_token_index"),  # same as image_token_id
    ],
)
def test_invalid_special_token_ids_raise_value_error_naming_the_field(overrides, field):
    config = tiny_multimodal_config()
    kwargs = {"image_token_id": 5, "boi_token_id": 3, "eoi_token_id": 4, **overrides}
    with pytest.raises(ValueError, match=re.escape(field)):
        Llama4XConfig(text_config=config.text_config, vision_config=config.vision_config, **kwargs)


def test_tokens_per_tile_for_both_fusions_and_the_llama4_preset():
    assert tiny_multimodal_config("encoder").vision_config.tokens_per_tile == 4  # (32 / 8)**2 * 0.5**2
    assert tiny_multimodal_config("patch").vision_config.tokens_per_tile == 16
    assert Llama4XConfig.from_preset("scout").vision_config.tokens_per_tile == 144  # (336 / 14)**2 / 4


def test_scout_and_maverick_vision_presets_are_llama4s_published_encoder():
    # Meta's published vision_config (transformers' Llama4VisionConfig() defaults differ: hidden_size 768,
    # image_size 448, vision_output_dim 7680, which do not even fit together: its adapter's fc1 expects
    # intermediate_size = hidden_size / pixel_shuffle_ratio**2 inputs).
    published = {
        "hidden_size": 1408, "num_hidden_layers": 34, "num_attention_heads": 16, "intermediate_size": 5632,
        "image_size": 336, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
        "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000.0, "norm_eps": 1e-5,
    }  # fmt: skip
    for name in ("scout", "maverick"):
        config = Llama4XConfig.from_preset(name)
        assert {key: getattr(config.vision_config, key) for key in published} == published
        assert (config.image_token_id, config.boi_token_id, config.eoi_token_id) == (200092, 200080, 200081)
    reference = Llama4Config()
    assert (reference.image_token_id, reference.boi_token_id, reference.eoi_token_id) == (200092, 200080, 200081)


def test_composite_config_round_trips_through_save_pretrained_with_its_vision_config(tmp_path):
    config = Llama4XConfig.from_preset("tiny", vision_overrides={"fusion": "patch", "image_size": 64})
    config.save_pretrained(tmp_path)
    restored = AutoConfig.from_pretrained(tmp_path)
    assert type(restored.vision_config) is Llama4XVisionConfig
    assert restored.vision_config.fusion == "patch" and restored.vision_config.image_size == 64
    assert restored.image_token_id == config.image_token_id == 6


# --- shapes and hand computations ----------------------------------------------------------------------------------


def test_encoder_output_shapes_follow_tokens_per_tile():
    model = tiny_multimodal_model("encoder")
    with torch.no_grad():
        features = model.model.vision_model(tiles())
        embedded = model.get_image_features(tiles())
    assert features.shape == (TILES, 4, 64)  # (N, T, vision_output_dim)
    assert embedded.shape == (TILES, 4, 32)  # (N, T, text hidden)


def test_patch_fusion_is_a_linear_map_of_the_raw_patches():
    model = tiny_multimodal_model("patch")
    pixels = tiles()
    # Hand-made patches: row-major over the 4x4 grid, each flattened channel-first.
    patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8)  # (N, C, 4, 4, 8, 8)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(TILES, 16, 3 * 8 * 8)
    assert torch.equal(unfold_patches(pixels, 8), patches)
    with torch.no_grad():
        embedded = model.get_image_features(pixels)
    expected = patches @ model.model.multi_modal_projector.weight.T
    assert embedded.shape == (TILES, 16, 32)
    torch.testing.assert_close(embedded, expected, atol=1e-6, rtol=1e-6)
    assert not list(model.model.vision_model.parameters()), "the patch front-end has no encoder weights"


def test_vision_attention_kernels_agree():
    model = tiny_multimodal_model("encoder")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model.get_image_features(tiles())
        model.set_attn_implementation("sdpa")
        sdpa = model.get_image_features(tiles())
    assert model.config.vision_config._attn_implementation == "sdpa"
    diff = (eager - sdpa).abs().max().item()
    assert diff < 1e-5, f"max diff {diff}"


# --- parity with transformers' Llama 4 ----------------------------------------------------------------------------


def llama4_vision_config(config: Llama4XVisionConfig) -> Llama4VisionConfig:
    """transformers' config of the same tower (its adapter input width is `intermediate_size`; see vision.py)."""
    assert config.intermediate_size == config.hidden_size / config.pixel_shuffle_ratio**2
    return Llama4VisionConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        pixel_shuffle_ratio=config.pixel_shuffle_ratio,
        projector_input_dim=config.projector_input_dim,
        projector_output_dim=config.projector_output_dim,
        vision_output_dim=config.vision_output_dim,
        norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


LLAMA4_TO_LLAMA4X = [  # the table in vision.py's docstring, for the vision tower
    (r"^model\.layers\.", "layers."),
    (r"^positional_embedding_vlm$", "positional_embedding"),
    (r"^vision_adapter\.mlp\.", "vision_adapter."),
]


def llama4x_name(llama4_name: str) -> str:
    for pattern, replacement in LLAMA4_TO_LLAMA4X:
        llama4_name = re.sub(pattern, replacement, llama4_name)
    return llama4_name


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_encoder_and_projector_match_transformers_llama4_with_the_same_weights(kernel):
    config = tiny_multimodal_config("encoder")
    reference = Llama4VisionModel(llama4_vision_config(config.vision_config)).eval()
    randomize_to_unit_scale(reference, seed=1)
    reference_config = Llama4Config(
        vision_config=reference.config.to_dict(),
        text_config={"hidden_size": config.text_config.hidden_size, "num_attention_heads": 4, "num_hidden_layers": 1},
    )
    reference_projector = Llama4MultiModalProjector(reference_config).eval()
    randomize_to_unit_scale(reference_projector, seed=2)
    reference.set_attn_implementation(kernel)

    model = tiny_multimodal_model("encoder")
    model.set_attn_implementation(kernel)
    ours = model.model.vision_model.state_dict()
    theirs = {llama4x_name(name): tensor for name, tensor in reference.state_dict().items()}
    assert theirs.keys() == ours.keys()
    assert all(theirs[name].shape == ours[name].shape for name in ours)
    model.model.vision_model.load_state_dict(theirs, strict=True)
    model.model.multi_modal_projector.load_state_dict({"weight": reference_projector.linear_1.weight})

    pixels = tiles()
    with torch.no_grad():
        expected_features = reference(pixels).last_hidden_state
        expected = reference_projector(expected_features)
        features = model.model.vision_model(pixels)
        embedded = model.get_image_features(pixels)
    assert expected_features.std() > 0.3, "outputs too small for an absolute tolerance to mean much"
    diff = (features - expected_features).abs().max().item()
    assert diff < 1e-5, f"vision features: max diff {diff}"
    diff = (embedded - expected).abs().max().item()
    assert diff < 1e-5, f"projected features: max diff {diff}"


@pytest.mark.parametrize("preset", ["tiny", "scout"])
def test_rotary_embedding_equals_llama4s_complex_frequencies(preset):
    config = Llama4XConfig.from_preset(preset).vision_config
    freqs_ci = Llama4VisionRotaryEmbedding._compute_freqs_ci(llama4_vision_config(config))  # (P + 1, 1, D/2)
    cos, sin = Llama4XVisionRotaryEmbedding(config)(torch.zeros(1))  # (1, P + 1, D) interleaved pairs
    assert cos.shape == (1, config.num_patches + 1, config.head_dim)
    torch.testing.assert_close(cos[0, :, ::2], freqs_ci[:, 0].real, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0, :, ::2], freqs_ci[:, 0].imag, atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[0, :, 1::2], cos[0, :, ::2], atol=0, rtol=0)


def test_vision_model_builds_from_its_config_through_auto_model():
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_multimodal_config().vision_config)
    assert isinstance(model, Llama4XVisionModel)
    position_std = model.positional_embedding.std().item()
    assert 0.1 < position_std < 0.25, f"positions drawn with std 32**-0.5 ~ 0.18, got {position_std}"
