"""Data-aware merge methods, registered into `gqa.merge`: `query_aware` and `aligned`.

`query_aware` is the exact minimiser of the `attn_out` objective (objectives.merge_error):
keys  W_g = (sum_h M_h^K)^-1 sum_h M_h^K W_h, M^K diagonal from the query energies per RoPE pair;
values W_g = (sum_h P_h)^-1 sum_h P_h W_h with P_h = O_h^T O_h.
Biases (Qwen2) use the same weighted mean. It needs calibration statistics: convert(..., stats=).
`aligned` first rotates each member head into the group's common frame (orthogonal Procrustes;
for K only rotations that commute with RoPE) and folds the rotations into q and o, as Align-heads
(mha2gqa) does before merging.
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


def _orthogonal_fit(cross: torch.Tensor, proper: bool) -> torch.Tensor:
    """argmax over orthogonal R of tr(R M) for M = `cross` (the Procrustes solution R = V U^T
    of M = U S V^T); `proper` restricts R to rotations (det +1)."""
    u, _, vh = torch.linalg.svd(cross)
    v = vh.mH
    if proper and torch.linalg.det(v @ u.mH) < 0:
        v = v.clone()
        v[:, -1] = -v[:, -1]
    return v @ u.mH


def _blocks(adapter, layer: int, kind: str) -> list[tuple[list[int], bool]]:
    """The dims a frame may mix, as (dims, rotation only): for V one block of all D dims; for K
    each RoPE frequency pair (i, i + R/2) alone, rotations only (they commute with RoPE, so q.k is
    kept), and the unrotated dims (partial RoPE) as one free block."""
    d = adapter.head_dim
    inv_freq = adapter.rope_inv_freq(layer) if kind == "k" else None
    if inv_freq is None:
        return [(list(range(d)), False)]
    half = inv_freq.numel()
    pairs = [([i, i + half], True) for i in range(half)]
    rest = list(range(2 * half, d))
    return pairs + ([(rest, False)] if rest else [])


def _frames(
    weights: torch.Tensor, covariance: torch.Tensor, blocks: list[tuple[list[int], bool]]
) -> torch.Tensor:
    """Per member, the block-orthogonal frame R_h that best maps its slice onto the group's
    common one, in the input metric C (min ||(R_h W_h - W) C^1/2||): generalized Procrustes,
    first onto the first member, then onto the mean of the aligned slices."""
    n, d, _ = weights.shape
    w = weights.double()
    c = covariance.double().to(w.device)
    target = w[0]
    frames = torch.eye(d, dtype=torch.float64, device=w.device).repeat(n, 1, 1)
    for _ in range(2):
        for h in range(n):
            cross = w[h] @ c @ target.T  # (D, D): M = W_h C W^T
            for dims, proper in blocks:
                index = torch.tensor(dims, device=w.device)
                block = cross[index][:, index]
                frames[h][index[:, None], index] = _orthogonal_fit(block, proper)
        target = torch.einsum("nij,njd->id", frames, w) / n
    return frames


@register_merge("aligned", folds=True)
def aligned_merge(
    weights: torch.Tensor, biases: torch.Tensor | None, ctx: MergeContext
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`query_aware` after rotating each member into the group's common frame.

    Heads that compute the same thing in different bases (V up to any rotation, K up to rotations
    that commute with RoPE) are merged with no error: the frames are folded into the query rows
    and output columns (gqa.surgery), which keeps every q.k and o(v) as it was. The query-aware
    weights M_h rotate with their heads (R_h M_h R_h^T)."""
    if ctx.stats is None:
        raise ValueError("merge 'aligned' needs calibration statistics (pass stats=...)")
    module = ctx.adapter.attention(ctx.layer)
    norms = [name for name, _ in module.named_children() if "norm" in name]
    if norms:
        raise ValueError(
            f"merge 'aligned' cannot fold frames past {ctx.adapter.config.model_type}'s "
            f"per-head {', '.join(norms)} (a norm's gain does not commute with a rotation)"
        )
    layer_stats = ctx.stats.layers[ctx.layer]
    weigh = key_weights if ctx.kind == "k" else value_weights
    m = weigh(ctx.adapter, ctx.layer, layer_stats)[list(ctx.heads)].double()
    frames = _frames(weights, layer_stats.covariance, _blocks(ctx.adapter, ctx.layer, ctx.kind))
    rotated = torch.einsum("nij,njd->nid", frames, weights.double())
    m = frames.to(m.device) @ m @ frames.mT.to(m.device)
    merged = merge_weighted(rotated.to(weights.dtype), m)
    bias = None
    if biases is not None:
        turned = torch.einsum("nij,nj->ni", frames, biases.double()).to(biases.dtype)
        bias = merge_weighted(turned[..., None], m)[..., 0]
    return merged, bias, frames.to(weights.dtype)
