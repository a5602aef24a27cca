"""Early fusion: image features land at the image-token positions; batching, caching, saving and training agree."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForImageTextToText

from llama4x import Llama4XConfig, Llama4XForConditionalGeneration, Llama4XModel
from llama4x.tokenization import SPECIAL_TOKENS
from tiny import (
    BOI_ID,
    EOI_ID,
    FIRST_TEXT_ID,
    IMAGE_ID,
    run_without_llama4x,
    tiny_multimodal_config,
    tiny_multimodal_model,
)

VOCAB = 97  # tiny_text_config's vocab_size
SUPPRESS = [BOI_ID, EOI_ID, IMAGE_ID]  # generated image placeholders would have no image behind them


def text(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TEXT_ID, VOCAB, (length,), generator=generator).tolist()


def image(num_tiles: int, tokens_per_tile: int) -> list[int]:
    return [BOI_ID] + [IMAGE_ID] * (num_tiles * tokens_per_tile) + [EOI_ID]


def tiles(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` and the `position_ids` `generate` would give (positions count real tokens)."""
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def one_image_prompt(model, num_tiles: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens_per_tile = model.config.vision_config.tokens_per_tile
    row = text(3, seed) + image(num_tiles, tokens_per_tile) + text(5, seed + 1)
    return torch.tensor([row]), tiles(num_tiles, seed)


# --- fusion --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["encoder", "patch"])
def test_forward_and_backward_reach_the_vision_front_end_and_the_decoder(fusion):
    model = tiny_multimodal_model(fusion).train()
    input_ids, pixel_values = one_image_prompt(model)
    labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (1, input_ids.shape[1], VOCAB)
    assert out.image_hidden_states.shape == (2, model.config.vision_config.tokens_per_tile, 32)
    out.loss.backward()
    named = dict(model.named_parameters())
    checked = ["model.multi_modal_projector.weight", "model.language_model.embed_tokens.weight", "lm_head.weight"]
    if fusion == "encoder":
        vision = ["patch_embedding.linear.weight", "layers.0.self_attn.q_proj.weight", "vision_adapter.fc1.weight",
                  "positional_embedding"]  # fmt: skip
        checked += [f"model.vision_model.{name}" for name in vision]
    for name in checked:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("fusion", ["encoder", "patch"])
def test_image_positions_receive_the_projected_features_and_text_positions_the_token_embeddings(fusion):
    model = tiny_multimodal_model(fusion)
    tokens_per_tile = model.config.vision_config.tokens_per_tile
    rows = [text(2, 0) + image(1, tokens_per_tile) + text(3, 1), image(2, tokens_per_tile) + text(2, 2)]
    rows[0] += text(len(rows[1]) - len(rows[0]), 3)
    input_ids, pixel_values = torch.tensor(rows), tiles(3, 0)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values)
        features = model.get_image_features(pixel_values).reshape(-1, 32)  # tiles in batch order
        token_embeds = model.get_input_embeddings()(input_ids)
    hook.remove()
    image_mask = input_ids == IMAGE_ID
    assert torch.equal(seen["embeds"][image_mask], features)
    assert torch.equal(seen["embeds"][~image_mask], token_embeds[~image_mask])
    assert image_mask[0].sum() == tokens_per_tile, "row 0 holds the first tile's features, row 1 the other two"


def test_special_token_ids_of_the_tiny_preset_are_the_tokenizers():
    config = Llama4XConfig.from_preset("tiny")
    assert SPECIAL_TOKENS[config.image_token_id] == "<|patch|>"
    assert SPECIAL_TOKENS[config.boi_token_id] == "<|image_start|>"
    assert SPECIAL_TOKENS[config.eoi_token_id] == "<|image_end|>"


# --- input errors --------------------------------------------------------------------------------------------------

PROMPT = text(2, 0) + image(2, 4) + text(2, 1)  # 8 image tokens: 2 tiles of the tiny encoder
ERROR_CASES = {
    "fewer_tiles_than_placeholders": (PROMPT, tiles(1, 0), "8 image tokens.*4 image features"),
    "more_tiles_than_placeholders": (PROMPT, tiles(3, 0), "8 image tokens.*12 image features"),
    "partial_tile": (text(2, 0) + image(1, 3), tiles(1, 0), "3 image tokens.*4 image features"),
    "pixels_without_image_tokens": (text(6, 0), tiles(1, 0), "no image tokens"),
    "image_tokens_without_pixels": (PROMPT, None, "8 image tokens.*no `pixel_values`"),
    "wrong_channel_count": (PROMPT, torch.zeros(2, 1, 32, 32), "1 channels.*num_channels=3"),
    "wrong_tile_size": (PROMPT, torch.zeros(2, 3, 16, 16), "16x16.*image_size=32"),
    "not_four_dimensional": (PROMPT, torch.zeros(3, 32, 32), "shape"),
    "empty": (PROMPT, torch.zeros(0, 3, 32, 32), "empty"),
    "nan": (PROMPT, tiles(2, 0).index_fill(2, torch.tensor([5]), float("nan")), "NaN"),
    "inf": (PROMPT, tiles(2, 0).index_fill(3, torch.tensor([0]), float("inf")), "infinite"),
    "integer_pixels": (PROMPT, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    "token_id_beyond_vocab": (PROMPT + [VOCAB], tiles(2, 0), f"token id {VOCAB}, outside.*vocab_size={VOCAB}"),
    "negative_token_id": (text(3, 0) + [-1], None, "token id -1, outside"),
}


@pytest.mark.parametrize(("row", "pixel_values", "message"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_inconsistent_image_inputs_raise_value_error(row, pixel_values, message):
    model = tiny_multimodal_model()
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor([row]), pixel_values=pixel_values)


def test_a_tile_split_across_rows_raises_value_error():
    rows = [text(1, 0) + [IMAGE_ID] * 6, text(5, 1) + [IMAGE_ID] * 2]  # 8 tokens: the count of 2 tiles, split 6 + 2
    with pytest.raises(ValueError, match=r"Image tokens per row of `input_ids`: \[6, 2\], not all whole tiles of 4"):
        tiny_multimodal_model()(input_ids=torch.tensor(rows), pixel_values=tiles(2, 0))


def test_pixel_values_with_inputs_embeds_raise_value_error():
    model = tiny_multimodal_model()
    with pytest.raises(ValueError, match=re.escape("`pixel_values` need `input_ids`")):
        model(inputs_embeds=torch.zeros(1, 10, 32), pixel_values=tiles(2, 0))


def test_return_dict_false_gives_the_output_fields_as_a_tuple():
    model = tiny_multimodal_model()
    input_ids, pixel_values = one_image_prompt(model)
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "use_cache": False}
    with torch.no_grad():
        for module, extra in ((model, {"labels": input_ids}), (model.model, {})):
            expected = module(**inputs, **extra).to_tuple()
            actual = module(**inputs, **extra, return_dict=False)
            assert type(actual) is tuple and len(actual) == len(expected), type(module).__name__
            assert all(torch.equal(a, e) for a, e in zip(actual, expected)), type(module).__name__


def test_an_image_token_in_a_decoding_step_is_embedded_like_text():
    model = tiny_multimodal_model()
    input_ids, pixel_values = one_image_prompt(model)
    with torch.no_grad():
        prefill = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
        step = model(input_ids=torch.tensor([[IMAGE_ID]]), cache=cache, use_cache=True)
    assert torch.isfinite(step.logits).all()


# --- batching ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["encoder", "patch"])
def test_mixed_left_padded_batch_gives_each_row_the_logits_it_has_alone(fusion):
    model = tiny_multimodal_model(fusion)
    tpt = model.config.vision_config.tokens_per_tile
    rows = [
        text(9, 0),  # no image
        text(3, 1) + image(2, tpt) + text(4, 2),  # one image of 2 tiles
        text(2, 3) + image(1, tpt) + text(2, 4) + image(3, tpt) + text(3, 5),  # two images: 1 and 3 tiles
    ]
    row_tiles = [tiles(0, 0), tiles(2, 1), torch.cat([tiles(1, 2), tiles(3, 3)])]
    input_ids, attention_mask, position_ids = left_pad(rows)
    with torch.no_grad():
        batched = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=torch.cat(row_tiles),
        ).logits
        for index, (row, pixel_values) in enumerate(zip(rows, row_tiles)):
            alone = model(input_ids=torch.tensor([row]), pixel_values=pixel_values if len(pixel_values) else None)
            diff = (batched[index, -len(row) :] - alone.logits[0]).abs().max().item()
            assert diff < 1e-5, f"row {index}: max logit diff {diff}"


# --- generation ----------------------------------------------------------------------------------------------------


def greedy(model, use_cache: bool, **inputs):
    return model.generate(
        **inputs,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        suppress_tokens=SUPPRESS,
    )


def record_pixel_values(model) -> tuple[list[bool], torch.utils.hooks.RemovableHandle]:
    calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("pixel_values") is not None), with_kwargs=True
    )
    return calls, hook


def test_cached_generation_with_images_equals_recomputation_and_sees_pixels_only_in_prefill():
    model = tiny_multimodal_model()
    rows = [text(3, 0) + image(2, 4) + text(8, 1), text(2, 2) + image(1, 4) + text(4, 3)]
    input_ids, attention_mask, _ = left_pad(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tiles(3, 0)}
    calls, hook = record_pixel_values(model)
    cached = greedy(model, use_cache=True, **inputs)
    cached_calls = list(calls)
    calls.clear()
    recomputed = greedy(model, use_cache=False, **inputs)
    hook.remove()
    assert cached_calls == [True] + [False] * 9, cached_calls
    assert calls == [True] * 10, "without a cache every step re-reads the image"
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, recomputed.logits)):
        diff = (a - b).abs().max().item()
        assert diff < 1e-5, f"step {step}: max logit diff {diff}"
    assert len(set(cached.sequences[0, input_ids.shape[1] :].tolist())) > 1, "degenerate generation"


def test_a_cached_second_turn_with_a_new_image_equals_recomputing_the_conversation():
    """Chat continuation: generate again on the whole conversation with the first turn's cache and the new image's
    tiles only; the result equals a cache-free run over the conversation with every image. Passing the cached
    image's tiles again is an error that says what to pass."""
    from transformers import DynamicCache

    model = tiny_multimodal_model()
    first_ids = torch.tensor([text(3, 0) + image(1, 4) + text(4, 1)])
    first_tiles, second_tiles = tiles(1, 0), tiles(2, 1)
    cache = DynamicCache(config=model.config)
    first = greedy(model, use_cache=True, input_ids=first_ids, pixel_values=first_tiles, past_key_values=cache)
    conversation = torch.cat([first.sequences, torch.tensor([text(2, 2) + image(2, 4) + text(3, 3)])], dim=1)

    continued = greedy(model, use_cache=True, input_ids=conversation, pixel_values=second_tiles, past_key_values=cache)
    all_tiles = torch.cat([first_tiles, second_tiles])
    recomputed = greedy(model, use_cache=False, input_ids=conversation, pixel_values=all_tiles)
    assert torch.equal(continued.sequences, recomputed.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(continued.logits, recomputed.logits))
    assert diff < 1e-5, f"max logit diff {diff}"

    cache = DynamicCache(config=model.config)
    greedy(model, use_cache=True, input_ids=first_ids, pixel_values=first_tiles, past_key_values=cache)
    cached = first.sequences.shape[1] - 1  # the last generated token was never fed back
    with pytest.raises(ValueError, match=rf"tokens after the cache \({cached} cached; pass only their images\) "
                                         r"contain 8 image tokens .* 12 image features"):  # fmt: skip
        greedy(model, use_cache=True, input_ids=conversation, pixel_values=all_tiles, past_key_values=cache)


def test_static_cache_generation_with_images_equals_the_dynamic_cache():
    model = tiny_multimodal_model()
    input_ids, pixel_values = one_image_prompt(model)
    dynamic = greedy(model, use_cache=True, input_ids=input_ids, pixel_values=pixel_values)
    static = greedy(
        model, use_cache=True, input_ids=input_ids, pixel_values=pixel_values, cache_implementation="static"
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(static.logits, dynamic.logits))
    assert diff < 1e-5, f"max logit diff {diff}"


def test_beam_search_scores_each_beam_with_its_own_rows_tiles():
    """Beam search repeats every row; a row's tiles must follow it. Reference: each returned beam's score is the mean
    log-probability of its new tokens in a plain forward pass over the row's own tiles."""
    model = tiny_multimodal_model()
    rows = [text(3, 0) + image(2, 4) + text(3, 1), text(7, 2) + image(1, 4) + text(3, 3)]  # same length, no padding
    row_tiles = [tiles(2, 1), tiles(1, 2)]
    beams = model.generate(
        input_ids=torch.tensor(rows), pixel_values=torch.cat(row_tiles), max_new_tokens=4, min_new_tokens=4,
        num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    prompt_length = len(rows[0])
    for index, sequence in enumerate(beams.sequences):
        row = index // 2
        with torch.no_grad():
            logprobs = model(input_ids=sequence[None], pixel_values=row_tiles[row]).logits[0].log_softmax(-1)
        new_tokens = sequence[prompt_length:]
        expected = logprobs[prompt_length - 1 : -1].gather(-1, new_tokens[:, None]).mean()
        diff = abs(beams.sequences_scores[index].item() - expected.item())
        assert diff < 1e-4, f"beam {index} (row {row}): score off by {diff}"


# --- checkpoints and classes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["encoder", "patch"])
def test_save_pretrained_round_trips_through_auto_model_for_image_text_to_text(tmp_path, fusion):
    model = tiny_multimodal_model(fusion)
    input_ids, pixel_values = one_image_prompt(model)
    model.save_pretrained(tmp_path)
    restored = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()  # the head checkpoint also loads into the base model
    assert type(restored) is Llama4XForConditionalGeneration and type(base) is Llama4XModel
    assert restored.config.vision_config.fusion == fusion
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_multimodal.Llama4XForConditionalGeneration"
    with torch.no_grad():
        pairs = {
            "logits": (restored(input_ids=input_ids, pixel_values=pixel_values).logits,
                       model(input_ids=input_ids, pixel_values=pixel_values).logits),
            "base hidden states": (base(input_ids=input_ids, pixel_values=pixel_values).last_hidden_state,
                                   model.model(input_ids=input_ids, pixel_values=pixel_values).last_hidden_state),
        }  # fmt: skip
    for name, (actual, expected) in pairs.items():
        # Same weights in freshly allocated memory can take other SIMD paths on the CPU: last-bit differences only.
        diff = (actual - expected).abs().max().item()
        assert diff < 1e-6, f"{name}: max diff {diff}"


def test_image_text_to_text_pipeline_answers_a_batch_as_each_prompt_alone(tmp_path):
    """llama4x's tokenizers pad on the left, so a batch of prompts generates as each does alone (right padding,
    transformers' default, does not: the shorter prompt would continue after its padding)."""
    from PIL import Image
    from transformers import pipeline

    from llama4x import Llama4XImageProcessor, Llama4XProcessor
    from llama4x.data import python_docs_texts
    from llama4x.tokenization import train_tokenizer

    tokenizer = train_tokenizer(python_docs_texts()[:5], vocab_size=400)
    processor = Llama4XProcessor(Llama4XImageProcessor(size=32), tokenizer, patch_size=8, pixel_shuffle_ratio=0.5)
    ids = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = tiny_multimodal_config(vocab_size=len(tokenizer), **ids)
    for name, token in (
        ("image_token_id", "<|patch|>"),
        ("boi_token_id", "<|image_start|>"),
        ("eoi_token_id", "<|image_end|>"),
    ):
        setattr(config, name, tokenizer.convert_tokens_to_ids(token))
    torch.manual_seed(0)
    Llama4XForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    images = [[Image.new("RGB", (40, 30), (200, 30, 30))], [Image.new("RGB", (20, 70), (30, 30, 200))] * 2]
    texts = ["<|image|> what", "<|image|><|image|> two and more words here"]
    kwargs = {"generate_kwargs": {"max_new_tokens": 6, "do_sample": False}, "return_full_text": False}
    alone = [pipe(images=i, text=t, **kwargs)[0]["generated_text"] for t, i in zip(texts, images)]
    batched = pipe(images=images, text=texts, batch_size=2, **kwargs)
    assert [answer["generated_text"] for answer in batched] == alone


def test_a_vocabulary_shrunk_below_a_special_token_is_not_saved(tmp_path):
    """The config check that refuses such a folder at load time runs before the save: no unloadable folder."""
    model = tiny_multimodal_model()
    model.resize_token_embeddings(IMAGE_ID)
    with pytest.raises(ValueError, match=rf"Not saved to .*`image_token_index` .*={IMAGE_ID}: expected a token id"):
        model.save_pretrained(tmp_path / "shrunk")
    assert not (tmp_path / "shrunk").exists()


def test_saved_folder_loads_with_trust_remote_code_without_llama4x(tmp_path):
    model = tiny_multimodal_model()
    input_ids, pixel_values = one_image_prompt(model)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.save({"input_ids": input_ids, "pixel_values": pixel_values, "expected": expected}, tmp_path / "data.pt")
    stdout = run_without_llama4x(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        data = torch.load({str(tmp_path / "data.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"]).logits
        diff = (logits - data["expected"]).abs().max().item()
        assert diff <= 1e-6, diff
        print("REMOTE-OK", type(model).__module__)
        """
    )
    assert "REMOTE-OK transformers_modules" in stdout


def test_base_model_prefix_names_the_base_model_and_layers_stay_whole():
    model = tiny_multimodal_model()
    assert getattr(model, model.base_model_prefix) is model.model is model.base_model
    assert {"Llama4XDecoderLayer", "Llama4XVisionEncoderLayer"} <= set(model._no_split_modules)


# --- training ------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_covers_the_vision_layers_and_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_multimodal_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.vision_model.layers[0].gradient_checkpointing
        input_ids, pixel_values = one_image_prompt(model)
        model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        diff = (grad - grads[1][name]).abs().max().item()
        assert diff < 1e-6, f"{name}: max diff {diff}"


def test_reentrant_gradient_checkpointing_reaches_vision_layers_behind_a_frozen_patch_embedding():
    """Adapters train a few weights of a frozen model; reentrant checkpointing (PEFT's k-bit preparation) passes
    gradients into a checkpointed layer only if its input requires them, which `enable_input_require_grads` arranges
    through each sub-model's `get_input_embeddings`. Reference: the same gradient without checkpointing."""
    trained = "model.vision_model.layers.1.self_attn.q_proj.weight"
    grads = []
    for checkpointing in (False, True):
        model = tiny_multimodal_model().train()
        for name, param in model.named_parameters():
            param.requires_grad_(name == trained)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        input_ids, pixel_values = one_image_prompt(model)
        model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
        grads.append(model.get_parameter(trained).grad)
    assert grads[1] is not None, f"no gradient reaches {trained} through reentrant checkpointing"
    diff = (grads[0] - grads[1]).abs().max().item()
    assert grads[0].abs().sum() > 0 and diff < 1e-6, f"max diff {diff}"


def test_loss_adds_the_weighted_balancing_losses():
    model = tiny_multimodal_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    input_ids, pixel_values = one_image_prompt(model)
    labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    logits = out.logits[:, :-1].double()
    lm_loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected = lm_loss + 0.1 * out.aux_loss.double() + 0.01 * out.z_loss.double()
    assert out.aux_loss > 0 and out.z_loss > 0
    assert abs(out.loss.item() - expected.item()) < 1e-5, f"loss {out.loss.item()} vs {expected.item()}"


def train_on_two_answers(fusion: str, pixel_values: torch.Tensor, steps: int = 30) -> list[float]:
    """Few AdamW steps on two examples with the same text, one tile each, and different answer tokens."""
    model = tiny_multimodal_model(fusion).train()
    prompt = text(2, 0) + image(1, model.config.vision_config.tokens_per_tile)
    input_ids = torch.tensor([prompt + [10], prompt + [11]])
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fusion", ["encoder", "patch"])
def test_training_learns_an_answer_only_the_image_determines(fusion):
    """With two random images the loss falls far below log(2); with one image shown twice it cannot (the inputs are
    then identical and the best is 50/50), so the fall comes from reading the image."""
    losses = train_on_two_answers(fusion, tiles(2, 7))
    assert losses[-1] < 0.1 < losses[0], f"losses {losses[0]:.3f} -> {losses[-1]:.3f}"
    same_image = train_on_two_answers(fusion, tiles(1, 7).expand(2, -1, -1, -1))
    assert same_image[-1] > 0.6, f"identical inputs reached loss {same_image[-1]:.3f} < log(2)"


def test_tiny_multimodal_config_builds_through_auto_model_for_image_text_to_text():
    model = AutoModelForImageTextToText.from_config(tiny_multimodal_config("patch"))
    assert type(model) is Llama4XForConditionalGeneration
    assert type(AutoModel.from_config(tiny_multimodal_config())) is Llama4XModel
