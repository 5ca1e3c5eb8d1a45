"""`act_cos`: AsymGQA's activation-similarity criterion, as a loss.

Each query head's K (V) activations on the sampled calibration tokens, a_h = X W_s(h)^T
flattened, are compared with their group's mean activation: loss = sum_h (1 - cos(a_h, mean_g a)).
Cost: one H x H Gram matrix of activations per layer; O(H^2) per new group, memoised.
"""

from __future__ import annotations

import torch

from objectives.proxies.base import GroupTableProxy, register_proxy


class _CosineTable:
    def __init__(self, features: torch.Tensor):  # (H, F)
        f = features.double()
        self.gram = f @ f.T
        self.norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        self.cache: dict[tuple[int, ...], float] = {}

    def __call__(self, group: tuple[int, ...]) -> float:
        value = self.cache.get(group)
        if value is None:
            g = list(group)
            n = len(g)
            dots = self.gram[g][:, g].sum(1) / n  # <a_h, mean>
            mean_norm = (self.gram[g][:, g].sum() / n**2).clamp_min(1e-30).sqrt()
            value = float((1 - dots / (self.norms[g] * mean_norm)).sum())
            self.cache[group] = value
        return value


@register_proxy
class ActivationCosine(GroupTableProxy):
    name = "act_cos"
    cost = "O(H^2) per new group, memoised; one activation Gram per layer"

    def build_table(self, layer: int, kind: str) -> _CosineTable:
        x = self.stats.layers[layer].inputs.reshape(-1, self.adapter.hidden_size)  # (N, d)
        weights, biases = self.adapter.head_slices(layer, kind)
        source = self.adapter.source_kv_index(layer, kind).cpu()
        acts = torch.einsum("nd,hid->hni", x.float(), weights.detach().float().cpu()[source])
        if biases is not None:
            acts = acts + biases.detach().float().cpu()[source][:, None]
        return _CosineTable(acts.reshape(acts.shape[0], -1))
