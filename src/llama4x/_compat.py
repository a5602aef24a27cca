"""Differences between the transformers releases llama4x supports (>=5.17,<6), in one place."""

import dataclasses

from transformers.modeling_outputs import MoeModelOutputWithPast

# transformers 5.24 renamed the `past_key_values` argument and output field to `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"
