"""Offline distillation: the teacher's largest logits cached to disk once, read lazily while the student trains.

`build_teacher_cache` runs the teacher over a dataset in order (batched by the training collator) and writes, for
every token position (padding skipped), its `top_k` largest logits and their token ids to safetensors shards, one
shard in memory at a time. `TeacherCache` reads a row's `(L, K)` block by memory-mapped slices;
`TeacherCacheDataset` and `TeacherCacheCollator` hand them to the Trainer as `(B, S, K)` tensors next to the batch.
`prepare_teacher_cache` reuses a cache built on the same data (a sha256 of the token ids and pixels the teacher saw)
with the same settings. Logits are stored raw, so the temperature can change without rebuilding.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .checkpoints import write_json_atomically
from .distillation_students import INPUT_KEYS

logger = logging.get_logger(__name__)

CACHE_KEYS = ("teacher_topk_values", "teacher_topk_indices")
CACHE_META = "teacher_cache.json"
CACHE_FORMAT = 1
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _batches(dataset, collator: Callable, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _token_positions(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per row, the positions that hold tokens (attention mask 1; all without a mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    return [row.nonzero().squeeze(-1) for row in mask.cpu()]


def _hash_batch(digest, batch: dict[str, torch.Tensor]) -> None:
    for ids, positions in zip(batch["input_ids"].cpu(), _token_positions(batch)):
        digest.update(len(positions).to_bytes(8, "little"))  # the same tokens cut into other rows are other data
        digest.update(ids[positions].to(torch.int64).numpy().tobytes())
    if batch.get("pixel_values") is not None:
        digest.update(batch["pixel_values"].float().cpu().numpy().tobytes())


def data_fingerprint(dataset, collator: Callable, batch_size: int) -> str:
    """sha256 of the token ids (and pixels) the teacher sees, batch by batch; identifies what a cache was built on."""
    digest = hashlib.sha256()
    for batch in _batches(dataset, collator, batch_size):
        _hash_batch(digest, batch)
    return digest.hexdigest()


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's config and of a strided sample of up to 256 values of each tensor of its state dict
    (parameters and saved buffers, such as the balancing biases that steer the routing): tells teachers apart without
    reading every weight."""
    digest = hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode())
    for name, tensor in teacher.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class TeacherCache:
    """Read side of an offline cache: `cache[row]` -> `(values (L, K), indices (L, K) int64)` for the L tokens of
    dataset row `row`, read lazily from the memory-mapped safetensors shards.

    On disk: `teacher_cache.json` (written last: a folder without it is an unfinished build) and shards
    `shard_NNNNN.safetensors` holding the rows' positions end to end: `values (P, K)` (logits, descending),
    `indices (P, K)` int32 and `offsets (rows + 1,)`, where row r of the shard spans `offsets[r]:offsets[r + 1]`.
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.meta = json.loads((self.cache_dir / CACHE_META).read_text())
        self.top_k, self.vocab_size, self.num_rows = self.meta["top_k"], self.meta["vocab_size"], self.meta["num_rows"]
        self._starts = [0]
        for shard in self.meta["shards"]:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _shard(self, index: int):
        if index not in self._handles:
            from safetensors import safe_open

            handle = safe_open(self.cache_dir / self.meta["shards"][index]["file"], framework="pt")
            self._handles[index], self._offsets[index] = handle, handle.get_tensor("offsets").tolist()
        return self._handles[index], self._offsets[index]

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside the cache's {self.num_rows} rows")
        index = bisect.bisect_right(self._starts, row) - 1
        handle, offsets = self._shard(index)
        start, end = offsets[row - self._starts[index]], offsets[row - self._starts[index] + 1]
        return handle.get_slice("values")[start:end], handle.get_slice("indices")[start:end].long()

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers reopen the shards
        return {**self.__dict__, "_handles": {}, "_offsets": {}}


@torch.no_grad()
def build_teacher_cache(
    teacher: torch.nn.Module,
    dataset,
    collator: Callable,
    cache_dir: str | Path,
    top_k: int,
    batch_size: int = 8,
    dtype: str = "float32",
    rows_per_shard: int = 256,
) -> TeacherCache:
    """Run `teacher` over `dataset` (in order, collated by `collator`) and store its `top_k` largest logits at every
    token position (padding skipped) in safetensors shards of `rows_per_shard` rows. Memory holds one shard."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / CACHE_META).unlink(missing_ok=True)
    vocab_size = teacher.config.get_text_config().vocab_size
    k = min(top_k, vocab_size)
    device = teacher.device
    teacher.eval()
    digest, shards = hashlib.sha256(), []
    values, indices, lengths = [], [], []

    def flush() -> None:
        if not lengths:
            return
        from safetensors.torch import save_file

        name = f"shard_{len(shards):05d}.safetensors"
        offsets = torch.tensor([0] + lengths).cumsum(0)
        save_file({"values": torch.cat(values), "indices": torch.cat(indices), "offsets": offsets}, cache_dir / name)
        shards.append({"file": name, "rows": len(lengths)})
        values.clear()
        indices.clear()
        lengths.clear()

    for batch in _batches(dataset, collator, batch_size):
        if not shards and not lengths:
            position_bytes = k * (CACHE_DTYPES[dtype].itemsize + 4)
            estimate = len(dataset) * batch["input_ids"].shape[1] * position_bytes / 2**30
            logger.warning(
                f"Caching the teacher's top {k} logits for {len(dataset)} rows in {cache_dir}: ~{estimate:.2f} GiB."
            )
        _hash_batch(digest, batch)
        inputs = {key: batch[key].to(device) for key in INPUT_KEYS if batch.get(key) is not None}
        top = teacher(**inputs).logits.float().topk(k, dim=-1)  # (B, S, K), descending
        for row, positions in enumerate(_token_positions(batch)):
            positions = positions.to(device)
            values.append(top.values[row, positions].to(CACHE_DTYPES[dtype]).cpu())
            indices.append(top.indices[row, positions].to(torch.int32).cpu())
            lengths.append(len(positions))
        if len(lengths) >= rows_per_shard:
            flush()
    flush()
    meta = {
        "format": CACHE_FORMAT,
        "top_k": k,
        "vocab_size": vocab_size,
        "num_rows": len(dataset),
        "dtype": dtype,
        "batch_size": batch_size,
        "fingerprint": digest.hexdigest(),
        "teacher": str(getattr(teacher.config, "_name_or_path", "")),
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "shards": shards,
    }
    write_json_atomically(cache_dir / CACHE_META, meta)
    return TeacherCache(cache_dir)


def prepare_teacher_cache(
    teacher: torch.nn.Module | None, dataset, collator: Callable, cache_dir: str | Path, top_k: int, vocab_size: int,
    batch_size: int = 8, dtype: str = "float32",
) -> TeacherCache:  # fmt: skip
    """The cache in `cache_dir` if it was built on the same data (fingerprint) with the same `top_k`, vocabulary,
    dtype and, when `teacher` is given, the same teacher; otherwise a new one built with `teacher` (a `ValueError`
    without one). Without a teacher, whoever passes the folder vouches that it holds the intended teacher's logits."""
    meta_path = Path(cache_dir) / CACHE_META
    want = {"format": CACHE_FORMAT, "top_k": min(top_k, vocab_size), "vocab_size": vocab_size, "dtype": dtype,
            "num_rows": len(dataset), "batch_size": batch_size}  # fmt: skip
    if teacher is not None:
        want["teacher_fingerprint"] = teacher_fingerprint(teacher)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(key) == value for key, value in want.items()):
            if meta["fingerprint"] == data_fingerprint(dataset, collator, batch_size):
                logger.info(f"Reusing the teacher cache in {cache_dir}.")
                return TeacherCache(cache_dir)
        logger.info(f"The teacher cache in {cache_dir} was built on other data or settings; rebuilding it.")
    if teacher is None:
        raise ValueError(f"No usable teacher cache in {str(cache_dir)!r} and no teacher to build one.")
    return build_teacher_cache(teacher, dataset, collator, cache_dir, top_k, batch_size, dtype)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """`dataset` rows with their cached teacher logits added under `CACHE_KEYS`."""

    def __init__(self, dataset, cache: TeacherCache):
        if len(dataset) != len(cache):
            raise ValueError(f"The dataset has {len(dataset)} rows but the teacher cache {len(cache)}.")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        values, indices = self.cache[index]
        return {**self.dataset[index], CACHE_KEYS[0]: values, CACHE_KEYS[1]: indices}


class TeacherCacheCollator:
    """Collate rows with `collator`, then scatter each row's cached logits `(L, K)` into `(B, S, K)` at its token
    positions (attention mask 1), whatever the padding side; padding positions get zeros (never counted)."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cached = [(row[CACHE_KEYS[0]], row[CACHE_KEYS[1]]) for row in rows]
        batch = self.collator([{k: v for k, v in row.items() if k not in CACHE_KEYS} for row in rows])
        B, S = batch["input_ids"].shape
        K = cached[0][0].shape[-1]
        values = torch.zeros(B, S, K, dtype=cached[0][0].dtype)
        indices = torch.zeros(B, S, K, dtype=torch.long)
        for row, ((row_values, row_indices), positions) in enumerate(zip(cached, _token_positions(batch))):
            if len(positions) != len(row_values):
                raise ValueError(
                    f"A cached row has {len(row_values)} positions but its batch row {len(positions)} tokens: the "
                    "cache was built on other data; delete it to rebuild."
                )
            values[row, positions], indices[row, positions] = row_values, row_indices
        return {**batch, CACHE_KEYS[0]: values, CACHE_KEYS[1]: indices}
