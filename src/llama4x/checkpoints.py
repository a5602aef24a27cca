"""Integrity of checkpoint folders: saves that cannot leave a folder loading as a valid but wrong model, loads that
name a truncated or missing shard, refuse pickle-based weights, and resume only from completely saved Trainer
checkpoints."""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # "name" or "owner/name"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FOLDER = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")  # the Trainer's checkpoint-N


def verify_safetensors_folder(folder: str | Path) -> None:
    """Raise `ValueError` naming the file if a local checkpoint's safetensors shards are missing or unreadable.

    Reads only the headers; safetensors checks that each header's tensors exactly cover the file, so a shard
    cut short by an interrupted save or copy is caught. Hub ids and folders without safetensors are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    index = folder / "model.safetensors.index.json"
    shards = set(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            listed = {folder / name for name in json.loads(index.read_text())["weight_map"].values()}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"Checkpoint file {index} is truncated or corrupt ({error!r}); save or copy it again."
            ) from error
        missing = sorted(str(path) for path in listed - shards)
        if missing:
            raise ValueError(f"Checkpoint {folder} is incomplete: {index.name} lists missing shards {missing}.")
        shards = listed
    for shard in sorted(shards):
        try:
            with safe_open(shard, framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ValueError(
                f"Checkpoint file {shard} is truncated or corrupt ({error}); save or copy it again."
            ) from error


def check_model_folder(
    option: str, folder: str | Path, tokenizer: bool = True, adapter_ok: bool = True, config: bool = True
) -> None:
    """Raise a `ValueError` naming `option` unless `folder` is a `save_pretrained` folder: with `config`, a model
    config (or, with `adapter_ok`, a PEFT adapter's); with `tokenizer`, a saved tokenizer or processor."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{option} {str(folder)!r} is not a directory (expected a save_pretrained folder)")
    if config:
        _check_config_files(option, folder, adapter_ok)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{option} {str(folder)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the tokenizer or "
            f"processor into the model folder"
        )


def _check_config_files(option: str, folder: Path, adapter_ok: bool) -> None:
    has_config = (folder / "config.json").is_file()
    is_adapter = not has_config and (folder / "adapter_config.json").is_file()
    if is_adapter and not adapter_ok:
        raise ValueError(
            f"{option} {str(folder)!r} holds a LoRA adapter, not a model: pass the base model its adapter_config.json "
            "names, or save the merged model (PeftModel.merge_and_unload) and pass that"
        )
    if not (has_config or is_adapter):
        expected = "config.json or adapter_config.json" if adapter_ok else "config.json"
        raise ValueError(f"{option} {str(folder)!r} has no {expected} (expected a save_pretrained folder)")


def check_model_source(option: str, source: str, tokenizer: bool = True, config: bool = True) -> None:
    """`check_model_folder` (no adapters) for a local folder, or for a name that can only be one: a Hub id is left to
    transformers."""
    if Path(source).is_dir() or not HUB_ID.fullmatch(source):
        check_model_folder(option, source, tokenizer=tokenizer, adapter_ok=False, config=config)


def refuse_output_over_input(
    output_dir: str | Path, input_dir: str | Path, names: tuple[str, str], inside_ok: bool = False
) -> None:
    """Raise `ValueError` if the output folder is the input folder or contains it (or lies inside it, unless
    `inside_ok`): writing or replacing it could destroy the input. `names`: how to call the two folders."""
    output_path, input_path = Path(output_dir).resolve(), Path(input_dir).resolve()
    if output_path == input_path or output_path in input_path.parents:
        raise ValueError(f"{names[0]} {output_dir} must not be {names[1]} {input_dir} or contain it.")
    if not inside_ok and input_path in output_path.parents:
        raise ValueError(f"{names[0]} {output_dir} must not lie inside {names[1]} {input_dir}.")


def weight_patterns(variant: str | None) -> tuple[str, ...]:
    """Glob patterns of the weight files `save_pretrained(variant=variant)` writes (one file, or shards and their
    index); other variants' files, which a folder may hold beside them, do not match."""
    tag = f".{variant}" if variant else ""
    return (
        f"model{tag}.safetensors",
        f"model{tag}-?????-of-?????.safetensors",
        f"model.safetensors.index{tag}.json",
        f"pytorch_model{tag}.bin",
        f"pytorch_model{tag}-?????-of-?????.bin",
        f"pytorch_model.bin.index{tag}.json",
    )


def save_staged(save: Callable[[Path], None], folder: str | Path, variant: str | None = None) -> None:
    """Run `save(staging)` into a fresh hidden folder inside `folder`, then move its files up, weights index last.

    A save that fails or is killed while writing (the long part) leaves `folder`'s model as it was. Before the (fast)
    moves the folder's previous weight files of this `variant` are deleted, so no interruption can mix new and old
    shards, and a sharded save over an unsharded one (or back) leaves no stale `model.safetensors` that transformers
    would load instead. Staging inside `folder` keeps the moves on its filesystem (a folder can be a mount point or a
    link to another disk).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    patterns = weight_patterns(variant)
    try:
        save(staging)
        for pattern in patterns:
            for stale in folder.glob(pattern):
                stale.unlink()
        # The files from_pretrained starts from (the index, or the one unsharded weights file) go last.
        for path in sorted(staging.iterdir(), key=lambda path: _is_weights_entry_point(path, patterns)):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_weights_entry_point(path: Path, patterns: tuple[str, ...]) -> bool:
    is_weights = any(path.match(pattern) for pattern in patterns)
    return is_weights and re.search(r"-\d{5}-of-\d{5}\.", path.name) is None


def refuse_pickle_weights(folder: str | Path) -> None:
    """Raise `ValueError` if a local folder holds pickle-based weights and no safetensors ones: unpickling can run
    arbitrary code, so llama4x reads only safetensors unless the caller passes `use_safetensors=False`."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(path.name for pattern in PICKLE_PATTERNS for path in folder.glob(pattern))
    if pickled:
        raise ValueError(
            f"{folder} holds pickle-based weights {pickled} and no safetensors. Loading pickles can execute code, so "
            "llama4x refuses them by default; pass use_safetensors=False only if you trust the files, or convert "
            "them to safetensors."
        )


def trainer_checkpoint_problem(folder: str | Path) -> str | None:
    """Why a Trainer `checkpoint-N` folder cannot be resumed from (None if it can).

    The Trainer writes the weights, optimizer, scheduler and RNG states, then `trainer_state.json` last, so a
    readable state file whose `global_step` is N, next to intact safetensors files, marks a completed save.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"{TRAINER_STATE} is missing (the save was interrupted)"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE} is unreadable ({error!r})"
    match = CHECKPOINT_FOLDER.fullmatch(folder.name)
    if match and int(match.group(1)) != step:
        return f"{TRAINER_STATE} records global_step {step}, not {match.group(1)}"
    try:
        verify_safetensors_folder(folder)
    except ValueError as error:
        return str(error)
    return None


def verify_trainer_checkpoint(folder: str | Path) -> None:
    """Raise `ValueError` naming the problem if `folder` is not a completely saved Trainer checkpoint."""
    problem = trainer_checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"Cannot resume from {folder}: {problem}.")


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step `checkpoint-N` folder in `output_dir` that was completely saved; incomplete ones are skipped
    with a warning naming them (transformers' `get_last_checkpoint` would pick them)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {
        int(m.group(1)): path
        for path in output_dir.iterdir()
        if path.is_dir() and (m := CHECKPOINT_FOLDER.fullmatch(path.name))
    }
    for step in sorted(steps, reverse=True):
        problem = trainer_checkpoint_problem(steps[step])
        if problem is None:
            return steps[step]
        logger.warning(f"Skipping {steps[step]} when resuming: {problem}.")
    return None


def write_json_atomically(path: Path, content) -> None:
    """Write JSON through a temporary file and a rename: a crash never leaves a half-written file that a rerun would
    trust (or fail to parse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)
