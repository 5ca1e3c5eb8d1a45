"""GPT-2: an MHA source without RoPE; q/k/v fused in a Conv1D `c_attn` (weight stored (in, out)).

The module splits `c_attn`'s output with `split_size`; torch's `split` also takes a list of
sizes, so recording [q, k, v] widths there lets K and V have their own head counts. Stock GPT-2
has no GQA, so converted models always save in headgroup's format (`expand_to_mha` exports to
stock GPT-2 at full KV cost).
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gqa.adapters.base import UnsupportedModelError, register_adapter
from gqa.adapters.fused import FusedQKVAdapter, concat_linear


@register_adapter
class GPT2Adapter(FusedQKVAdapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    rotary_path = None
    attention_attr = "attn"
    projection_names = {"o": "c_proj"}
    fused_attr = "c_attn"
    transposed = True
    stock_gqa = False

    def check_supported(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("gpt2 with cross-attention is not a decoder-only model")

    def output_weight(self, layer: int) -> torch.Tensor:
        return self.projection(layer, "o").weight.T

    def qkv_sizes(self, module: nn.Module) -> tuple[int, int, int]:
        split = module.split_size
        return tuple(split) if isinstance(split, list) else (split, split, split)

    def record_sizes(self, module: nn.Module, sizes: tuple[int, int, int]) -> None:
        module.split_size = sizes[0] if len(set(sizes)) == 1 else list(sizes)

    def fuse(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Module:
        weight, bias = concat_linear(q, k, v)
        fused = Conv1D(weight.shape[0], weight.shape[1]).to(weight)
        fused.weight.data.copy_(weight.T)
        fused.bias.data.copy_(bias)
        return fused
