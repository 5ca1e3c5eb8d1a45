"""Closed-form error of merging a group of heads, from per-layer pairwise tables.

Setting (one layer, K or V). Query head h reads source head s(h) with weight W_h := W_s(h)
(D x d); a group g of query heads is served by one merged head W_g. The error of the group is

    e(g) = sum_{h in g} tr( M_h (W_h - W_g) C (W_h - W_g)^T )

with C = E[x x^T] (d x d) the input second moment and M_h (D x D, symmetric PSD) a per-head
weighting of the output dimensions: I for plain reconstruction, the query energies for keys,
O_h^T O_h for values (see `objectives.sensitivity`). Let K_ab = W_a C W_b^T (D x D), n = |g|.

  mean merge, W_g = (1/n) sum_b W_b:
    e(g) = sum_h tr(M_h K_hh) - (2/n) sum_{h,b} tr(M_h K_hb) + (1/n^2) sum_{h,b,c} tr(M_h K_bc)

  weighted merge with weights N_h, W_g = N_g^-1 sum_b N_b W_b, N_g = sum_b N_b (the
  `query_aware` merge uses the attn_out weights as N):
    e(g) = sum_h tr(M_h K_hh) - 2 tr(N_g^-1 A_g) + tr(N_g^-1 M_g N_g^-1 V_g),
    A_g = sum_{b,h} N_b K_bh M_h,  V_g = sum_{b,c} N_b K_bc N_c,  M_g = sum_h M_h.
  When N = M this is the minimum over W_g (the gradient sum_h M_h (W_g - W_h) C vanishes there)
  and simplifies to sum_h tr(M_h K_hh) - tr(M_g^-1 V_g).

All traces and products are precomputed once per layer, so scoring a group costs O(n^3) scalar
lookups (mean) or two D x D solves (weighted); no forward pass. Group errors are memoised: a
layer has at most 2^H - 1 distinct groups.
"""

from __future__ import annotations

import torch


class MergeErrorTable:
    """e(g) for every group g of one layer and one of K/V, under one merge."""

    def __init__(
        self,
        weights: torch.Tensor,  # (n_src, D, d) source heads
        source: torch.Tensor,  # (H,) source head read by each query head
        gram: torch.Tensor,  # (d, d)
        error_weights: torch.Tensor,  # (H, D, D): M_h
        merge_weights: torch.Tensor | None = None,  # (H, D, D): N_h; None for the mean merge
    ):
        w = weights.double()
        k_src = torch.einsum("aid,de,bje->abij", w, gram.double(), w)  # K_ab for source pairs
        k = k_src[source][:, source]  # (H, H, D, D), indexed by query heads
        m = error_weights.double()
        heads = torch.arange(len(source))
        self.diag = torch.einsum("hij,hji->h", m, k[heads, heads])  # tr(M_h K_hh)
        self.weighted = merge_weights is not None
        if self.weighted:
            n = merge_weights.double()
            self.m, self.n = m, n
            self.a = torch.einsum("bij,bhjk,hkl->bhil", n, k, m)  # N_b K_bh M_h
            self.v = torch.einsum("bij,bcjk,ckl->bcil", n, k, n)  # N_b K_bc N_c
        else:
            self.t = torch.einsum("hij,hbji->hb", m, k)  # tr(M_h K_hb)
            self.u = torch.einsum("hij,bcji->hbc", m, k)  # tr(M_h K_bc)
        self.cache: dict[tuple[int, ...], float] = {}

    def __call__(self, group: tuple[int, ...]) -> float:
        value = self.cache.get(group)
        if value is None:
            value = self._compute(list(group))
            self.cache[group] = value
        return value

    def _compute(self, g: list[int]) -> float:
        own = float(self.diag[g].sum())
        if not self.weighted:
            n = len(g)
            cross = float(self.t[g][:, g].sum())
            spread = float(self.u[g][:, g][:, :, g].sum())
            return max(own - 2.0 * cross / n + spread / n**2, 0.0)
        n_g = _regularised(self.n[g].sum(0))
        a_g = self.a[g][:, g].sum((0, 1))
        v_g = self.v[g][:, g].sum((0, 1))
        m_g = self.m[g].sum(0)
        cross = float(torch.linalg.solve(n_g, a_g).diagonal().sum())
        w_v = torch.linalg.solve(n_g, v_g)  # N_g^-1 V_g
        spread = float((torch.linalg.solve(n_g, m_g) @ w_v).diagonal().sum())
        return max(own - 2.0 * cross + spread, 0.0)


def _regularised(m: torch.Tensor) -> torch.Tensor:
    ridge = 1e-12 * float(m.diagonal().mean().abs()) + 1e-30
    return m + ridge * torch.eye(m.shape[0], dtype=m.dtype)


def merge_weighted(
    weights: torch.Tensor,  # (n, D, d) the members' source slices
    head_weights: torch.Tensor,  # (n, D, D)
) -> torch.Tensor:
    """The minimiser of sum_h tr(M_h (W_h - W) C (W_h - W)^T): W = (sum M_h)^-1 sum M_h W_h."""
    m = head_weights.double()
    rhs = torch.einsum("nij,njd->id", m, weights.double())
    return torch.linalg.solve(_regularised(m.sum(0)), rhs).to(weights.dtype)
