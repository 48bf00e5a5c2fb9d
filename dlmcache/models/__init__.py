"""Native diffusion LMs. `MODEL_CLASSES` maps a checkpoint's `config.json` `model_type` to its class."""

from .dream import DreamConfig, DreamModel
from .layers import DLMModelMixin, DLMModelOutput
from .llada import LLaDAConfig, LLaDAModelLM

MODEL_CLASSES = {"llada": LLaDAModelLM, "Dream": DreamModel}
CONFIG_CLASSES = {name: cls.config_class for name, cls in MODEL_CLASSES.items()}

__all__ = [
    "CONFIG_CLASSES",
    "MODEL_CLASSES",
    "DLMModelMixin",
    "DLMModelOutput",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModelLM",
]
