"""Model-family adapters, registered by `model_type`. Importing this package registers them all."""

from gqa.adapters import llama, mistral, qwen2  # noqa: F401  (registration side effects)
from gqa.adapters.base import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "get_adapter", "register_adapter"]
