"""Mistral: the LLaMA layout (sliding-window attention is passed through to the attention function)."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)
