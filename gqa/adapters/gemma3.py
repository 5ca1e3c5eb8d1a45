"""Gemma 3 (text): Gemma 2's attention with per-head q/k RMSNorm (as Qwen3's, unchanged by a
grouping) and one RoPE per layer type (local base for sliding layers, global for full ones)."""

import torch
from torch import nn

from gqa.adapters.base import register_adapter
from gqa.adapters.gemma2 import Gemma2Adapter


@register_adapter
class Gemma3TextAdapter(Gemma2Adapter):
    model_types = ("gemma3_text",)

    def rope_inv_freq(self, layer: int = 0) -> torch.Tensor:
        layer_type = self.attention(layer).layer_type
        return getattr(self._get(self.rotary_path), f"{layer_type}_inv_freq")

    def position_embeddings(self, x: torch.Tensor, module: nn.Module | None = None):
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        layer_type = (module or self.attention(0)).layer_type
        return self._get(self.rotary_path)(x, positions, layer_type)
