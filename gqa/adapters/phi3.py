"""Phi-3: q/k/v fused in `qkv_proj`; the module slices K by its own `num_key_value_heads`."""

from torch import nn

from gqa.adapters.base import register_adapter
from gqa.adapters.fused import FusedQKVAdapter, concat_linear, linear_from


@register_adapter
class Phi3Adapter(FusedQKVAdapter):
    model_types = ("phi3",)

    def qkv_sizes(self, module: nn.Module) -> tuple[int, int, int]:
        q = self.num_heads * self.head_dim
        k = module.num_key_value_heads * self.head_dim
        return q, k, self._fused_weight(module.qkv_proj).shape[0] - q - k

    def record_sizes(self, module: nn.Module, sizes: tuple[int, int, int]) -> None:
        # V is whatever follows K, so K's head count is all the module needs.
        module.num_key_value_heads = sizes[1] // self.head_dim

    def fuse(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Module:
        return linear_from(*concat_linear(q, k, v))
