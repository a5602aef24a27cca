"""llama4x: an early-fusion multimodal Mixture-of-Experts decoder with interleaved RoPE/NoPE attention (iRoPE).

Importing the package registers its classes with transformers' `AutoConfig` / `AutoModel*`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llama4x import TEXT_PRESETS, Llama4XConfig, Llama4XTextConfig
from .modeling_llama4x import Llama4XForCausalLM, Llama4XPreTrainedModel, Llama4XTextModel

__version__ = "0.1.0"

AutoConfig.register(Llama4XTextConfig.model_type, Llama4XTextConfig, exist_ok=True)
AutoConfig.register(Llama4XConfig.model_type, Llama4XConfig, exist_ok=True)
AutoModel.register(Llama4XTextConfig, Llama4XTextModel, exist_ok=True)
AutoModelForCausalLM.register(Llama4XTextConfig, Llama4XForCausalLM, exist_ok=True)

# `save_pretrained` copies the code next to the weights and writes `auto_map`, so a saved folder also loads with
# `trust_remote_code=True` where llama4x is not installed.
Llama4XTextConfig.register_for_auto_class()
Llama4XConfig.register_for_auto_class()
Llama4XTextModel.register_for_auto_class("AutoModel")
Llama4XForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "TEXT_PRESETS",
    "Llama4XConfig",
    "Llama4XForCausalLM",
    "Llama4XPreTrainedModel",
    "Llama4XTextConfig",
    "Llama4XTextModel",
]
