"""Model-family adapters, registered by `model_type`. Importing this package registers them all."""

from gqa.adapters import (  # noqa: F401  (registration side effects)
    cohere,
    gemma,
    gemma2,
    gemma3,
    gpt2,
    gpt_neox,
    gptj,
    granite,
    llama,
    mistral,
    olmo,
    olmo2,
    opt,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
    smollm3,
    stablelm,
    starcoder2,
)
from gqa.adapters.base import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "get_adapter", "register_adapter"]
