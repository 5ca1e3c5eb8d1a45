"""SmolLM3: the LLaMA layout where some layers skip RoPE (`no_rope_layers[i] == 0`, read as the
module's `use_rope`) and some may use a sliding window (the module's own `sliding_window`).
The proxies see no RoPE on those layers: their key weighting uses the plain query moment."""

import torch

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class SmolLM3Adapter(LlamaAdapter):
    model_types = ("smollm3",)

    def rope_inv_freq(self, layer: int = 0) -> torch.Tensor | None:
        return super().rope_inv_freq(layer) if self.attention(layer).use_rope else None
