"""Chunked attention computed blockwise: each chunk attends only within itself, `O(S * chunk)` work and memory.

transformers' masking utilities express chunked attention as a full `(S, S)` mask over an `S^2` attention
(256 MiB of mask alone at 16k tokens). When a whole sequence is processed at once (training, prefill) and its
real tokens are contiguous, the chunks are independent causal attentions over `chunk` tokens each: fold them
into the batch dimension and run SDPA with `is_causal=True`, no mask at all.

Shapes: B batch, h heads, S sequence, C chunk size, N = ceil(S / C) chunks, D head_dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def _rotate_rows(x_BhSD: torch.Tensor, shift_B: torch.Tensor) -> torch.Tensor:
    """Row b becomes `x[b, :, (s + shift[b]) % S]`: moves left padding to the right when shift = left padding."""
    B, h, S, D = x_BhSD.shape
    index_BS = (torch.arange(S, device=x_BhSD.device) + shift_B[:, None]) % S
    return x_BhSD.gather(2, index_BS[:, None, :, None].expand(B, h, S, D))


def _to_chunks(x_BhSD: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, h, S, D) -> (B * N, h, C, D), zero-padding the last chunk."""
    B, h, S, D = x_BhSD.shape
    n_chunks = -(-S // chunk)
    x_BhSD = F.pad(x_BhSD, (0, 0, 0, n_chunks * chunk - S))
    return x_BhSD.view(B, h, n_chunks, chunk, D).transpose(1, 2).reshape(B * n_chunks, h, chunk, D)


@dataclass
class BlockwiseChunks:
    """Stands in for the chunked layers' attention mask when they can be computed blockwise.

    `left_padding (B,)` counts the padding tokens before each row's first real token (None: no left padding);
    the rows are rotated so that every sequence starts at position 0, as transformers aligns chunks to it.
    """

    chunk_size: int
    left_padding: torch.Tensor | None = None

    def attend(
        self,
        module: torch.nn.Module,
        query_BhSD: torch.Tensor,
        key_BhSD: torch.Tensor,
        value_BhSD: torch.Tensor,
        scaling: float,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """Causal attention within each chunk; returns `(B, S, h, D)`, contiguous, like the attention interface (a
        tensor-parallel `o_proj` takes only contiguous inputs)."""
        B, _, S, _ = query_BhSD.shape
        if self.left_padding is not None:
            query_BhSD, key_BhSD, value_BhSD = (
                _rotate_rows(t, self.left_padding) for t in (query_BhSD, key_BhSD, value_BhSD)
            )
        chunks = [_to_chunks(t, self.chunk_size) for t in (query_BhSD, key_BhSD, value_BhSD)]
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        out_BNChD, _ = sdpa(module, *chunks, None, dropout=dropout, scaling=scaling, is_causal=True)
        out_BShD = out_BNChD.reshape(B, -1, *out_BNChD.shape[2:])[:, :S]
        if self.left_padding is not None:
            out_BShD = _rotate_rows(out_BShD.transpose(1, 2), -self.left_padding).transpose(1, 2)
        return out_BShD.contiguous()


def blockwise_chunks_for(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    seq_len: int,
    past_seen: int,
    chunk_size: int,
) -> BlockwiseChunks | None:
    """A `BlockwiseChunks` when a chunked layer can skip its dense mask here, else None: the whole sequence is
    processed at once (nothing cached before), it spans more than one chunk, each row's real tokens are
    contiguous (left or right padding only; right padding needs no mask since causality never reaches it), and
    `position_ids (B, S)` (given without a mask) do not restart within a row: packed sequences take the dense mask,
    which keeps them apart. Under `torch.compile` a padding mask or position ids always take the dense mask:
    checking them would read their values."""
    if seq_len <= chunk_size or past_seen != 0:  # decoding steps leave here first (compile-friendly)
        return None
    if attention_mask is None:
        if position_ids is not None and find_packed_sequence_indices(position_ids) is not None:
            return None
        return BlockwiseChunks(chunk_size)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    if torch.compiler.is_compiling():  # the checks below read the mask's values: a graph break, so the dense mask
        return None
    mask_BS = attention_mask.bool()
    real_B = mask_BS.sum(-1)
    left_B = (mask_BS.cumsum(-1) == 0).sum(-1)
    last_B = seq_len - 1 - mask_BS.flip(-1).int().argmax(-1)
    contiguous_B = (last_B - left_B + 1 == real_B) | (real_B == 0)
    all_contiguous, any_left_padding = torch.stack((contiguous_B.all(), left_B.any())).tolist()  # one read-back
    if not all_contiguous:
        return None  # padding between real tokens: use the dense mask
    return BlockwiseChunks(chunk_size, left_B if any_left_padding else None)


def refuse_packed_sequences(position_ids: torch.Tensor) -> None:
    """ValueError for packed sequences in chunked layers where transformers cannot mask them (before 5.23, its chunks
    follow the row, not each sequence), rather than silently different attention. Not under `torch.compile`."""
    if not torch.compiler.is_compiling() and find_packed_sequence_indices(position_ids) is not None:
        raise ValueError(
            f"`position_ids` restart within a row (packed sequences), which chunked attention layers support from "
            f"transformers 5.23 on (this is {transformers.__version__}); upgrade, or pass one sequence per row."
        )
