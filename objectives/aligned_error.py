"""Error of the `aligned` merge of a group of heads, scored group by group for the table proxies.

The `aligned` merge (objectives.merging) rotates each member into the group's common frame before
the query-aware merge. The frames depend on the whole group, so the pairwise tables of
objectives.merge_error do not apply; each group is scored directly instead. Member h reads the
merged head through its frame (R_h^T W_g, folded into q or o), so with W'_h = R_h W_h,
M'_h = R_h M_h R_h^T, N'_h = R_h N_h R_h^T and N_g = sum_h N'_h

    e(g) = sum_h tr(M'_h (W'_h - W_g) C (W'_h - W_g)^T),   W_g = N_g^-1 sum_b P_b W_b,  P_b = N'_b R_b,

the weighted-merge error of objectives.merge_error in the rotated frame. Everything is D x D:
with G_ab = W_a C W_b^T (source pairs, built once per layer and kind, like the frames' own
K_ab = W_a Cov W_b^T),

    e(g) = sum_h tr(M'_h R_h G_hh R_h^T) - 2 sum_h tr(M'_h R_h A_h N_g^-T) + tr(M_g N_g^-1 V N_g^-T),
    A_h = sum_b G_hb P_b^T,   V = sum_{b,c} P_b G_bc P_c^T,   M_g = sum_h M'_h.

A new group costs its frames (batched 2 x 2 SVDs per RoPE pair for K, one D x D SVD for V, two
rounds; memoised by the members' source heads, all they depend on) and O(n^2 D^3) flops, in
float64. New groups of one size are scored in batches and memoised, like the pairwise tables'.
"""

from __future__ import annotations

import torch

from objectives.merge_error import GATHER_BYTES, GroupErrorTable, regularised
from objectives.merging import cross_moments, member_frames


class AlignedMergeErrorTable(GroupErrorTable):
    """e(g) under the `aligned` merge for every group g of one layer and one of K/V."""

    def __init__(
        self,
        weights: torch.Tensor,  # (n_src, D, d') source heads, d' = d (+ 1 for a bias column)
        source: torch.Tensor,  # (H,) source head read by each query head
        gram: torch.Tensor,  # (d', d') the error's input moment
        error_weights: torch.Tensor,  # (H, D, D): M_h
        merge_weights: torch.Tensor,  # (H, D, D): N_h of the query-aware merge
        covariance: torch.Tensor,  # (d, d): the metric the frames are fitted in
        blocks: list[tuple[torch.Tensor, bool]],  # objectives.merging.frame_blocks
    ):
        device = weights.device
        hidden = covariance.shape[0]
        self.device = device
        self.source = source.to(device)
        self.frame_moments = cross_moments(weights[..., :hidden], covariance)  # (n_src,)^2 D^2
        self.error_moments = cross_moments(weights, gram)
        self.m = error_weights.double().to(device)
        self.n = merge_weights.double().to(device)
        self.blocks = blocks
        self.cache: dict[tuple[int, ...], float] = {}
        # The frames depend on the members' source heads only (not on M or N): with a GQA source
        # many groups of query heads share them.
        self.frames: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the moments and weights (not the memo)."""
        tensors = (self.frame_moments, self.error_moments, self.m, self.n)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _bucket(self, index: torch.Tensor) -> torch.Tensor:
        """Errors of B groups of one size n: index (B, n) -> (B,), in chunks that hold the
        (n, n, D, D) moments of about GATHER_BYTES at once."""
        n, d = index.shape[1], self.m.shape[-1]
        chunk = max(1, GATHER_BYTES // (2 * n * n * d * d * 8))
        return torch.cat([self._errors(rows) for rows in index.split(chunk)])

    def _group_frames(self, members: torch.Tensor) -> torch.Tensor:
        """R_h for each row of source heads (B, n) -> (B, n, D, D), new rows fitted at once."""
        keys = [tuple(row) for row in members.tolist()]
        new = list(dict.fromkeys(k for k in keys if k not in self.frames))
        if new:
            rows = torch.tensor(new, device=members.device)
            moments = self.frame_moments[rows[:, :, None], rows[:, None, :]]
            self.frames.update(zip(new, member_frames(moments, self.blocks), strict=True))
        return torch.stack([self.frames[k] for k in keys])

    def _errors(self, heads: torch.Tensor) -> torch.Tensor:
        members = self.source[heads]  # (B, n)
        frames = self._group_frames(members)  # R_h
        g = self.error_moments[members[:, :, None], members[:, None, :]]  # (B, n, n, D, D): G_hb
        m = frames @ self.m[heads] @ frames.mT  # M'_h
        p = frames @ self.n[heads]  # P_b = N'_b R_b = R_b N_b
        inverse = torch.linalg.inv(regularised((p @ frames.mT).sum(1)))  # N_g^-1
        own = frames @ g.diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2) @ frames.mT
        a = torch.einsum("zhbij,zbkj->zhik", g, p)  # A_h
        v = torch.einsum("zbij,zbcjk,zclk->zil", p, g, p)  # V
        first = torch.einsum("zhij,zhji->z", m, own)
        second = torch.einsum("zhij,zhji->z", m, frames @ a @ inverse.mT[:, None])
        third = torch.einsum("zij,zji->z", m.sum(1), inverse @ v @ inverse.mT)
        return first - 2 * second + third
