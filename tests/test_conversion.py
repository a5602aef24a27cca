"""Parity with transformers' Llama 4: the same weights compute the same function in llama4x."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

from llama4x import Llama4XConfig, Llama4XForCausalLM, Llama4XForConditionalGeneration, Llama4XTextConfig
from llama4x.cli import main
from llama4x.conversion import (
    config_from_llama4,
    config_to_llama4,
    convert_checkpoint,
    state_dict_from_llama4,
    state_dict_to_llama4,
    text_config_from_llama4,
    text_config_to_llama4,
)
from tiny import random_ids, randomize_to_unit_scale, tiny_multimodal_config

CHUNK = 8


def llama4_text_config(**overrides) -> Llama4TextConfig:
    fields = {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 16, "intermediate_size_mlp": 48,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_local_experts": 4, "num_experts_per_tok": 1, "attention_chunk_size": CHUNK, "no_rope_layer_interval": 2,
        "floor_scale": 4, "attn_scale": 0.5, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }  # fmt: skip
    fields.update(overrides)
    return Llama4TextConfig(**fields)


def converted_pair(seed: int = 0, **overrides) -> tuple[Llama4ForCausalLM, Llama4XForCausalLM]:
    torch.manual_seed(seed)
    reference = Llama4ForCausalLM(llama4_text_config(**overrides)).eval()
    model = Llama4XForCausalLM(text_config_from_llama4(reference.config)).eval()
    missing, unexpected = model.load_state_dict(state_dict_from_llama4(reference.state_dict()), strict=True)
    assert not missing and not unexpected
    return reference, model


CONFIGS = {
    "all_moe_qk_norm_nope_every_2nd": {},
    "interleaved_moe_dense": {"interleave_moe_layer_step": 2},
    "no_qk_norm": {"use_qk_norm": False},
    "nope_every_4th_top2": {"no_rope_layer_interval": 4, "num_experts_per_tok": 2},
    "no_temperature_tuning": {"attn_temperature_tuning": False},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_llama4_causal_lm_logits_match_after_conversion(overrides, kernel):
    reference, model = converted_pair(**overrides)
    reference.set_attn_implementation(kernel)
    model.set_attn_implementation(kernel)
    input_ids = random_ids(2, 3 * CHUNK + 5)  # longer than 2 x attention_chunk_size
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    diff = (actual - expected)[real].abs().max().item()
    assert torch.allclose(actual[real], expected[real], rtol=1e-5, atol=1e-5), f"max diff {diff}"


def test_greedy_generation_matches_llama4_token_for_token():
    reference, model = converted_pair(seed=3)
    input_ids = random_ids(1, 5)
    kwargs = {"max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False, "pad_token_id": 0}
    expected = reference.generate(input_ids=input_ids, **kwargs)
    actual = model.generate(input_ids=input_ids, **kwargs)
    assert expected.shape[1] > 8 * CHUNK  # crosses many chunk boundaries with the cache
    assert torch.equal(actual, expected)


def test_converted_llama4_has_llama4s_loss_without_a_balancing_term():
    """Llama 4 stores `router_aux_loss_coef` (0.001 by default) but its loss never adds the balancing loss."""
    reference, model = converted_pair(seed=1)
    assert reference.config.router_aux_loss_coef > 0 and model.config.router_aux_loss_coef == 0.0
    input_ids = random_ids(2, 20)
    for train in (False, True):
        reference.train(train), model.train(train)
        expected = reference(input_ids=input_ids, labels=input_ids).loss
        torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_llama4x_to_llama4_and_back_is_bit_exact(overrides):
    _, model = converted_pair(**overrides)
    llama4_config = text_config_to_llama4(model.config)
    back_config = text_config_from_llama4(llama4_config)
    assert back_config.to_diff_dict() == model.config.to_diff_dict()
    state_dict = model.state_dict()
    back = state_dict_from_llama4(state_dict_to_llama4(state_dict))
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)
    reference = Llama4ForCausalLM(llama4_config)
    reference.load_state_dict(state_dict_to_llama4(state_dict), strict=True)


ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "num_local_experts",
    "num_experts_per_tok", "moe_layers", "use_qk_norm", "no_rope_layers", "attention_chunk_size", "layer_types",
    "attn_temperature_tuning", "floor_scale", "attn_scale", "attention_bias",
)  # fmt: skip


def test_scout_preset_has_the_architecture_of_transformers_llama4_defaults():
    converted = text_config_to_llama4(Llama4XTextConfig.from_preset("scout"))
    default = Llama4TextConfig()
    for field in ARCHITECTURE_FIELDS:
        assert getattr(converted, field) == getattr(default, field), field


def test_maverick_preset_converts_to_meta_maverick_architecture():
    converted = text_config_to_llama4(Llama4XTextConfig.from_preset("maverick"))
    scout = Llama4TextConfig()
    assert converted.num_local_experts == 128
    assert converted.moe_layers == list(range(1, 48, 2))
    assert converted.use_qk_norm is False
    differing = {"num_local_experts", "moe_layers", "use_qk_norm"}
    for field in set(ARCHITECTURE_FIELDS) - differing:
        assert getattr(converted, field) == getattr(scout, field), field


@pytest.mark.parametrize(
    "field, value",
    [("router_score_func", "softmax"), ("num_shared_experts", 2), ("use_qk_norm", "rms"), ("norm_placement", "post")],
)
def test_configs_llama4_cannot_express_are_refused_naming_the_field(field, value):
    config = text_config_from_llama4(llama4_text_config())
    with pytest.raises(ValueError, match=field):
        text_config_to_llama4(Llama4XTextConfig(**{**config.to_dict(), field: value}))


def test_checkpoint_folder_converts_shard_by_shard_and_loads_with_auto_classes(tmp_path):
    reference, _ = converted_pair()
    reference.save_pretrained(tmp_path / "llama4", max_shard_size="50KB")
    assert len(list((tmp_path / "llama4").glob("*.safetensors"))) > 1
    converted = convert_checkpoint(tmp_path / "llama4", tmp_path / "llama4x")
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert isinstance(model, Llama4XForCausalLM)
    input_ids = random_ids(1, 20)
    with torch.no_grad():
        diff = (model(input_ids=input_ids).logits - reference(input_ids=input_ids).logits).abs().max().item()
    assert diff < 1e-5, f"max diff {diff}"
    back = AutoModelForCausalLM.from_pretrained(convert_checkpoint(converted, tmp_path / "back"))
    assert isinstance(back, Llama4ForCausalLM)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_checkpoint_conversion_casts_the_weights_to_the_requested_dtype(tmp_path):
    _, model = converted_pair()
    model.save_pretrained(tmp_path / "x")
    converted = convert_checkpoint(tmp_path / "x", tmp_path / "l4", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(converted)
    assert loaded.config.dtype == torch.bfloat16
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_checkpoint_conversion_keeps_the_source_dtype_both_ways(tmp_path):
    reference, _ = converted_pair()
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "llama4")
    converted = convert_checkpoint(tmp_path / "llama4", tmp_path / "llama4x")
    back = convert_checkpoint(converted, tmp_path / "back")
    for folder in (converted, back):
        assert AutoConfig.from_pretrained(folder).dtype == torch.bfloat16, folder.name
        assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16, folder.name


def test_checkpoint_conversion_refuses_bad_folders(tmp_path):
    reference, _ = converted_pair()
    reference.save_pretrained(tmp_path / "llama4")
    with pytest.raises(ValueError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert'"):
        convert_checkpoint(tmp_path / "other", tmp_path / "out")
    with pytest.raises(ValueError, match="must not be the input folder"):
        convert_checkpoint(tmp_path / "llama4", tmp_path / "llama4")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(tmp_path / "llama4", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
    convert_checkpoint(tmp_path / "llama4", tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists()
    assert not list(tmp_path.glob(".*partial*")), "no staging folder is left behind"


def test_overwrite_never_deletes_an_input_inside_the_output_folder(tmp_path):
    reference, _ = converted_pair()
    reference.save_pretrained(tmp_path / "runs" / "llama4")
    with pytest.raises(ValueError, match="must not be the input folder .*llama4 or contain it"):
        convert_checkpoint(tmp_path / "runs" / "llama4", tmp_path / "runs", overwrite=True)
    assert (tmp_path / "runs" / "llama4" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="must not lie inside the input folder"):
        convert_checkpoint(tmp_path / "runs" / "llama4", tmp_path / "runs" / "llama4" / "x", overwrite=True)


def test_failed_conversion_leaves_no_output(tmp_path):
    reference, _ = converted_pair()
    reference.save_pretrained(tmp_path / "llama4")
    (tmp_path / "llama4" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error for a corrupt file)
        convert_checkpoint(tmp_path / "llama4", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*partial*"))


def llama4_multimodal_config(vision_overrides: dict | None = None, **text_overrides) -> Llama4Config:
    vision = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "image_size": 32, "patch_size": 8, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 64,
        "projector_output_dim": 64, "vision_output_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **(vision_overrides or {}),
    }  # fmt: skip
    return Llama4Config(
        text_config=llama4_text_config(**text_overrides).to_dict(),
        vision_config=vision,
        image_token_index=6,
        boi_token_index=4,
        eoi_token_index=5,
    )


def llama4_multimodal_logits(model, input_ids, pixel_values) -> torch.Tensor:
    """The logits of transformers' `Llama4ForConditionalGeneration.forward`. Some releases (5.24) fail after
    computing them, building the output dataclass from a field the language model does not return
    (`image_outputs`); the logits are taken from the language model's output on the way."""
    captured = {}
    hook = model.language_model.register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        return model(input_ids=input_ids, pixel_values=pixel_values).logits
    except AttributeError as error:
        if "image_outputs" not in str(error):
            raise
        return captured["out"].logits
    finally:
        hook.remove()


# Llama 4's vision encoder hard-codes exact GELU and LayerNorm eps 1e-5 whatever these fields say.
VISION_CONFIGS = {
    "published": {},
    "norm_eps_llama4_ignores": {"norm_eps": 0.1},
    "hidden_act_llama4_ignores": {"hidden_act": "relu"},
}


@pytest.mark.parametrize("vision_overrides", VISION_CONFIGS.values(), ids=VISION_CONFIGS.keys())
def test_llama4_multimodal_logits_match_after_conversion_on_a_several_tile_prompt(vision_overrides):
    torch.manual_seed(0)
    reference = Llama4ForConditionalGeneration(llama4_multimodal_config(vision_overrides)).eval()
    randomize_to_unit_scale(reference.vision_model, seed=1)
    model = Llama4XForConditionalGeneration(config_from_llama4(reference.config)).eval()
    model.load_state_dict(state_dict_from_llama4(reference.state_dict()), strict=True)
    tiles, tokens_per_tile = 3, model.config.vision_config.tokens_per_tile
    text = random_ids(1, 10)
    image = torch.full((1, tiles * tokens_per_tile), 6)
    input_ids = torch.cat([text[:, :4], torch.tensor([[4]]), image, torch.tensor([[5]]), text[:, 4:]], dim=1)
    pixel_values = torch.randn(tiles, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = llama4_multimodal_logits(reference, input_ids, pixel_values)
        actual = model(input_ids=input_ids, pixel_values=pixel_values).logits
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5), f"max diff {diff}"
    with torch.no_grad():
        other_image = model(input_ids=input_ids, pixel_values=pixel_values.flip(0)).logits
    assert not torch.allclose(other_image, actual, atol=1e-4), "the image must influence the logits"


def test_multimodal_round_trip_and_checkpoint_folder_conversion(tmp_path):
    torch.manual_seed(0)
    reference = Llama4ForConditionalGeneration(llama4_multimodal_config()).eval()
    reference.save_pretrained(tmp_path / "llama4")
    converted = convert_checkpoint(tmp_path / "llama4", tmp_path / "llama4x")
    model = AutoModelForImageTextToText.from_pretrained(converted)
    assert isinstance(model, Llama4XForConditionalGeneration)
    back = convert_checkpoint(converted, tmp_path / "back")
    restored = AutoModelForImageTextToText.from_pretrained(back)
    assert isinstance(restored, Llama4ForConditionalGeneration)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert (
        config_to_llama4(model.config).to_diff_dict()["vision_config"]
        == reference.config.to_diff_dict()["vision_config"]
    )


@pytest.mark.parametrize(
    "field, value",
    [("norm_eps", 1e-6), ("hidden_act", "gelu_pytorch_tanh"), ("intermediate_size", 64), ("projector_input_dim", 48)],
)
def test_vision_settings_llama4_hard_codes_are_refused_naming_the_field(field, value):
    """The last two: Llama 4 sizes its vision adapter with them (by hidden_size / r**2 and projector_output_dim)."""
    with pytest.raises(ValueError, match=field):
        config_to_llama4(tiny_multimodal_config(vision_overrides={field: value}))


def test_tied_lm_head_of_a_multimodal_checkpoint_stays_tied_both_ways(tmp_path):
    # Llama 4 ties its head by `text_config.tie_word_embeddings` (the head lives in its text model), llama4x by the
    # composite config's flag; the tied head is not saved, so a flag lost in conversion leaves it random.
    torch.manual_seed(0)
    reference = Llama4ForConditionalGeneration(llama4_multimodal_config(tie_word_embeddings=True)).eval()
    reference.save_pretrained(tmp_path / "llama4")
    model = AutoModelForImageTextToText.from_pretrained(convert_checkpoint(tmp_path / "llama4", tmp_path / "x")).eval()
    back = AutoModelForImageTextToText.from_pretrained(convert_checkpoint(tmp_path / "x", tmp_path / "back")).eval()
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        expected = llama4_multimodal_logits(reference, input_ids, None)
        actual = {
            "llama4x": model(input_ids=input_ids).logits,
            "back": llama4_multimodal_logits(back, input_ids, None),
        }
    for name, logits in actual.items():
        diff = (logits - expected).abs().max().item()
        assert diff < 1e-5, f"{name}: max diff {diff}"


def test_tied_lm_head_of_a_llama4x_multimodal_checkpoint_stays_tied_in_llama4(tmp_path):
    config = tiny_multimodal_config()
    torch.manual_seed(0)
    model = Llama4XForConditionalGeneration(Llama4XConfig(**{**config.to_dict(), "tie_word_embeddings": True})).eval()
    assert not config.text_config.tie_word_embeddings, "only the composite flag ties llama4x's head"
    model.save_pretrained(tmp_path / "x")
    back = AutoModelForImageTextToText.from_pretrained(convert_checkpoint(tmp_path / "x", tmp_path / "llama4")).eval()
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        diff = (llama4_multimodal_logits(back, input_ids, None) - model(input_ids=input_ids).logits).abs().max().item()
    assert diff < 1e-5, f"max diff {diff}"


def test_scout_preset_vision_converts_to_meta_published_vision_architecture():
    vision = config_to_llama4(Llama4XConfig.from_preset("scout")).vision_config
    published = {
        "hidden_size": 1408, "num_hidden_layers": 34, "num_attention_heads": 16, "intermediate_size": 5632,
        "image_size": 336, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
        "projector_output_dim": 4096, "vision_output_dim": 4096,
    }  # fmt: skip
    assert {k: getattr(vision, k) for k in published} == published


def test_convert_command_and_script_convert_a_saved_folder(tmp_path):
    reference, _ = converted_pair()
    reference.save_pretrained(tmp_path / "llama4")
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_llama4_checkpoint.py"
    result = subprocess.run(
        [sys.executable, str(script), "--input", str(tmp_path / "llama4"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), Llama4XForCausalLM)
    assert main(["convert", "--input", str(tmp_path / "llama4"), "--output", str(tmp_path / "out")]) != 0
    assert (
        main(["convert", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "back"), "--dtype", "bfloat16"])
        == 0
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back").dtype == torch.bfloat16


# transformers' Llama 4 processor needs torchvision, so its files are written as published (Llama 4 Scout's settings).
LLAMA4_PROCESSOR_CONFIG = {
    "processor_class": "Llama4Processor", "patch_size": 14, "pixel_shuffle_ratio": 0.5, "fake_image_token": "<|image|>",
    "image_token": "<|image|>", "start_of_image_token": "<|image_start|>", "end_of_image_token": "<|image_end|>",
    "patch_token": "<|patch|>", "tile_x_separator_token": "<|tile_x_separator|>",
    "tile_y_separator_token": "<|tile_y_separator|>",
}  # fmt: skip
LLAMA4_PREPROCESSOR_CONFIG = {
    "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
    "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Llama4ImageProcessorFast", "image_std": [0.5, 0.5, 0.5],
    "input_data_format": None, "max_patches": 16, "processor_class": "Llama4Processor", "resample": 2,
    "rescale_factor": 0.00392156862745098, "resize_to_max_canvas": False, "return_tensors": None,
    "size": {"height": 336, "width": 336},
}  # fmt: skip


def test_processor_files_convert_to_the_other_familys_classes_both_ways(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from llama4x import Llama4XImageProcessor, Llama4XProcessor
    from llama4x.data import python_docs_texts
    from llama4x.tokenization import train_tokenizer

    torch.manual_seed(0)
    source = tmp_path / "llama4"
    Llama4ForConditionalGeneration(llama4_multimodal_config()).save_pretrained(source)
    tokenizer = train_tokenizer(python_docs_texts()[:5], vocab_size=600)
    tokenizer.save_pretrained(source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "processor_class": "Llama4Processor"})
    )
    (source / "processor_config.json").write_text(json.dumps(LLAMA4_PROCESSOR_CONFIG))
    (source / "preprocessor_config.json").write_text(json.dumps(LLAMA4_PREPROCESSOR_CONFIG))

    converted = convert_checkpoint(source, tmp_path / "llama4x")
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(processor, Llama4XProcessor) and isinstance(processor.image_processor, Llama4XImageProcessor)
    expected = Llama4XProcessor(image_processor=Llama4XImageProcessor(), tokenizer=tokenizer)
    image = Image.new("RGB", (700, 400), (200, 30, 90))
    inputs = processor(text="<|image|> a red image", images=[image], return_tensors="pt")
    wanted = expected(text="<|image|> a red image", images=[image], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], wanted["input_ids"])
    assert torch.equal(inputs["pixel_values"], wanted["pixel_values"])

    processor.save_pretrained(converted)  # as llama4x writes it: auto_map, nested image-processor settings
    back = convert_checkpoint(converted, tmp_path / "back")
    for name in ("processor_config.json", "tokenizer_config.json"):
        settings = json.loads((back / name).read_text())
        assert settings["processor_class"] == "Llama4Processor" and "auto_map" not in settings, name
    image_settings = json.loads((back / "processor_config.json").read_text())["image_processor"]
    assert image_settings["image_processor_type"] == "Llama4ImageProcessor" and "auto_map" not in image_settings


def test_index_of_a_cast_checkpoint_counts_the_new_sizes(tmp_path):
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(llama4_multimodal_config()).save_pretrained(
        tmp_path / "llama4", max_shard_size="20KB"
    )
    converted = convert_checkpoint(tmp_path / "llama4", tmp_path / "bf16", dtype=torch.bfloat16)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    sizes = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(converted / shard, framework="pt") as reader:
            sizes += sum(reader.get_tensor(name).nbytes for name in reader.keys())
    assert index["metadata"]["total_size"] == sizes
