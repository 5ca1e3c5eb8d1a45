"""`act_cos`: AsymGQA's activation-similarity criterion, as a loss.

Each query head's K (V) activations on the sampled calibration tokens, a_h = X W_s(h)^T
flattened, are compared with their group's mean activation: loss = sum_h (1 - cos(a_h, mean_g a)).
Cost: one H x H Gram matrix of activations per layer; O(H^2) per new group, memoised.
"""

from __future__ import annotations

import torch

from objectives.merge_error import memoised_batches
from objectives.proxies.base import GroupTableProxy, register_proxy


class _CosineTable:
    def __init__(self, features: torch.Tensor):  # (H, F)
        f = features.double()
        self.gram = f @ f.T
        self.norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        self.cache: dict[tuple[int, ...], float] = {}

    @property
    def nbytes(self) -> int:
        return self.gram.numel() * self.gram.element_size() + self.norms.numel() * 8

    def __call__(self, group: tuple[int, ...]) -> float:
        value = self.cache.get(group)
        if value is None:
            value = self.errors([group])[0]
        return value

    def errors(self, groups, near=None) -> list[float]:  # `near`: unused (no block sums)
        """Losses of many groups; the unknown ones are scored together, one batch per size."""
        return memoised_batches(groups, self.cache, self.gram.device, self._bucket)

    def _bucket(self, g: torch.Tensor) -> torch.Tensor:
        """Losses of B groups of one size n: g (B, n) of sorted query heads -> (B,)."""
        size = g.shape[1]
        block = self.gram[g[:, :, None], g[:, None, :]]  # (B, n, n)
        dots = block.sum(2) / size  # <a_h, mean>
        mean_norm = (block.sum((1, 2)) / size**2).clamp_min(1e-30).sqrt()
        return (1 - dots / (self.norms[g] * mean_norm[:, None])).sum(1)


@register_proxy
class ActivationCosine(GroupTableProxy):
    name = "act_cos"
    cost = "O(H^2) per new group, memoised; one activation Gram per layer"

    def build_table(self, layer: int, kind: str) -> _CosineTable:
        x = self.stats.layers[layer].inputs.reshape(-1, self.adapter.hidden_size)  # (N, d)
        weights, biases = self.adapter.head_slices(layer, kind)
        weights = weights.detach().float()
        source = self.adapter.source_kv_index(layer, kind).to(weights.device)
        acts = torch.einsum("nd,hid->hni", x.to(weights.device).float(), weights[source])
        if biases is not None:
            acts = acts + biases.detach().float()[source][:, None]
        return _CosineTable(acts.reshape(acts.shape[0], -1))
