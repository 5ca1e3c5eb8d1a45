"""Gemma: the LLaMA layout with head_dim set independently of hidden_size (the base adapter reads
`config.head_dim`); the attention scale is read from the module (`attention_scale`)."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma",)
