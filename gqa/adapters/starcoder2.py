"""StarCoder2: the LLaMA layout with biases on q/k/v/o (`use_bias`, merged like the weights) and
the config's sliding window passed to the attention function (it reaches it through the mask)."""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class Starcoder2Adapter(LlamaAdapter):
    model_types = ("starcoder2",)
