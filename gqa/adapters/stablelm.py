"""StableLM: the LLaMA layout with partial RoPE, optional q/k/v biases and optional per-head q/k
LayerNorms (`qk_layernorm`: one nn.LayerNorm per head; see head_norms).

The module reshapes K and V with its `num_key_value_heads`, one count for both: once K/V are
regrouped it is set to -1, so `view` infers each one's head count (K and V may differ).
"""

import torch
from torch import nn

from gqa.adapters.base import register_adapter
from gqa.adapters.head_norms import PerHeadNormAdapter


class _StackedGains:
    """The gains of per-head LayerNorms seen as one (H*D,) tensor, for reordering whole heads in
    place (`gqa.surgery.permute_query_heads` needs only `device`, `index_select` and `copy_`)."""

    def __init__(self, norms: nn.ModuleList):
        self.weights = [norm.weight for norm in norms]
        self.device = self.weights[0].device

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return torch.cat([w.detach() for w in self.weights]).index_select(dim, index)

    @torch.no_grad()
    def copy_(self, source: torch.Tensor) -> None:
        for weight, part in zip(self.weights, source.view(len(self.weights), -1), strict=True):
            weight.copy_(part)


@register_adapter
class StableLmAdapter(PerHeadNormAdapter):
    model_types = ("stablelm",)
    q_norm_attr = "q_layernorm"
    k_norm_attr = "k_layernorm"

    def gains(self, norm: nn.Module) -> torch.Tensor:
        return torch.stack([head.weight for head in norm.norms])

    def query_gains(self, norm: nn.Module) -> _StackedGains:
        return _StackedGains(norm.norms)

    def make_norm(self, like: nn.Module, gains: torch.Tensor) -> nn.Module:
        first = like.norms[0]
        norm = type(like)(like.dim, gains.shape[0], eps=first.eps, bias=first.bias is not None)
        norm.to(first.weight)
        for head, gain in zip(norm.norms, gains, strict=True):
            head.weight.data.copy_(gain)
        return norm

    def set_module_projection(self, module: nn.Module, which: str, linear: nn.Linear) -> None:
        super().set_module_projection(module, which, linear)
        if which in "kv":
            module.num_key_value_heads = -1

    def to_stock(self, layer: int) -> None:
        module = self.attention(layer)
        module.num_key_value_heads = module.k_proj.out_features // self.head_dim
