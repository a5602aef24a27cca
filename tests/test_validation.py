"""Bad inputs fail early with errors that name the problem; fuzzed configs and router inputs behave."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from llama4x import Llama4XForCausalLM, Llama4XTextConfig
from llama4x.moe import route
from tiny import needs_packed_chunked_masks, random_ids, tiny_model, tiny_text_config


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(
    "make_inputs, error, message",
    [
        (lambda: {"input_ids": torch.tensor([[5, 97, 3]])}, ValueError, "token id 97, outside \\[0, vocab_size=97\\)"),
        (lambda: {"input_ids": torch.tensor([[5, -1, 3]])}, ValueError, "token id -1"),
        (lambda: {"input_ids": torch.tensor([[5.0, 6.0]])}, TypeError, "integer token ids"),
        (lambda: {"input_ids": torch.tensor([5, 6, 7])}, ValueError, "\\(batch, sequence\\)"),
        (
            lambda: {"input_ids": random_ids(2, 6), "attention_mask": torch.ones(2, 5, dtype=torch.long)},
            ValueError,
            "attention_mask. has shape \\(2, 5\\); expected .* = \\(2, 6\\)",
        ),
        (lambda: {"input_ids": random_ids(1, 257)}, ValueError, "257 tokens .* max_position_embeddings=256"),
        (lambda: {"inputs_embeds": torch.full((1, 4, 32), float("inf"))}, ValueError, "NaN or infinite"),
        (lambda: {"inputs_embeds": torch.zeros(1, 4, 31)}, ValueError, "hidden_size=32"),
        (lambda: {}, ValueError, "exactly one of `input_ids` and `inputs_embeds`"),
    ],
    ids=[
        "id_too_large",
        "negative_id",
        "float_ids",
        "1d_ids",
        "mask_length",
        "too_long",
        "inf_embeds",
        "width",
        "none",
    ],
)
def test_bad_inputs_raise_errors_naming_the_problem(model, make_inputs, error, message):
    with pytest.raises(error, match=message):
        model(**make_inputs())


def test_a_poisoned_training_batch_is_reported_not_absorbed():
    model = tiny_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    embeds = model.model.embed_tokens(random_ids(2, 8)).detach()
    embeds[1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(inputs_embeds=embeds, labels=random_ids(2, 8)).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters()), "no update happened"


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    heads_kv=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
    experts_topk=st.sampled_from([(4, 1), (4, 2), (8, 2), (8, 4)]),
    chunk=st.one_of(st.none(), st.integers(1, 12)),
    nope_interval=st.integers(0, 3),
    moe_step=st.integers(0, 2),
    qk_norm=st.sampled_from(["none", "l2", "rms"]),
    score=st.sampled_from(["sigmoid", "softmax"]),
    on_input=st.booleans(),
    ssmax=st.booleans(),
    norm=st.sampled_from(["pre", "post"]),
)
def test_valid_configs_always_build_a_model_that_runs(
    layers, heads_kv, experts_topk, chunk, nope_interval, moe_step, qk_norm, score, on_input, ssmax, norm
):
    config = tiny_text_config(
        num_hidden_layers=layers, num_attention_heads=heads_kv[0], num_key_value_heads=heads_kv[1],
        num_local_experts=experts_topk[0], num_experts_per_tok=experts_topk[1], attention_chunk_size=chunk,
        no_rope_layer_interval=nope_interval, interleave_moe_layer_step=moe_step, use_qk_norm=qk_norm,
        router_score_func=score, router_weight_on_input=on_input, use_scalable_softmax=ssmax, norm_placement=norm,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama4XForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(input_ids=random_ids(2, 13)).logits
    assert logits.shape == (2, 13, config.vocab_size) and torch.isfinite(logits).all()


@settings(max_examples=40, deadline=None)
@given(
    field_value=st.sampled_from(
        [
            ("num_experts_per_tok", 0),
            ("num_experts_per_tok", 9),
            ("num_key_value_heads", 3),
            ("attention_chunk_size", 0),
            ("attention_chunk_size", -4),
            ("head_dim", 7),
            ("hidden_size", -1),
            ("moe_layers", [4]),
            ("moe_layers", [-1]),
            ("nope_layers", [9]),
            ("layer_types", ["sliding"] * 4),
            ("use_qk_norm", "layer"),
            ("router_score_func", "relu"),
            ("norm_placement", "middle"),
            ("attention_dropout", 1.0),
            ("n_group", 3),
            ("router_aux_loss_coef", -0.1),
            ("router_jitter_noise", 1.5),
        ]
    ),
)
def test_invalid_configs_raise_value_error_naming_the_field(field_value):
    field, value = field_value
    with pytest.raises(ValueError, match=field):
        tiny_text_config(**{field: value})


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    topk=st.integers(1, 8),
    score=st.sampled_from(["sigmoid", "softmax"]),
    normalise=st.booleans(),
    scaling=st.sampled_from([1.0, 2.5]),
)
def test_router_gives_valid_indices_and_finite_weights_for_any_logits(seed, scale, topk, score, normalise, scaling):
    config = tiny_text_config(
        num_experts_per_tok=topk, router_score_func=score, norm_topk_prob=normalise, routed_scaling_factor=scaling
    )
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)) * scale
    routing = route(logits, config)
    index = routing.topk_index
    assert index.shape == (16, topk) and index.min() >= 0 and index.max() < 8
    assert all(len(set(row.tolist())) == topk for row in index), "an expert chosen twice for one token"
    assert torch.isfinite(routing.topk_weight).all() and (routing.topk_weight >= 0).all()
    sums = routing.topk_weight.sum(-1)
    if normalise and scale < 1e4:
        assert torch.allclose(sums, torch.full_like(sums, scaling), rtol=1e-5)
    elif score == "softmax":
        assert (sums <= scaling * (1 + 1e-5)).all()


def test_router_is_computed_in_float32_for_bfloat16_models():
    model = tiny_model(dtype=torch.bfloat16)
    out = model(input_ids=random_ids(1, 12), output_router_logits=True)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert not math.isnan(out.logits.float().sum().item())


def test_text_config_rejects_a_wrong_type_with_the_field_name():
    with pytest.raises(Exception, match="hidden_size"):  # huggingface_hub's strict type validation
        Llama4XTextConfig(hidden_size="wide")


def test_truncated_shard_is_named_instead_of_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shard.name} is truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=f"missing shards .*{shard.name}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_dynamic_rope_runs_beyond_max_position_embeddings_with_the_ntk_scaled_base():
    """Dynamic NTK RoPE exists for sequences longer than `max_position_embeddings`: it raises the base there to
    `theta * (factor * n / max - (factor - 1)) ** (D / (D - 2))` for n tokens. The same weights with that base as a
    plain RoPE give the reference."""
    theta, factor, max_positions, n, head_dim = 10000.0, 2.0, 16, 24, 8
    dynamic = tiny_model(
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "dynamic", "rope_theta": theta, "factor": factor},
    )
    scaled_theta = theta * (factor * n / max_positions - (factor - 1)) ** (head_dim / (head_dim - 2))
    reference = tiny_model(rope_parameters={"rope_type": "default", "rope_theta": scaled_theta})
    input_ids = random_ids(1, n)
    with torch.no_grad():
        logits, expected = dynamic(input_ids=input_ids).logits, reference(input_ids=input_ids).logits
    diff = (logits - expected).abs().max().item()
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5), f"max diff {diff}"


@needs_packed_chunked_masks
def test_packed_sequences_are_bounded_by_their_positions_not_the_row_length():
    """Packed sequences (position ids restarting in a row, as transformers' `DataCollatorWithFlattening` gives them)
    may fill a row longer than `max_position_embeddings`."""
    model = tiny_model(max_position_embeddings=24)
    lengths = (13, 19)  # 32 tokens in one row, each sequence within 24 positions
    sequences = [random_ids(1, length, seed=length) for length in lengths]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(sequences, dim=1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(input_ids=ids).logits for ids in sequences], dim=1)
    diff = (packed - alone).abs().max().item()
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-5), f"max diff {diff}"


def test_a_position_id_beyond_max_position_embeddings_is_refused_however_short_the_row():
    model = tiny_model(max_position_embeddings=24)
    with pytest.raises(ValueError, match="position 24, outside \\[0, max_position_embeddings=24\\)"):
        model(input_ids=random_ids(1, 3), position_ids=torch.tensor([[22, 23, 24]]))
