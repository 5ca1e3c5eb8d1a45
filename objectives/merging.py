"""Data-aware merge methods, registered into `gqa.merge`: `query_aware`.

`query_aware` is the exact minimiser of the `attn_out` objective (objectives.merge_error):
keys  W_g = (sum_h M_h^K)^-1 sum_h M_h^K W_h, M^K diagonal from the query energies per RoPE pair;
values W_g = (sum_h P_h)^-1 sum_h P_h W_h with P_h = O_h^T O_h.
Biases (Qwen2) use the same weighted mean. It needs calibration statistics: convert(..., stats=).
"""

from __future__ import annotations

import torch

from gqa.merge import MergeContext, register_merge
from objectives.merge_error import merge_weighted
from objectives.sensitivity import key_weights, value_weights


@register_merge("query_aware")
def query_aware_merge(
    weights: torch.Tensor, biases: torch.Tensor | None, ctx: MergeContext
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if ctx.stats is None:
        raise ValueError("merge 'query_aware' needs calibration statistics (pass stats=...)")
    layer_stats = ctx.stats.layers[ctx.layer]
    weigh = key_weights if ctx.kind == "k" else value_weights
    m = weigh(ctx.adapter, ctx.layer, layer_stats)[list(ctx.heads)]
    merged = merge_weighted(weights, m)
    bias = None if biases is None else merge_weighted(biases[..., None], m)[..., 0]
    return merged, bias
