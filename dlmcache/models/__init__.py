"""Native diffusion LMs.

`ARCHITECTURES` maps the `architectures` names of a checkpoint's `config.json` that the package loads
to their classes; `MODEL_CLASSES` maps `model_type` likewise (for configs without `architectures`).
`model_class(config)` picks one, or names what is supported.
"""

from .dream import DreamConfig, DreamModel, FastDLLMV2Config, FastDLLMV2ForCausalLM
from .layers import DLMModelMixin, DLMModelOutput
from .llada import LLaDAConfig, LLaDAModelLM
from .llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from .sdar import SDARConfig, SDARForCausalLM, SDARMoeConfig, SDARMoeForCausalLM

ARCHITECTURES = {
    "LLaDAModelLM": LLaDAModelLM,
    "DreamModel": DreamModel,
    "LLaDAMoEModelLM": LLaDAMoEModelLM,
    "SDARForCausalLM": SDARForCausalLM,
    "SDARMoeForCausalLM": SDARMoeForCausalLM,
    "LLaDA2MoeModelLM": LLaDA2MoeModelLM,
    "Fast_dLLM_QwenForCausalLM": FastDLLMV2ForCausalLM,
}
#: by model_type, for a config.json without `architectures` ("llada" is LLaDA-8B's; LLaDA-MoE's
#: releases, which share the model_type, list their architecture)
MODEL_CLASSES = {
    "llada": LLaDAModelLM, "Dream": DreamModel, "sdar": SDARForCausalLM, "sdar_moe": SDARMoeForCausalLM,
    "llada2_moe": LLaDA2MoeModelLM, "Fast_dLLM_Qwen": FastDLLMV2ForCausalLM,
}  # fmt: skip
#: every architecture's config class (their `architecture_fields` tell a config of one from another's)
CONFIG_CLASSES = {name: cls.config_class for name, cls in ARCHITECTURES.items()}


def model_class(config: dict, where: str = "config.json") -> type[DLMModelMixin]:
    """The class that loads a checkpoint with this `config.json` (a dict): by its `architectures`,
    else by its `model_type`; a ValueError names the supported architectures otherwise."""
    names = config.get("architectures") or []
    if not isinstance(names, list):
        raise ValueError(f"{where}: architectures={names!r} must be a list of class names")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and config.get("model_type") in MODEL_CLASSES:
        return MODEL_CLASSES[config["model_type"]]
    raise ValueError(
        f"{where}: architectures={names!r} (model_type={config.get('model_type')!r}) is not a diffusion LM "
        f"this package loads; supported architectures: {', '.join(ARCHITECTURES)}"
    )


__all__ = [
    "ARCHITECTURES",
    "CONFIG_CLASSES",
    "MODEL_CLASSES",
    "DLMModelMixin",
    "DLMModelOutput",
    "DreamConfig",
    "DreamModel",
    "FastDLLMV2Config",
    "FastDLLMV2ForCausalLM",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "LLaDAConfig",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "LLaDAModelLM",
    "SDARConfig",
    "SDARForCausalLM",
    "SDARMoeConfig",
    "SDARMoeForCausalLM",
    "model_class",
]
