"""Checkpoints never lose data or load as a wrong model; loading reads only safetensors and needs no network;
training and routing are deterministic, and the routing statistics logged cover every training batch. Kills are real:
a subprocess receives SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama4x import Llama4XForCausalLM, Llama4XTextConfig
from llama4x.checkpoints import last_complete_checkpoint, verify_trainer_checkpoint
from llama4x.moe import route
from llama4x.training import main
from test_training import log_values, save_tiny_checkpoint, train_args, write_text
from tiny import random_ids, tiny_model, tiny_text_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code], env=environment, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


# ---- save_pretrained ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second", [(None, "100KB"), ("100KB", None)], ids=["sharded-over-one", "one-over-sharded"]
)
def test_saving_over_a_previous_save_loads_the_new_weights(tmp_path, first, second):
    # transformers alone keeps the old model.safetensors next to a new shard index (and loads the old weights), or a
    # stale index next to a new model.safetensors.
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path, **({"max_shard_size": first} if first else {}))
    new.save_pretrained(tmp_path, **({"max_shard_size": second} if second else {}))
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path), weights(new))
    assert not list(tmp_path.glob(".saving-*"))


@pytest.mark.parametrize("first, second", [(None, "100KB"), ("100KB", None)], ids=["sharded-variant", "sharded-main"])
def test_saving_a_variant_keeps_the_main_weights(tmp_path, first, second):
    # transformers keeps model.safetensors beside model.ema.safetensors (each loads with its `variant`)
    main_model, ema = tiny_model(seed=0), tiny_model(seed=1)
    main_model.save_pretrained(tmp_path, **({"max_shard_size": first} if first else {}))
    ema.save_pretrained(tmp_path, variant="ema", **({"max_shard_size": second} if second else {}))
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path), weights(main_model))
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path, variant="ema"), weights(ema))


def test_saving_into_a_folder_on_another_filesystem_replaces_the_model(tmp_path):
    # A folder that is a link to another disk (or a mount point, as a container's output volume): a save staged
    # beside it cannot be renamed into it (EXDEV), and failed after deleting the previous weights.
    other_disk = Path("/dev/shm")
    if not other_disk.is_dir() or other_disk.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    target = Path(tempfile.mkdtemp(dir=other_disk))
    try:
        folder = tmp_path / "model"
        folder.symlink_to(target)
        tiny_model(seed=0).save_pretrained(folder)
        new = tiny_model(seed=1)
        new.save_pretrained(folder)
        assert_same_weights(AutoModelForCausalLM.from_pretrained(folder), weights(new))
        assert not list(target.glob(".saving-*"))
    finally:
        shutil.rmtree(target)


BIG_CONFIG = dict(  # ~8M parameters in ~30 shards of 1 MB: a save long enough to be killed in the middle
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    intermediate_size_mlp=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=16,
    num_experts_per_tok=1,
)
SAVE = """
import sys, time, torch
from llama4x import Llama4XForCausalLM, Llama4XTextConfig
torch.manual_seed({seed})
model = Llama4XForCausalLM(Llama4XTextConfig(**{config}))
print("ready", flush=True)
model.save_pretrained("{folder}", max_shard_size="1MB")
time.sleep(600)
"""


def big_model_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return weights(Llama4XForCausalLM(Llama4XTextConfig(**BIG_CONFIG)))


def test_a_save_killed_midway_leaves_the_previous_model_or_refuses_to_load(tmp_path):
    folder = tmp_path / "model"
    first = run_python(SAVE.format(seed=1, config=BIG_CONFIG, folder=folder).replace("time.sleep(600)", ""))
    assert first.wait(timeout=300) == 0
    previous = big_model_weights(1)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(folder), previous)

    saver = run_python(SAVE.format(seed=2, config=BIG_CONFIG, folder=folder), stdout=subprocess.PIPE)
    assert saver.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 120
    while not any(folder.glob(".saving-*/*.safetensors")):
        assert time.monotonic() < deadline and saver.poll() is None, "the save never started"
        time.sleep(0.001)
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait()
    try:
        loaded = weights(AutoModelForCausalLM.from_pretrained(folder))
    except (ValueError, OSError):  # killed during the final moves: refuses to load, names the problem
        return
    newer = big_model_weights(2)
    assert all(torch.equal(loaded[k], previous[k]) for k in previous) or all(
        torch.equal(loaded[k], newer[k]) for k in newer
    ), "the folder mixes the weights of two saves"


# ---- Trainer checkpoints -----------------------------------------------------------------------------------------

TRAIN = "import sys; from llama4x.training import main; main(sys.argv[1:])"


def test_training_killed_while_saving_resumes_to_the_uninterrupted_losses(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "model", router_bias_update_rate=0.01, router_aux_loss_coef=0.01)
    text = write_text(tmp_path / "docs.txt")
    common = {"save_steps": 2, "save_strategy": "steps", "eval_fraction": 0}
    full, killed = tmp_path / "full", tmp_path / "killed"
    main(train_args(model, text, full, steps=8, **common))

    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN, *train_args(model, text, killed, steps=8, **common)],
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},  # one thread, as conftest.py sets here
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-4").exists():  # appears when the step-4 save starts: kill it there
        assert process.poll() is None and time.monotonic() < deadline, "training ended before its step-4 save"
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "train_results.json").exists()

    resumed_from = last_complete_checkpoint(killed)
    assert resumed_from is not None and resumed_from.name in ("checkpoint-2", "checkpoint-4")
    if resumed_from.name == "checkpoint-2":  # the step-4 save was cut short: named, never resumed from
        with pytest.raises(ValueError, match="checkpoint-4: .*(missing|truncated|unreadable|incomplete)"):
            verify_trainer_checkpoint(killed / "checkpoint-4")
    main([*train_args(model, text, killed, steps=8, **common), "--resume"])
    for key in ("loss", "lm_loss", "aux_loss"):
        assert log_values(killed, key) == log_values(full, key), key
    final_full = AutoModelForCausalLM.from_pretrained(full)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(killed), weights(final_full))


def test_an_incomplete_checkpoint_is_named_and_skipped(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (run / "checkpoint-6").mkdir()
    tiny_model().save_pretrained(run / "checkpoint-6")  # weights written, then killed: no trainer state
    (run / "checkpoint-9").mkdir()
    (run / "checkpoint-9" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(run) == run / "checkpoint-3"
    with pytest.raises(ValueError, match="checkpoint-6: trainer_state.json is missing"):
        verify_trainer_checkpoint(run / "checkpoint-6")
    with pytest.raises(ValueError, match="checkpoint-9: trainer_state.json is unreadable"):
        verify_trainer_checkpoint(run / "checkpoint-9")
    assert last_complete_checkpoint(tmp_path / "nothing") is None


# ---- safe loading ------------------------------------------------------------------------------------------------


def test_a_truncated_shard_in_a_subfolder_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model", max_shard_size="100KB")
    shard = sorted((tmp_path / "model").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shard.name} is truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="model")


def test_a_truncated_shard_index_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text()[:100])
    with pytest.raises(ValueError, match=f"{index.name} is truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_weights_passed_as_a_state_dict_load_without_a_folder():
    model = tiny_model(seed=4)
    loaded = Llama4XForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert_same_weights(loaded, weights(model))


def test_pickle_weights_are_refused_unless_asked_for(tmp_path):
    model = tiny_model(seed=3)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle-based weights \['pytorch_model.bin'\].*use_safetensors=False"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=False), weights(model))


OFFLINE_LOAD = """
import socket
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import torch
import llama4x  # registers the Auto classes: no trust_remote_code
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
print(type(model).__name__, model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] - ids.shape[1])
"""


@pytest.mark.parametrize("offline", ["1", None], ids=["HF_HUB_OFFLINE", "online-env"])
def test_loading_a_local_folder_makes_no_network_call(tmp_path, offline):
    folder = save_tiny_checkpoint(tmp_path / "model")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = SRC
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD.format(folder=folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Llama4XForCausalLM", "3"]


# ---- determinism -------------------------------------------------------------------------------------------------


def test_two_seeded_training_runs_give_identical_losses_and_weights(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "model", router_bias_update_rate=0.01, router_z_loss_coef=1e-3)
    text = write_text(tmp_path / "docs.txt")
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        main(train_args(model, text, out, steps=4, eval_fraction=0))
    for key in ("loss", "lm_loss", "z_loss"):
        assert log_values(first, key) == log_values(second, key), key
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained(second), weights(AutoModelForCausalLM.from_pretrained(first))
    )


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_routing_ties_are_broken_the_same_way_every_time(score):
    config = tiny_text_config(router_score_func=score, num_experts_per_tok=3)
    tied = torch.zeros(64, 8)  # every expert scores the same for every token
    tied[::2, 5] = 1.0  # half the tokens prefer expert 5, then tie among the rest
    first = route(tied, config).topk_index
    assert all(torch.equal(route(tied.clone(), config).topk_index, first) for _ in range(5))
    assert torch.equal(first[1::2], first[1:2].expand(32, -1)) and torch.equal(first[::2], first[:1].expand(32, -1))
    assert (first[::2, 0] == 5).all()
    assert all(len(set(row.tolist())) == 3 for row in first)


# ---- routing statistics in the Trainer logs ----------------------------------------------------------------------


def test_routing_stats_go_to_training_logs_and_cover_every_training_batch(tmp_path):
    """With evaluations between training logs (and gradient accumulation), each training log's routing statistics
    come from all its micro-batches, evaluation logs carry none (they took the training batches' loads), and the
    run's expert-load total counts every training batch, those after the last log included."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from llama4x.monitoring import RoutingStatsCallback

    model = tiny_model(num_experts_per_tok=1).train()
    loads = []  # per training micro-batch, as the model returns them
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "output_router_logits": True}), with_kwargs=True
    )
    model.model.register_forward_hook(
        lambda module, args, out: loads.append(out.expert_load) if module.training else None
    )
    ids = random_ids(16, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=7,
        logging_steps=3, eval_strategy="steps", eval_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    callback = RoutingStatsCallback(per_layer=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(4)),
                      callbacks=[callback])  # fmt: skip
    trainer.train()

    assert len(loads) == 2 * 7
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "moe/max_violation" in entry}
    assert all("loss" in entry for entry in logged.values()), "an evaluation log carries training routing stats"
    assert sorted(logged) == [3, 6]
    for step, entry in logged.items():
        window_LE = torch.stack(loads[2 * (step - 3) : 2 * step]).sum(0).double()
        violation = (window_LE.amax(-1) / window_LE.mean(-1) - 1).mean().item()
        assert entry["moe/max_violation"] == pytest.approx(violation), step
    assert torch.equal(callback.total_load, torch.stack(loads).sum(0))
