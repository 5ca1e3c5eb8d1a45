"""Proxies that are a weighted merge error (closed form, objectives.merge_error):

  wse       QCQA's weight-sharing error: sum_h ||W_h - W_g||_F^2 (C = I, M = I, mean merge)
  kv_recon  sum_h ||X (W_h - W_g)^T||^2 (M = I)
  attn_out  output-aware: key errors weighted by query energies, values by o_proj (sensitivity)
  fisher    attn_out weighted by the gradient second moment at each attention output, so that
            layers are comparable
Cost: tables of at most H^2 D^2 per layer and kind, built once on the model's device (one W C W^T
product); then one batched D x D inverse per new group and a dictionary lookup per known group;
no forward pass. Under the `aligned` merge each new group is scored directly, frames included
(objectives.aligned_error): exact, a few milliseconds per group.
"""

from __future__ import annotations

import torch

from objectives.aligned_error import AlignedMergeErrorTable
from objectives.merge_error import MergeErrorTable
from objectives.merging import check_foldable, frame_blocks
from objectives.proxies.base import GroupTableProxy, register_proxy
from objectives.sensitivity import key_weights, plain_weights, value_weights

# Merges with a closed form: name -> whether its merge weights N_h use the fisher weighting.
MERGE_WEIGHTS = {"query_aware": False, "aligned": False}
# Merges that rotate members into a common frame first: scored group by group
# (objectives.aligned_error) instead of from pairwise tables.
FRAMED_MERGES = {"aligned"}


class WeightedMergeProxy(GroupTableProxy):
    cost = "O(H^3) scalar lookups per new group, memoised; no forward pass"
    merge_override: str | None = None

    def head_weights(self, layer: int, kind: str) -> torch.Tensor:
        return plain_weights(self.adapter)

    def merge_weights(self, layer: int, kind: str) -> torch.Tensor | None:
        """N_h of the merge in use (None: the mean merge); see objectives.merging."""
        merge = self.merge_override or self.merge
        if merge == "mean":
            return None
        if merge not in MERGE_WEIGHTS:
            raise ValueError(f"proxy {self.name!r} has no closed form for merge {merge!r}")
        weigh = key_weights if kind == "k" else value_weights
        return weigh(self.adapter, layer, self.stats.layers[layer], fisher=MERGE_WEIGHTS[merge])

    def gram(self, layer: int, kind: str) -> torch.Tensor:
        return self.stats.layers[layer].gram

    def bias_moments(self, layer: int, kind: str) -> tuple[torch.Tensor, float]:
        """E[x] and E[1] paired with `gram`: the moments of the constant input a bias sees."""
        return self.stats.layers[layer].mean, 1.0

    def build_table(self, layer: int, kind: str) -> MergeErrorTable | AlignedMergeErrorTable:
        weights, biases = self.adapter.head_slices(layer, kind)
        weights = weights.detach().float()
        gram = self.gram(layer, kind).to(weights.device)
        if biases is not None:
            # A bias is a weight on a constant input 1: W~ = [W | b], C~ = [[C, m], [m^T, s]].
            mean, one = self.bias_moments(layer, kind)
            mean = mean.to(weights.device)
            weights = torch.cat([weights, biases.detach().float()[..., None]], -1)
            corner = torch.tensor([[one]], dtype=gram.dtype, device=weights.device)
            gram = torch.cat(
                [torch.cat([gram, mean[:, None]], 1), torch.cat([mean[None], corner], 1)]
            )
        if (self.merge_override or self.merge) in FRAMED_MERGES:
            check_foldable(self.adapter, layer)
            return AlignedMergeErrorTable(
                weights,
                self.adapter.source_kv_index(layer, kind),
                gram,
                self.head_weights(layer, kind),
                self.merge_weights(layer, kind),
                self.stats.layers[layer].covariance,
                frame_blocks(self.adapter, layer, kind),
            )
        return MergeErrorTable(
            weights,  # on the model's device: the table is built there
            self.adapter.source_kv_index(layer, kind),
            gram,
            self.head_weights(layer, kind),
            self.merge_weights(layer, kind),
        )


@register_proxy
class WeightSharingError(WeightedMergeProxy):
    name = "wse"
    merge_override = "mean"

    def gram(self, layer: int, kind: str) -> torch.Tensor:
        return torch.eye(self.adapter.hidden_size)

    def bias_moments(self, layer: int, kind: str) -> tuple[torch.Tensor, float]:
        return torch.zeros(self.adapter.hidden_size), 1.0  # biases count like weight columns


@register_proxy
class KVReconstruction(WeightedMergeProxy):
    name = "kv_recon"


@register_proxy
class AttentionOutput(WeightedMergeProxy):
    name = "attn_out"
    fisher = False

    def head_weights(self, layer: int, kind: str) -> torch.Tensor:
        weigh = key_weights if kind == "k" else value_weights
        return weigh(self.adapter, layer, self.stats.layers[layer], fisher=self.fisher)

    def gram(self, layer: int, kind: str) -> torch.Tensor:
        # A key error common to every token (from the mean input) shifts all of a query's logits
        # equally, which softmax ignores: only the centred part of the keys matters.
        stats = self.stats.layers[layer]
        return stats.covariance if kind == "k" else stats.gram

    def bias_moments(self, layer: int, kind: str) -> tuple[torch.Tensor, float]:
        if kind == "k":  # a key bias shifts every logit of a query equally: centred, it vanishes
            return torch.zeros(self.adapter.hidden_size), 0.0
        return super().bias_moments(layer, kind)


@register_proxy
class FisherAttentionOutput(AttentionOutput):
    name = "fisher"
    fisher = True
