"""LLaMA: q/k/v/o projections under model.layers[i].self_attn, no biases by default."""

from gqa.adapters.base import ModelAdapter, register_adapter


@register_adapter
class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
