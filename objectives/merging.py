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
    """argmax over orthogonal R of tr(R M) for each M in the batch `cross` (..., s, s): the
    Procrustes solution R = V U^T of M = U S V^T; `proper` restricts R to rotations (det +1)."""
    u, _, vh = torch.linalg.svd(cross)
    v = vh.mH
    if proper:
        flip = torch.linalg.det(v @ u.mH) < 0
        if bool(flip.any()):
            v = v.clone()
            v[..., -1] = torch.where(flip[..., None], -v[..., -1], v[..., -1])
    return v @ u.mH


def frame_blocks(adapter, layer: int, kind: str) -> list[tuple[torch.Tensor, bool]]:
    """The dims a frame may mix, as (dims (B, s): B blocks of s dims, rotation only): for V one
    block of all D dims; for K each RoPE frequency pair (i, i + R/2) alone, rotations only (they
    commute with RoPE, so q.k is kept), and the unrotated dims (partial RoPE) as one free block."""
    d = adapter.head_dim
    inv_freq = adapter.rope_inv_freq(layer) if kind == "k" else None
    if inv_freq is None:
        return [(torch.arange(d)[None], False)]
    half = inv_freq.numel()
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], 1)
    rest = torch.arange(2 * half, d)
    return [(pairs, True)] + ([(rest[None], False)] if len(rest) else [])


def check_foldable(adapter, layer: int) -> None:
    """Frames fold into q and o only where nothing per head sits between (a norm's gain does
    not commute with a rotation)."""
    module = adapter.attention(layer)
    norms = [name for name, _ in module.named_children() if "norm" in name]
    if norms:
        raise ValueError(
            f"merge 'aligned' cannot fold frames past {adapter.config.model_type}'s "
            f"per-head {', '.join(norms)} (a norm's gain does not commute with a rotation)"
        )


def cross_moments(weights: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """K_hj = W_h C W_j^T for every pair of heads (n, n, D, D), float64: all the frames need."""
    w = weights.double()
    x = w @ covariance.double().to(w.device)
    return torch.einsum("hid,jad->hjia", x, w)


def member_frames(cross: torch.Tensor, blocks: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Per member, the block-orthogonal frame R_h that best maps its slice onto the group's
    common one, in the input metric C (min ||(R_h W_h - W) C^1/2||): generalized Procrustes,
    first onto the first member, then onto the mean of the aligned slices. Works on the cross
    moments K_hj = W_h C W_j^T (`cross_moments`) alone: W_h C W^T = (1/n) sum_j K_hj R_j^T for
    the mean W = (1/n) sum_j R_j W_j. `cross` (..., n, n, D, D) -> frames (..., n, D, D), float64;
    leading dims are groups scored at once."""
    *batch, n, _, d, _ = cross.shape
    frames = torch.zeros(*batch, n, d, d, dtype=torch.float64, device=cross.device)
    blocks = [(dims.to(cross.device), proper) for dims, proper in blocks]
    target = cross[..., 0, :, :]  # (..., n, D, D): W_h C W_0^T
    for _ in range(2):
        for dims, proper in blocks:
            rows, cols = dims[:, :, None], dims[:, None, :]  # (B, s, 1), (B, 1, s)
            frames[..., rows, cols] = _orthogonal_fit(target[..., rows, cols], proper)
        target = torch.einsum("...hjab,...jcb->...hac", cross, frames) / n
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
    check_foldable(ctx.adapter, ctx.layer)
    layer_stats = ctx.stats.layers[ctx.layer]
    weigh = key_weights if ctx.kind == "k" else value_weights
    m = weigh(ctx.adapter, ctx.layer, layer_stats)[list(ctx.heads)].double()
    blocks = frame_blocks(ctx.adapter, ctx.layer, ctx.kind)
    frames = member_frames(cross_moments(weights, layer_stats.covariance), blocks)
    rotated = torch.einsum("nij,njd->nid", frames, weights.double())
    m = frames.to(m.device) @ m @ frames.mT.to(m.device)
    merged = merge_weighted(rotated.to(weights.dtype), m)
    bias = None
    if biases is not None:
        turned = torch.einsum("nij,nj->ni", frames, biases.double()).to(biases.dtype)
        bias = merge_weighted(turned[..., None], m)[..., 0]
    return merged, bias, frames.to(weights.dtype)
