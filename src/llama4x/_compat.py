"""Differences between the transformers releases llama4x supports (>=5.17,<6), in one place."""

import dataclasses

from transformers import masking_utils
from transformers.modeling_outputs import MoeModelOutputWithPast

# transformers 5.24 renamed the `past_key_values` argument and output field to `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"

# Chunked masks line the chunks up with each packed sequence (position ids restarting in a row) from transformers 5.23
# on; before, with the row, so a sequence starting inside a chunk would see chunks that differ from its own.
PACKED_CHUNKED_MASKS = hasattr(masking_utils, "remap_positions_for_packed_sequence")
