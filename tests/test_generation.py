"""Generation: the KV cache (chunked layers keep one chunk) gives the same tokens and logits as recomputation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache

from tiny import random_ids, tiny_model

CHUNK = 8  # tiny_text_config's attention_chunk_size


def _left_padded_batch():
    """Two prompts of 30 and 25 tokens (> 3 chunks), the shorter one left-padded."""
    input_ids = random_ids(2, 30, seed=1)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :5], attention_mask[1, :5] = 0, 0
    return input_ids, attention_mask


def _greedy(model, input_ids, attention_mask, use_cache, max_new_tokens=12):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_cached_generation_equals_full_recompute_with_left_padding(kernel):
    model = tiny_model(use_scalable_softmax=True)
    model.set_attn_implementation(kernel)
    input_ids, attention_mask = _left_padded_batch()
    assert input_ids.shape[1] > 3 * CHUNK
    cached = _greedy(model, input_ids, attention_mask, use_cache=True)
    recomputed = _greedy(model, input_ids, attention_mask, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, recomputed.logits)):
        diff = (a - b).abs().max().item()
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"step {step}: max logit diff {diff}"
    assert len(set(cached.sequences[0, 30:].tolist())) > 1, "degenerate generation makes the comparison weak"


def test_left_padded_row_generates_like_the_prompt_alone():
    model = tiny_model()
    input_ids, attention_mask = _left_padded_batch()
    batched = _greedy(model, input_ids, attention_mask, use_cache=True)
    alone = _greedy(model, input_ids[1:, 5:], attention_mask[1:, 5:], use_cache=True)
    assert torch.equal(batched.sequences[1, 30:], alone.sequences[0, 25:])


@pytest.mark.parametrize("overrides", [{}, {"use_scalable_softmax": True, "attn_temperature_tuning": False}])
@pytest.mark.parametrize("padding_positions", ["cumsum", "shifted"])
def test_negative_position_ids_on_padding_leave_the_real_tokens_as_alone(overrides, padding_positions):
    """Users build position ids from the mask: padding gets -1 (`cumsum - 1`) or counts down below 0 (`arange` shifted
    by the padding). Temperature tuning's log1p and Scalable-Softmax's log(keys seen) must not turn those into NaN."""
    model = tiny_model(**overrides)
    input_ids, attention_mask = _left_padded_batch()
    if padding_positions == "cumsum":
        position_ids = attention_mask.cumsum(-1) - 1
    else:
        position_ids = torch.arange(input_ids.shape[1]) - (attention_mask == 0).sum(-1, keepdim=True)
    assert position_ids[1, :5].lt(0).all()
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        alone = model(input_ids=input_ids[1:, 5:]).logits
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[1, 5:], alone[0], atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """The most elements any operator output while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_prefill_builds_no_sequence_by_sequence_mask_for_chunked_layers(padded):
    """Every layer chunked: a prefill of S tokens needs no (S, S) tensor, with a static cache as with a dynamic one."""
    model = tiny_model(no_rope_layer_interval=0, num_hidden_layers=2, max_position_embeddings=1024)
    input_ids = random_ids(1, 512)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :7] = int(not padded)
    kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0, "attention_mask": attention_mask}
    for cache in ("dynamic", "static"):
        with torch.no_grad(), LargestTensor() as largest:
            model.generate(input_ids, cache_implementation=cache, **kwargs)
        assert largest.numel < 512 * 512 // 4, f"{cache} cache: a tensor of {largest.numel} elements"


def test_chunked_layers_cache_at_most_one_chunk():
    model = tiny_model()
    input_ids = random_ids(1, 5 * CHUNK + 3)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, DynamicCache)
    for layer_idx, layer_type in enumerate(model.config.layer_types):
        keys = cache.layers[layer_idx].keys
        if layer_type == "chunked_attention":
            assert keys.shape[-2] < CHUNK, f"layer {layer_idx} keeps {keys.shape[-2]} keys"
        else:
            assert keys.shape[-2] == input_ids.shape[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": True, "top_k": 10, "temperature": 0.8},
        {"num_beams": 3, "do_sample": False},
    ],
    ids=["sampling", "beam_search"],
)
def test_sampling_and_beam_search_run_with_the_cache(kwargs):
    model = tiny_model()
    input_ids, attention_mask = _left_padded_batch()
    torch.manual_seed(0)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, pad_token_id=0, **kwargs
    )
    assert out.shape == (2, 36)
    assert out[:, 30:].max() < model.config.vocab_size


def test_beam_search_with_cache_equals_beam_search_without():
    model = tiny_model()
    input_ids, attention_mask = _left_padded_batch()
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
    recomputed = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_compiled_static_cache_decoding_matches_eager_decoding():
    """`generate` with a static cache under `torch.compile(fullgraph=True)`: no graph break anywhere in the model
    (the MoE included), the same tokens and logits as eager decoding with the dynamic cache. transformers compiles
    only on accelerators unless `_compile_all_devices` is set, as here to run on CPU (the prompt crosses a chunk)."""
    from transformers import CompileConfig

    model = tiny_model(seed=2)
    input_ids, attention_mask = _left_padded_batch()
    eager = _greedy(model, input_ids, attention_mask, use_cache=True, max_new_tokens=6)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    compiled = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        cache_implementation="static", compile_config=compile_config,
    )  # fmt: skip
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(compiled.sequences, eager.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(compiled.logits, eager.logits))
    assert diff < 1e-4, f"compiled logits differ by {diff:.3e}"


def _dense_draft() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "assistance",
    [
        lambda: {"assistant_model": tiny_model(seed=1, num_hidden_layers=2)},
        lambda: {"assistant_model": _dense_draft()},
        lambda: {"prompt_lookup_num_tokens": 3},
    ],
    ids=["llama4x-draft", "dense-llama-draft", "prompt-lookup"],
)
def test_assisted_decoding_gives_the_greedy_tokens(assistance):
    """Speculative decoding rolls the cache back after every rejected draft token, chunked layers (one chunk kept)
    included: across three chunk boundaries it must still give exactly the plain greedy tokens."""
    model = tiny_model()
    input_ids = random_ids(1, 20, seed=4)
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        greedy = model.generate(input_ids=input_ids, **kwargs)
        assisted = model.generate(input_ids=input_ids, **kwargs, **assistance())
    assert torch.equal(assisted, greedy), (assisted, greedy)
