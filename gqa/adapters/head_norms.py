"""Per-head q/k norms with their own gains per head (StableLM `qk_layernorm`, Cohere `use_qk_norm`).

Each head is normalised over its own D dims, so a grouping changes only which gains the K norm
holds: group g gets the mean, over its query heads h, of the gain of the K head h read (as the
mean merge averages the projections). That is exact whenever a group's heads read K heads with
the same gain (the identity grouping, and expansion to MHA, which copies a group's gain to each
of its query heads), and an approximation otherwise; the proxies measure the pre-norm projection
error, as for Qwen3. The Q norm keeps its width; its gains move with reordered query heads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gqa.adapters.llama import LlamaAdapter


class PerHeadNormAdapter(LlamaAdapter):
    """Subclasses name the norms and say how to read their gains and build one of n heads."""

    q_norm_attr: ClassVar[str]
    k_norm_attr: ClassVar[str]

    def gains(self, norm: nn.Module) -> torch.Tensor:
        """The norm's gains as (n heads, D) (a copy where they are separate parameters)."""
        raise NotImplementedError

    def query_gains(self, norm: nn.Module):
        """The Q norm's gains as one (H*D,) tensor that whole-head reordering writes in place."""
        raise NotImplementedError

    def make_norm(self, like: nn.Module, gains: torch.Tensor) -> nn.Module:
        """A norm like `like` for gains.shape[0] heads, holding `gains` (n, D)."""
        raise NotImplementedError

    def _norm(self, module: nn.Module, attr: str) -> nn.Module | None:
        return getattr(module, attr, None)

    def query_head_tensors(self, layer: int) -> list:
        norm = self._norm(self.attention(layer), self.q_norm_attr)
        return [] if norm is None else [self.query_gains(norm)]

    def regrouped_modules(self, layer: int) -> list[nn.Module]:
        norm = self._norm(self.attention(layer), self.k_norm_attr)
        return super().regrouped_modules(layer) + ([] if norm is None else [norm])

    @torch.no_grad()
    def regroup_norms(self, module, layer, groups, merged_k) -> None:
        norm = self._norm(module, self.k_norm_attr)
        if norm is None:
            return
        if merged_k is None:  # shapes only: the checkpoint's gains are loaded next
            gains = torch.ones(len(groups), self.head_dim)
        else:
            source = self.gains(norm)
            index = self.source_kv_index(layer, "k").to(source.device)
            gains = torch.stack([source[index[list(g)]].mean(0) for g in groups])
        setattr(module, self.k_norm_attr, self.make_norm(norm, gains))

    @torch.no_grad()
    def expand_norms(self, module: nn.Module, k_index: torch.Tensor) -> None:
        norm = self._norm(module, self.k_norm_attr)
        if norm is not None:
            gains = self.gains(norm)
            setattr(module, self.k_norm_attr, self.make_norm(norm, gains[k_index.to(gains.device)]))
