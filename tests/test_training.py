"""`llama4x train` (`llama4x.training`): data building (packing, chat answer-only labels), full and LoRA runs
through the Trainer with the MoE logs and plots, and resume from a mid-run checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from llama4x import Llama4XForCausalLM
from llama4x.data import IGNORE_INDEX, python_docs_texts
from llama4x.tokenization import train_tokenizer
from llama4x.training import main, parse_args, train
from llama4x.training_data import DataArguments, build_data, data_kind, tokenize_chat
from tiny import tiny_text_config

TOKENIZER_VOCAB = 320


def save_tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random llama4x (tests/tiny.py) with a small BPE tokenizer, saved with `save_pretrained`."""
    tokenizer = train_tokenizer(python_docs_texts()[:20], vocab_size=TOKENIZER_VOCAB)
    config = tiny_text_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    Llama4XForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path: Path, documents: int = 12) -> Path:
    path.write_text("\n\n".join(text.strip() for text in python_docs_texts()[:documents]) + "\n")
    return path


def train_args(model: Path, dataset: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    """Command-line arguments of a short CPU run; `extra` adds `--key value` pairs."""
    args = {
        "model": model,
        "dataset": dataset,
        "output_dir": out,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "block_size": 32,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "dataloader_pin_memory": "false",
        "seed": 0,
        **extra,
    }
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def log_values(out: Path, key: str) -> dict[int, float]:
    history = json.loads((out / "train_results.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), router_aux_loss_coef=0.01, router_z_loss_coef=1e-3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "docs.txt")


def test_data_kind_from_columns_names_the_expected_columns():
    args = DataArguments()
    assert data_kind(["text"], args) == "lm"
    assert data_kind(["prompt", "answer"], args) == "chat"
    assert data_kind(["messages"], args) == "chat"
    assert data_kind(["image", "prompt", "answer"], args) == "image_text"
    with pytest.raises(ValueError, match="'text'"):
        data_kind(["body"], args)


def test_chat_labels_cover_exactly_the_assistant_replies():
    tokenizer = train_tokenizer(python_docs_texts()[:10], vocab_size=TOKENIZER_VOCAB)
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    out = tokenize_chat(tokenizer, messages, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "4<|eot|>6<|eot|>"
    # The prompt part is exactly what generation would be given.
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and labels[len(prompt_ids)] != IGNORE_INDEX
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    everything = tokenize_chat(tokenizer, messages, max_length=512, answer_only=False)
    assert everything["labels"] == everything["input_ids"] == ids
    assert len(tokenize_chat(tokenizer, messages, max_length=7)["input_ids"]) == 7


def test_unpacked_documents_end_with_eos_as_packed_ones_unless_cut_by_the_block():
    import datasets

    tokenizer = train_tokenizer(python_docs_texts()[:10], vocab_size=TOKENIZER_VOCAB)
    texts = ["a short document", "", "a longer document " * 20]
    rows = datasets.Dataset.from_dict({"text": texts})
    data = build_data("lm", rows, None, None, tokenizer, DataArguments(packing=False, block_size=32))
    short, long = tokenizer(texts[0])["input_ids"], tokenizer(texts[2])["input_ids"]
    assert data.train["input_ids"] == [short + [tokenizer.eos_token_id], long[:32]]  # the empty line is dropped
    assert data.train["labels"] == data.train["input_ids"]


@pytest.mark.parametrize("packing", [True, False])
def test_text_without_an_eos_token_is_refused_naming_it(packing):
    import datasets

    tokenizer = train_tokenizer(python_docs_texts()[:10], vocab_size=TOKENIZER_VOCAB)
    tokenizer.eos_token = None
    rows = datasets.Dataset.from_dict({"text": ["a document"]})
    with pytest.raises(ValueError, match="eos_token"):
        build_data("lm", rows, None, None, tokenizer, DataArguments(packing=packing, block_size=32))


@pytest.mark.parametrize(
    "flag, value",
    [("--block-size", "0"), ("--eval-fraction", "-0.1"), ("--eval-fraction", "1"), ("--max-train-samples", "0"),
     ("--text-sample-by", "sentence")],
)  # fmt: skip
def test_invalid_data_options_are_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=flag):
        parse_args(["--preset", "tiny", flag, value])


@pytest.mark.parametrize("seed", [0, 42])
def test_pydocs_holds_out_the_bundled_docs_fixed_split_whatever_the_seed(seed):
    """`llama4x train --dataset pydocs` holds out the documents `llama4x distill` and the demo evaluate on."""
    from llama4x.data import python_docs_split
    from llama4x.training_data import load_raw_data

    _, train_rows, eval_rows, _ = load_raw_data(DataArguments(dataset="pydocs", eval_fraction=0.1), seed)
    train_docs, eval_docs = python_docs_split(0.1)
    assert eval_rows["text"] == eval_docs and train_rows["text"] == train_docs


def test_parser_reaches_training_arguments_and_lora_options():
    model_args, data_args, lora_args, training_args = parse_args(
        ["--preset", "tiny", "--dataset", "pydocs", "--lora", "--lora-r", "4", "--gradient-checkpointing",
         "--bf16", "--use-cpu", "--packing", "false", "--output-dir", "x", "--warmup-steps", "3", "--resume"]
    )  # fmt: skip
    assert lora_args.lora and lora_args.lora_r == 4 and not data_args.packing
    assert training_args.gradient_checkpointing and training_args.bf16 and training_args.warmup_steps == 3
    assert training_args.resume and model_args.preset == "tiny"


def test_text_training_logs_lm_aux_and_routing_stats_and_saves_plots(checkpoint, text_file, tmp_path):
    out = tmp_path / "run"
    metrics = main(train_args(checkpoint, text_file, out, eval_fraction=0.25))
    for name in ("model.safetensors", "tokenizer.json", "loss_curve.png", "expert_load.png", "train_results.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "train_results.json").read_text())["log_history"]
    step_logs = [entry for entry in history if "loss" in entry]
    assert len(step_logs) == 4
    for entry in step_logs:
        for key in ("lm_loss", "aux_loss", "z_loss", "moe/max_violation", "moe/load_entropy"):
            assert key in entry, f"{key} missing from the step log {sorted(entry)}"
        # The Trainer's loss is the LM loss plus the weighted balancing losses.
        expected = entry["lm_loss"] + 0.01 * entry["aux_loss"] + 1e-3 * entry["z_loss"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert step_logs[-1]["lm_loss"] < step_logs[0]["lm_loss"]
    for key in ("eval_lm_loss", "eval_perplexity", "eval_accuracy"):
        assert key in metrics
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_lm_loss"]).exp().item(), rel=1e-4)


def test_lora_run_through_the_cli_saves_an_adapter_and_leaves_the_base_frozen(
    checkpoint, text_file, tmp_path, capsys, monkeypatch
):
    from peft import PeftModel

    from llama4x.cli import main as cli_main

    out = tmp_path / "lora"
    monkeypatch.chdir(checkpoint.parent)  # the base model by a relative path
    args = train_args(Path(checkpoint.name), text_file, out, steps=3, eval_fraction=0, gradient_checkpointing="true")
    assert cli_main(["train", *args, "--lora", "--lora-parts", "attention,routed_experts", "--lora-r", "4"]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path) == checkpoint.resolve(), "stored absolute: the adapter works from any folder"
    monkeypatch.chdir(tmp_path)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("experts" in key for key in adapter) and any("q_proj" in key for key in adapter)
    expert_b = [value for key, value in adapter.items() if "experts" in key and "lora_B" in key]
    assert all(value.abs().max() > 0 for value in expert_b), "expert lora_B never left its zero init"
    base = Llama4XForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-4

    # `llama4x generate` takes the adapter folder: the base it names with the adapter on top
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def", return_tensors="pt")
    with torch.no_grad():
        expected = adapted.generate(**prompt, max_new_tokens=6, do_sample=False)
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps, as an interruption would (after that step's checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.trained = []

    def on_step_end(self, args, state, control, **kwargs):
        self.trained.append(state.global_step)


def test_resume_from_mid_run_checkpoint_reproduces_losses_and_balancing_bias(text_file, tmp_path):
    model = save_tiny_checkpoint(tmp_path / "model", router_bias_update_rate=0.01, router_aux_loss_coef=0.01)
    common = {"save_steps": 3, "save_strategy": "steps", "eval_fraction": 0}
    full, part = tmp_path / "full", tmp_path / "part"
    main(train_args(model, text_file, full, steps=6, **common))
    train(*parse_args(train_args(model, text_file, part, steps=6, **common)), callbacks=[StopAt(3)])
    assert sorted(log_values(part, "loss")) == [1, 2, 3]
    bias_key = "model.layers.0.feed_forward.e_score_correction_bias"
    assert load_file(part / "checkpoint-3" / "model.safetensors")[bias_key].abs().max() > 0, "bias state not saved"
    steps = StepRecorder()
    train(*parse_args([*train_args(model, text_file, part, steps=6, **common), "--resume"]), callbacks=[steps])
    assert steps.trained == [4, 5, 6], f"the resumed run trained steps {steps.trained}"

    for key in ("loss", "lm_loss", "aux_loss"):
        assert log_values(part, key) == log_values(full, key), key
    final_full, final_part = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert final_full[bias_key].abs().max() > 0
    for name, value in final_full.items():
        diff = (final_part[name] - value).abs().max().item()
        assert diff == 0.0, f"{name}: resumed run differs from the uninterrupted one by {diff}"


def test_gradient_accumulation_matches_one_big_batch_balancing_losses_included(text_file, tmp_path):
    model = save_tiny_checkpoint(tmp_path / "model", router_z_loss_coef=0.1, router_bias_update_rate=0.01)
    common = {"eval_fraction": 0, "block_size": 16}
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    main(train_args(model, text_file, big, steps=3, **common))
    main(train_args(model, text_file, accumulated, steps=3, **common, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2))  # fmt: skip
    for key in ("loss", "lm_loss", "z_loss"):
        expected, got = log_values(big, key), log_values(accumulated, key)
        assert got == pytest.approx(expected, rel=1e-5), f"{key}: {got} vs {expected}"


def test_image_text_jsonl_lora_run_on_a_multimodal_model(tmp_path):
    from llama4x.benchmarks.lora_digits import PARITY_QUESTION, build_pretrain_folder, parity, write_image_text_jsonl
    from llama4x.data import digits_vqa

    model = build_pretrain_folder(tmp_path / "mm")
    records = [{**r, "question": PARITY_QUESTION, "answer": parity(r["answer"])} for r in digits_vqa()[1][:12]]
    data = write_image_text_jsonl(records, tmp_path / "data", "parity")
    out = tmp_path / "out"
    args = train_args(model, data, out, steps=2, eval_fraction=0.25, block_size=64)
    metrics = main([*args, "--lora", "--lora_parts", "attention,routed_experts"])
    assert json.loads((out / "train_results.json").read_text())["data_kind"] == "image_text"
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert {"eval_lm_loss", "eval_accuracy"} <= set(metrics)


def test_image_text_data_with_missing_or_unreadable_images_is_refused_naming_the_file(tmp_path):
    from llama4x.benchmarks.lora_digits import build_pretrain_folder, write_image_text_jsonl
    from llama4x.data import digits_vqa

    model = build_pretrain_folder(tmp_path / "mm")
    data = write_image_text_jsonl(digits_vqa()[1][:6], tmp_path / "data", "digits")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    missing = data.parent / rows[2]["image"]
    missing.unlink()
    with pytest.raises(ValueError, match=rf"1 image file\(s\) do not exist: row 2: .*{missing.name}"):
        main(train_args(model, data, tmp_path / "out", steps=1, eval_fraction=0, block_size=64))
    missing.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=rf"Cannot read .*{missing.name} as an image"):
        main(train_args(model, data, tmp_path / "out", steps=2, eval_fraction=0, block_size=64,
                        per_device_train_batch_size=6))  # fmt: skip


def test_out_of_range_seed_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--seed -1 is out of range"):
        main(train_args(tmp_path / "no-model", tmp_path / "no-data.txt", tmp_path / "out", seed=-1))


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_evaluation_predictions_are_the_logits_without_cache_or_image_features(multimodal, tmp_path):
    """`Trainer.prediction_step` gathers every output not in `config.keys_to_ignore_at_inference` as predictions: the
    KV cache (not a tensor: it cannot be gathered across processes) and the image features must be listed."""
    from transformers import Trainer, TrainingArguments

    from tiny import BOI_ID, EOI_ID, FIRST_TEXT_ID, IMAGE_ID, random_ids, tiny_model, tiny_multimodal_model

    ids = random_ids(2, 6, seed=1).clamp_min(FIRST_TEXT_ID)
    inputs = {"use_cache": True}
    if multimodal:  # one 32-pixel tile per row: 4 image tokens between BOI and EOI
        model = tiny_multimodal_model()
        ids = torch.cat([torch.tensor([[BOI_ID, *[IMAGE_ID] * 4, EOI_ID]] * 2), ids], dim=1)
        inputs["pixel_values"] = torch.randn(2, 3, 32, 32)
    else:
        model = tiny_model()
    inputs.update(input_ids=ids, labels=ids)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    loss, predictions, _ = Trainer(model=model, args=args).prediction_step(model, inputs, prediction_loss_only=False)
    assert torch.isfinite(loss)
    assert isinstance(predictions, torch.Tensor), [type(p).__name__ for p in predictions]  # not a tuple of outputs
    assert predictions.shape == (*ids.shape, model.config.get_text_config().vocab_size)


def test_bad_sources_are_named_before_any_work(checkpoint, text_file, tmp_path):
    """Each message names the flag and the real problem; nothing is written to --output-dir."""
    out = tmp_path / "out"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "broken.jsonl").write_text("not json\n")
    cases = [
        ({"model": tmp_path / "absent"}, r"--model '.*absent' is not a directory"),
        ({"tokenizer": tmp_path / "absent"}, r"--tokenizer '.*absent' is not a directory"),
        ({"model": no_tokenizer}, r"--model '.*bare' has no tokenizer"),
        ({"model": adapter}, r"--model '.*adapter' holds a LoRA adapter, not a model"),
        ({"resume_from_checkpoint": tmp_path / "absent"}, r"Cannot resume from .*absent: no such folder"),
        ({"dataset": tmp_path / "empty.txt"}, r"--dataset '.*empty.txt' is empty"),
        ({"dataset": tmp_path / "broken.jsonl"}, r"--dataset '.*broken.jsonl' cannot be read as .jsonl data"),
        ({"eval_dataset": tmp_path / "absent.txt"}, r"--eval-dataset '.*absent.txt' is not a file"),
    ]
    for extra, message in cases:
        args = train_args(**{"model": checkpoint, "dataset": text_file, "out": out, "steps": 1} | extra)
        with pytest.raises(ValueError, match=message):
            main(args)
    assert not out.exists()


@pytest.mark.parametrize("preset", [True, False], ids=["preset", "model"])
def test_unknown_config_overrides_are_refused_for_a_preset_as_for_a_model(checkpoint, text_file, tmp_path, preset):
    args = train_args(
        checkpoint, text_file, tmp_path / "out", steps=1, config_overrides='{"router_aux_loss_coeff": 1}'
    )
    if preset:  # a new model, with a tokenizer from the checkpoint
        args = [*args[2:], "--tokenizer", str(checkpoint)]
    with pytest.raises(ValueError, match=r"Llama4XTextConfig has no field\(s\) \['router_aux_loss_coeff'\]"):
        main(args)


def test_chat_examples_cut_before_their_answer_are_counted_and_an_empty_split_refused(checkpoint, tmp_path):
    import datasets
    from transformers.testing_utils import CaptureLogger

    from llama4x.training_data import logger

    long_prompt = " ".join(["word"] * 60)
    rows = [{"prompt": long_prompt if i % 3 else "short", "answer": "yes"} for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data_args = DataArguments(dataset=str(data), block_size=32)
    table = datasets.Dataset.from_list(rows)
    with CaptureLogger(logger) as captured:
        built = build_data("chat", table, None, None, tokenizer, data_args)
    assert len(built.train) == 4
    assert "8 of 12 training chat examples dropped: --block-size 32 cuts them" in captured.out
    long_only = datasets.Dataset.from_list(rows[1:3])
    with pytest.raises(ValueError, match=r"No eval example is left: --block-size 32 cuts all 2 chat examples"):
        build_data("chat", table, long_only, None, tokenizer, data_args)
