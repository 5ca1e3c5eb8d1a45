"""Qwen3: the LLaMA layout with RMSNorm on each q and k head (one gain of width head_dim, shared
by all heads), applied before RoPE. The norm acts per head, so it is unchanged by any grouping;
a group's K head is the merged pre-norm projection, normalised like every other head."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
