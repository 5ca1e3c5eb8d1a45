"""OLMo 2: the LLaMA layout with RMSNorm over the *whole* q and k projections (before RoPE).

k_norm normalises each token's keys by r(x) = rms over all K heads of W x, then applies a gain
per output dimension. A grouping changes the K width, so the converted k_norm spans the group
heads instead. Closest conversion (an approximation, like the merge itself):
  gain of group g = c * mean over its query heads h of the gain slice of the K head h read,
  c = sqrt(E r'^2 / E r^2), with r' the rms over the merged heads, so that the normaliser keeps
  its average size; E is taken over isotropic inputs (Frobenius norms of the weights and biases).
What remains approximate is the token-dependent ratio r'(x) / (c r(x)). Exact (c = 1, r' = r)
whenever every source K head is duplicated equally often, the identity grouping included.
q_norm keeps its width; its gain moves with the query heads when they are reordered.
"""

import torch
from torch import nn

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


def _energy_per_dim(linear: nn.Linear) -> torch.Tensor:
    """E ||W x + b||^2 / width for x ~ N(0, I)."""
    energy = linear.weight.double().pow(2).sum()
    if linear.bias is not None:
        energy = energy + linear.bias.double().pow(2).sum()
    return energy / linear.out_features


@register_adapter
class Olmo2Adapter(LlamaAdapter):
    model_types = ("olmo2",)

    def query_head_tensors(self, layer: int) -> list[torch.Tensor]:
        return [self.attention(layer).q_norm.weight]

    def regrouped_modules(self, layer: int) -> list[nn.Module]:
        return [*super().regrouped_modules(layer), self.attention(layer).k_norm]

    def _replace_k_norm(self, module: nn.Module, gains: torch.Tensor) -> None:
        old = module.k_norm
        norm = type(old)(gains.numel(), eps=old.variance_epsilon).to(old.weight)
        norm.weight.data.copy_(gains.reshape(-1))
        module.k_norm = norm

    @torch.no_grad()
    def regroup_norms(self, module, layer, groups, merged_k) -> None:
        if merged_k is None:  # shapes only: the checkpoint's gains are loaded next
            self._replace_k_norm(module, torch.ones(len(groups) * self.head_dim))
            return
        gains = module.k_norm.weight.view(-1, self.head_dim)
        source = self.source_kv_index(layer, "k").to(gains.device)
        merged = torch.stack([gains[source[list(g)]].mean(0) for g in groups])
        c = (
            _energy_per_dim(merged_k) / _energy_per_dim(self.module_projection(module, "k"))
        ).sqrt()
        self._replace_k_norm(module, merged * c.to(merged.dtype))

    @torch.no_grad()
    def expand_norms(self, module: nn.Module, k_index: torch.Tensor) -> None:
        if k_index.bincount().unique().numel() > 1:
            raise ValueError(
                "olmo2's k_norm normalises over all K heads, so copying groups of unequal sizes "
                "to every query head changes it: expand_to_mha is exact only for equal-size groups"
            )
        self._replace_k_norm(module, module.k_norm.weight.view(-1, self.head_dim)[k_index])
