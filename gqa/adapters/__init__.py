"""Model-family adapters, registered by `model_type`. Importing this package registers them all."""

from gqa.adapters import (  # noqa: F401  (registration side effects)
    gemma,
    gemma2,
    gemma3,
    gpt2,
    granite,
    llama,
    mistral,
    olmo2,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
)
from gqa.adapters.base import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "get_adapter", "register_adapter"]
