"""Checks of user inputs to the decoder (and of device names), with errors that name the problem.

Value checks (token-id range, finite embeddings, largest position id) read the tensors back, so they run on
whole-sequence calls (training, prefill) only: a decoding step feeds the model's own argmax/sampled ids, which are in
range, and stays free of host synchronisation. Nothing runs under `torch.compile`.
"""

import torch
from transformers.utils import is_torchdynamo_compiling

from .configuration_llama4x import Llama4XTextConfig


def check_text_inputs(
    config: Llama4XTextConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_seen: int,
) -> None:
    """Raise `ValueError`/`TypeError` for inputs the decoder would mis-handle or crash on obscurely."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    if is_torchdynamo_compiling():
        return
    if input_ids is not None:
        check_input_ids(config, input_ids)
        batch, seq_len = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be (batch, sequence, hidden_size={config.hidden_size}); "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        batch, seq_len = inputs_embeds.shape[:2]
        if seq_len > 1 and not bool(torch.isfinite(inputs_embeds).all()):
            raise ValueError("`inputs_embeds` contains NaN or infinite values.")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        expected = (batch, past_seen + seq_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, past + current tokens) "
                f"= {expected}."
            )
    # Dynamic NTK RoPE is made for longer sequences: it raises its base beyond max_position_embeddings.
    if config.rope_parameters.get("rope_type") != "dynamic":
        _check_positions(config, position_ids, past_seen, seq_len)


def _check_positions(
    config: Llama4XTextConfig, position_ids: torch.Tensor | None, past_seen: int, seq_len: int
) -> None:
    limit = config.max_position_embeddings
    advice = "raise it in the config (with a RoPE scaling in `rope_parameters` if the model was trained shorter)."
    if position_ids is not None and seq_len > 1:  # packed sequences fill a row longer than each of them
        last = int(position_ids.max())  # one read-back (a host sync on GPUs)
        if last >= limit:
            raise ValueError(
                f"`position_ids` holds position {last}, outside [0, max_position_embeddings={limit}); {advice}"
            )
    elif past_seen + seq_len > limit:
        raise ValueError(
            f"Sequence of {past_seen + seq_len} tokens ({past_seen} cached + {seq_len} new) exceeds "
            f"max_position_embeddings={limit}; {advice}"
        )


def check_input_ids(config: Llama4XTextConfig, input_ids: torch.Tensor) -> None:
    """Token ids: integer dtype, `(batch, sequence)`, in `[0, vocab_size)` (the range on whole sequences only)."""
    if is_torchdynamo_compiling():
        return
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"`input_ids` must hold integer token ids; got dtype {input_ids.dtype}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (batch, sequence); got shape {tuple(input_ids.shape)}.")
    if input_ids.shape[1] > 1 and input_ids.numel():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one read-back (a host sync on GPUs)
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"`input_ids` holds token id {bad}, outside [0, vocab_size={config.vocab_size}).")


def check_device(option: str, name: str) -> torch.device:
    """`name` as a `torch.device`: cpu, or cuda / cuda:N where this machine has that CUDA device; a `ValueError`
    naming `option` otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {name!r}: expected cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: no CUDA device is available.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return device
