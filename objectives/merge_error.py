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

Storage (issue 10: 7B-shaped layers, H = 32, D = 128, d = 4096, MHA). The eager tables of
K_ab, N_b K_bh M_h and N_b K_bc N_c for every pair were 3 x H^2 D^2 doubles (400 MB per kind).
Here only what a group sum needs is kept:
  - V blocks Q_bc = N_b K_bc N_c for b <= c only, since Q_cb = Q_bc^T (H (H + 1) / 2 blocks, f64);
  - A blocks P_bh = N_b K_bh M_h only when M is not a multiple of N. When M_h = c N_h for all h
    (keys under query_aware: both are the RoPE query moment, scaled; values of attn_out: M = N)
    A_g = c V_g and no P is stored. Otherwise P is kept whole (H^2 blocks, 134 MB at 7B shape);
    float32 storage was tried and is not enough: a group of near-duplicate heads has an error
    far below its terms, and the rounding of P shows there.
  - the mean merge needs scalars only: tr(M_h K_hh), tr(M_h K_hb), tr(M_h K_bc) (H^3).
K_bc itself is built blockwise from X = W C (one (n_src D x d) product) and never kept, so
building costs one pass of O(n_src D d^2) and memory stays O(H^2 D^2 / 2) per kind at most.

Scoring: `errors(groups)` scores many groups at once, bucketed by size: the block sums are
gathers, and the D x D algebra is one batched inverse per bucket,
  tr(N_g^-1 A_g) = <N_g^-1, A_g^T>,   tr(N_g^-1 M_g N_g^-1 V_g) = <N_g^-1 M_g N_g^-1, V_g^T>,
so a group costs ~ 5 D^3 flops and no Python loop per group. Group errors are memoised: a layer
has at most 2^H - 1 distinct groups. Everything runs on the device of `weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Upper bound on the bytes one gathered chunk of blocks may take while scoring a bucket.
GATHER_BYTES = 64 * 2**20


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
        device = weights.device
        self.device = device
        n_src, dim, hidden = weights.shape
        h = len(source)
        self.num_heads, self.dim = h, dim
        source = source.to(device)
        w = weights.double().reshape(n_src * dim, hidden)
        x = w @ gram.double().to(device)  # (n_src D, d): W C, the only d x d product
        m = error_weights.double().to(device)
        self.weighted = merge_weights is not None

        def k_rows(rows: torch.Tensor) -> torch.Tensor:
            """K_{source[r], source[c]} for query heads r in `rows` and every c: (R, H, D, D)."""
            xs = x.view(n_src, dim, hidden)[source[rows]].reshape(-1, hidden)
            k = (xs @ w.T).view(len(rows), dim, n_src, dim).permute(0, 2, 1, 3)
            return k[:, source]

        heads = torch.arange(h, device=device)
        chunk = max(1, GATHER_BYTES // (h * dim * dim * 8))
        diag = torch.empty(h, dtype=torch.float64, device=device)
        if not self.weighted:
            self.t = torch.empty(h, h, dtype=torch.float64, device=device)  # tr(M_h K_hb)
            self.u = torch.empty(h, h, h, dtype=torch.float64, device=device)  # tr(M_h K_bc)
            for rows in heads.split(chunk):
                k = k_rows(rows)  # (R, H, D, D): K_bc for b in rows
                diag[rows] = torch.einsum("rij,rji->r", m[rows], k[torch.arange(len(rows)), rows])
                self.t[rows] = torch.einsum("rij,rbji->rb", m[rows], k)
                self.u[:, rows] = torch.einsum("hij,rcji->hrc", m, k)
        else:
            n = merge_weights.double().to(device)
            self.m, self.n = m, n
            ratio = _proportion(m, n)
            self.ratio = ratio  # M = ratio * N, or None
            iu = torch.triu_indices(h, h, device=device)
            self.pair = torch.empty(h, h, dtype=torch.long, device=device)
            self.pair[iu[0], iu[1]] = torch.arange(iu.shape[1], device=device)
            self.pair[iu[1], iu[0]] = self.pair[iu[0], iu[1]]
            self.q = torch.empty(iu.shape[1], dim, dim, dtype=torch.float64, device=device)
            self.p = None
            if ratio is None:
                self.p = torch.empty(h, h, dim, dim, dtype=torch.float64, device=device)
            for rows in heads.split(chunk):
                k = k_rows(rows)
                diag[rows] = torch.einsum("rij,rji->r", m[rows], k[torch.arange(len(rows)), rows])
                for r, b in enumerate(rows.tolist()):
                    # N_b K_bc N_c for c >= b: the rest of row b is a transpose of stored blocks.
                    self.q[self.pair[b, b:]] = n[b] @ k[r, b:] @ n[b:]
                if self.p is not None:
                    self.p[rows] = n[rows, None] @ k @ m[None]
        self.diag = diag
        self.cache: dict[tuple[int, ...], float] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables (not the memo)."""
        names = ("diag", "t", "u", "m", "n", "q", "p", "pair")
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, a, None) for a in names)
            if isinstance(t, torch.Tensor)
        )

    def __call__(self, group: tuple[int, ...]) -> float:
        value = self.cache.get(group)
        if value is None:
            value = self.errors([group])[0]
        return value

    def errors(self, groups: Iterable[tuple[int, ...]]) -> list[float]:
        """e(g) for each group (sorted tuples of query heads), scoring the unknown ones at once."""
        return memoised_batches(groups, self.cache, self.device, self._bucket)

    def _bucket(self, index: torch.Tensor) -> torch.Tensor:
        """Errors of B groups of one size n: index (B, n) of sorted query heads -> (B,)."""
        b, n = index.shape
        own = self.diag[index].sum(1)
        if not self.weighted:
            cross = self.t[index[:, :, None], index[:, None, :]].sum((1, 2))
            spread = self.u[index[:, :, None, None], index[:, None, :, None], index[:, None, None]]
            return (own - 2.0 * cross / n + spread.sum((1, 2, 3)) / n**2).clamp_min(0.0)
        per_group = max(n * (n + 1) // 2, n * n if self.p is not None else 0) * self.dim**2 * 8
        chunk = max(1, GATHER_BYTES // per_group)
        return torch.cat(
            [
                self._weighted(rows, own[i : i + chunk])
                for i, rows in zip(range(0, b, chunk), index.split(chunk), strict=True)
            ]
        )

    def _weighted(self, index: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        n = index.shape[1]
        iu = torch.triu_indices(n, n, offset=1, device=self.device)
        diag_blocks = self.q[self.pair[index, index]].sum(1)  # sum_b Q_bb
        upper = self.q[self.pair[index[:, iu[0]], index[:, iu[1]]]].sum(1)  # sum_{b<c} Q_bc
        v_g = diag_blocks + upper + upper.transpose(1, 2)
        n_g = _regularised(self.n[index].sum(1))
        inverse = _inverse(n_g)
        m_g = self.m[index].sum(1)
        if self.p is None:  # M = c N, so A_g = c V_g
            a_g = self.ratio * v_g
        else:
            a_g = self.p[index[:, :, None], index[:, None, :]].sum((1, 2))
        # The full three-term form, not own - c tr(N^-1 V): its rounding cancels for groups of
        # heads that read one source head, whose error is exactly zero.
        cross = (inverse * a_g.transpose(1, 2)).sum((1, 2))  # tr(N_g^-1 A_g)
        spread = (inverse @ m_g @ inverse * v_g.transpose(1, 2)).sum((1, 2))
        return (own - 2.0 * cross + spread).clamp_min(0.0)


def _proportion(m: torch.Tensor, n: torch.Tensor) -> float | None:
    """c with M = c N (to float32 rounding, the precision both were made in), else None."""
    if m is n or torch.equal(m, n):
        return 1.0
    scale = float((m * n).sum() / (n * n).sum().clamp_min(1e-300))
    if scale > 0 and torch.allclose(m, scale * n, rtol=1e-6, atol=1e-7 * float(m.abs().max())):
        return scale
    return None


def _inverse(m: torch.Tensor) -> torch.Tensor:
    """Batched inverse (LU): on a CPU 5x faster than a Cholesky inverse of the same batch."""
    return torch.linalg.inv(m)


def _regularised(m: torch.Tensor) -> torch.Tensor:
    """m + (1e-12 |mean diagonal| + 1e-30) I, for one (D, D) matrix or a batch (B, D, D)."""
    ridge = 1e-12 * m.diagonal(dim1=-2, dim2=-1).mean(-1).abs() + 1e-30
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return m + ridge[..., None, None] * eye


def merge_weighted(
    weights: torch.Tensor,  # (n, D, d) the members' source slices
    head_weights: torch.Tensor,  # (n, D, D)
) -> torch.Tensor:
    """The minimiser of sum_h tr(M_h (W_h - W) C (W_h - W)^T): W = (sum M_h)^-1 sum M_h W_h."""
    m = head_weights.double()
    rhs = torch.einsum("nij,njd->id", m, weights.double())
    return torch.linalg.solve(_regularised(m.sum(0)), rhs).to(weights.dtype)


def memoised_batches(
    groups: Iterable[tuple[int, ...]],
    cache: dict[tuple[int, ...], float],
    device: torch.device,
    score: Callable[[torch.Tensor], torch.Tensor],
) -> list[float]:
    """The cached value of each group; unknown groups are scored by `score(index)`, index (B, n)
    of the B unknown groups of size n, one batch per size, and added to `cache`."""
    groups = list(groups)
    todo: dict[int, list[tuple[int, ...]]] = {}
    for g in dict.fromkeys(groups):
        if g not in cache:
            todo.setdefault(len(g), []).append(g)
    for size, bucket in todo.items():
        index = torch.tensor(bucket, dtype=torch.long, device=device).view(-1, size)
        cache.update(zip(bucket, score(index).tolist(), strict=True))
    return [cache[g] for g in groups]
