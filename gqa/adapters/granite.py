"""Granite: the LLaMA layout with multipliers. Only `attention_multiplier` is inside attention
(it is the module's `scaling`, which proxies read through `attention_scale`); the embedding,
residual and logit multipliers are outside it and untouched by surgery."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)
