"""Integrity of saved checkpoint folders: a truncated or missing shard is named before anything loads from it."""

import json
from pathlib import Path

from safetensors import safe_open


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
        listed = {folder / name for name in json.loads(index.read_text())["weight_map"].values()}
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
