"""llama4x: an early-fusion multimodal Mixture-of-Experts decoder with interleaved RoPE/NoPE attention (iRoPE).

Importing the package registers its classes with transformers' `AutoConfig` / `AutoModel*` / `AutoImageProcessor` /
`AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

# Not `from transformers import AutoImageProcessor`: transformers 5.17 exports a placeholder that requires torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .configuration_llama4x import TEXT_PRESETS, VISION_PRESETS, Llama4XConfig, Llama4XTextConfig, Llama4XVisionConfig
from .lora import LORA_PARTS, lora_config
from .modeling_llama4x import Llama4XForCausalLM, Llama4XPreTrainedModel, Llama4XTextModel
from .modeling_multimodal import Llama4XForConditionalGeneration, Llama4XModel
from .processing_llama4x import Llama4XImageProcessor, Llama4XProcessor
from .vision import Llama4XVisionModel

__version__ = "0.1.0"

AutoConfig.register(Llama4XTextConfig.model_type, Llama4XTextConfig, exist_ok=True)
AutoConfig.register(Llama4XVisionConfig.model_type, Llama4XVisionConfig, exist_ok=True)
AutoConfig.register(Llama4XConfig.model_type, Llama4XConfig, exist_ok=True)
AutoModel.register(Llama4XTextConfig, Llama4XTextModel, exist_ok=True)
AutoModel.register(Llama4XVisionConfig, Llama4XVisionModel, exist_ok=True)
AutoModel.register(Llama4XConfig, Llama4XModel, exist_ok=True)
AutoModelForCausalLM.register(Llama4XTextConfig, Llama4XForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(Llama4XConfig, Llama4XForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(Llama4XConfig, image_processor_classes={"pil": Llama4XImageProcessor}, exist_ok=True)
AutoProcessor.register(Llama4XConfig, Llama4XProcessor, exist_ok=True)

# `save_pretrained` copies the code next to the weights and writes `auto_map`, so a saved folder also loads with
# `trust_remote_code=True` where llama4x is not installed.
Llama4XTextConfig.register_for_auto_class()
Llama4XVisionConfig.register_for_auto_class()
Llama4XConfig.register_for_auto_class()
Llama4XTextModel.register_for_auto_class("AutoModel")
Llama4XForCausalLM.register_for_auto_class("AutoModelForCausalLM")
Llama4XImageProcessor.register_for_auto_class("AutoImageProcessor")
Llama4XProcessor.register_for_auto_class("AutoProcessor")
Llama4XModel.register_for_auto_class("AutoModel")
Llama4XForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "LORA_PARTS",
    "TEXT_PRESETS",
    "VISION_PRESETS",
    "Llama4XConfig",
    "Llama4XForCausalLM",
    "Llama4XForConditionalGeneration",
    "Llama4XImageProcessor",
    "Llama4XModel",
    "Llama4XPreTrainedModel",
    "Llama4XProcessor",
    "Llama4XTextConfig",
    "Llama4XTextModel",
    "Llama4XVisionConfig",
    "Llama4XVisionModel",
    "lora_config",
]

# Distillation imports transformers.Trainer, so its public names load on first access (`llama4x.DistillationTrainer`).
_DISTILLATION_EXPORTS = (
    "DistillationArguments",
    "DistillationTrainer",
    "distillation_loss",
    "init_student_from_teacher",
    "student_config",
)
__all__ += list(_DISTILLATION_EXPORTS)


def __getattr__(name: str):
    if name in _DISTILLATION_EXPORTS:
        from . import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module 'llama4x' has no attribute {name!r}")
