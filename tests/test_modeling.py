"""Model-level behaviour: checkpoints, Auto classes, remote code, loss, gradient checkpointing, variants."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import llama4x
from tiny import random_ids, run_without_llama4x, tiny_model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Same weights in freshly allocated memory can take other SIMD paths on the CPU: last-bit differences only.
    assert actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=0, atol=1e-6), f"max diff {_max_diff(actual, expected)}"


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "100KB"}], ids=["single_file", "sharded"])
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, save_kwargs):
    model = tiny_model()
    model.save_pretrained(tmp_path, **save_kwargs)
    assert not list(tmp_path.glob("*.bin")), "weights must be saved as safetensors only"
    if "max_shard_size" in save_kwargs:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
        assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, llama4x.Llama4XForCausalLM)
    input_ids = random_ids(2, 20)
    with torch.no_grad():
        _assert_same_logits(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_bfloat16_load_casts_the_weights_and_round_trips(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "fp32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    for name, param in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param.to(torch.bfloat16)), name
    loaded.save_pretrained(tmp_path / "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    input_ids = random_ids(2, 20)
    with torch.no_grad():
        _assert_same_logits(reloaded(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)


def test_base_model_loads_from_causal_lm_checkpoint(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, llama4x.Llama4XTextModel)
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        expected = model.model(input_ids=input_ids).last_hidden_state
    with torch.no_grad():
        _assert_same_logits(base(input_ids=input_ids).last_hidden_state, expected)


def test_saved_folder_loads_with_trust_remote_code_without_llama4x(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama4x.Llama4XForCausalLM"
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "expected.pt")
    stdout = run_without_llama4x(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "llama4x" not in sys.modules
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"]).logits
        diff = (logits - data["expected"]).abs().max().item()
        assert diff <= 1e-6, diff
        print("REMOTE-OK", type(model).__module__)
        """
    )
    assert "REMOTE-OK transformers_modules" in stdout


def test_auto_config_and_auto_model_from_config_build_llama4x():
    config = llama4x.Llama4XConfig.from_preset("tiny")
    assert type(AutoConfig.for_model("llama4x")) is llama4x.Llama4XConfig
    model = AutoModelForCausalLM.from_config(config.text_config)
    assert isinstance(model, llama4x.Llama4XForCausalLM)


def test_labels_give_the_shifted_cross_entropy():
    model = tiny_model()
    input_ids = random_ids(2, 16)
    labels = input_ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=input_ids, labels=labels)
    logits = out.logits[:, :-1].double()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) < 1e-5, f"loss {out.loss.item()} vs {expected.item()}"


def test_router_logits_are_returned_for_every_moe_layer():
    model = tiny_model(moe_layers=[0, 2])
    input_ids = random_ids(2, 10)
    out = model(input_ids=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    assert all(logits.shape == (20, model.config.num_local_experts) for logits in out.router_logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = random_ids(2, 20)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), (
            f"{name}: {_max_diff(*[g[name] for g in grads])}"
        )


def test_post_norm_places_the_norms_after_attention_and_ffn():
    pre, post = tiny_model(), tiny_model(norm_placement="post")
    post.load_state_dict(pre.state_dict())
    input_ids = random_ids(1, 10)
    with torch.no_grad():
        layer = post.model.layers[0]
        hidden = post.model.embed_tokens(input_ids)
        cos_sin = post.model.rotary_emb(hidden, torch.arange(10)[None])
        masks = {"chunked_attention": None}
        layer.self_attn.config._attn_implementation = "sdpa"
        out, _, _ = layer(hidden, cos_sin, torch.arange(10)[None], attention_mask=masks["chunked_attention"])
        attn, _ = layer.self_attn(hidden, cos_sin, torch.arange(10)[None], None)
        after_attn = hidden + layer.input_layernorm(attn)
        expected = after_attn + layer.post_attention_layernorm(layer.feed_forward(after_attn)[0])
    assert torch.allclose(out, expected, atol=1e-6), f"max diff {_max_diff(out, expected)}"
    assert not torch.allclose(pre(input_ids=input_ids).logits, post(input_ids=input_ids).logits)


def test_residual_dropout_acts_in_training_only():
    model = tiny_model(residual_dropout=0.5)
    input_ids = random_ids(1, 10)
    with torch.no_grad():
        eval_a, eval_b = model(input_ids=input_ids).logits, model(input_ids=input_ids).logits
        model.train()
        train = model(input_ids=input_ids).logits
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train, eval_a)


def test_tied_word_embeddings_share_the_matrix(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_compiled_decoding_is_not_disabled_for_llama4x():
    model = tiny_model()
    compiled = model.get_compiled_call(None)
    assert compiled is not model.__call__
    assert model.get_compiled_call(None) is compiled, "the compiled call is cached"


def test_return_dict_false_gives_the_output_fields_as_a_tuple():
    model = tiny_model()
    ids = random_ids(2, 9)
    with torch.no_grad():
        for module, extra in ((model, {"labels": ids}), (model.model, {})):
            expected = module(ids, use_cache=False, **extra).to_tuple()
            actual = module(ids, use_cache=False, return_dict=False, **extra)
            assert type(actual) is tuple and len(actual) == len(expected), type(module).__name__
            assert all(torch.equal(a, e) for a, e in zip(actual, expected)), type(module).__name__
