"""Qwen2: the LLaMA layout with biases on q/k/v (merged like the weights) and none on o."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)
