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
  - A blocks only when M is not a multiple of N. When M_h = c N_h for all h (keys under
    query_aware: both are the RoPE query moment, scaled; values of attn_out: M = N) A_g = c V_g
    and nothing more is stored. Otherwise A_g enters the error only through tr(N_g^-1 A_g), and
    N_g^-1 is symmetric, so only the symmetric part of A_g matters:
      sym(A_g) = sum_b S_bb + sum_{b<h} (S_bh + S_bh^T),  S_bh = (N_b K_bh M_h + M_b K_bh N_h) / 2,
    and S_hb = S_bh^T, so S is stored for b <= h only, like Q (H (H + 1) / 2 blocks: 66 MB at
    7B shape where the whole P_bh = N_b K_bh M_h took 134 MB). float32 storage was tried and is
    not enough: a group of near-duplicate heads has an error far below its terms, and the
    rounding of the blocks shows there.
  - the mean merge needs scalars only: tr(M_h K_hh), tr(M_h K_hb), tr(M_h K_bc) (H^3).
K_bc itself is built blockwise from X = W C (one (n_src D x d) product) and never kept, so
building costs one pass of O(n_src D d^2) and memory stays at most H (H + 1) D^2 doubles per
kind (two triangles of blocks).

Scoring: `errors(groups)` scores many groups at once, bucketed by size: the block sums are
embedding bags that read the stored blocks in place (`_pair_sums`; a gathered copy took 4x as
long, the sums being bound by memory traffic), and the D x D algebra is one batched inverse per
bucket,
  tr(N_g^-1 A_g) = <N_g^-1, A_g^T>,   tr(N_g^-1 M_g N_g^-1 V_g) = <N_g^-1 M_g N_g^-1, V_g^T>,
so a group costs ~ 5 D^3 flops and no Python loop per group. Group errors are memoised: a layer
has at most 2^H - 1 distinct groups. Everything runs on the device of `weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Upper bound on the bytes one gathered chunk of blocks may take while scoring a bucket.
GATHER_BYTES = 64 * 2**20


# Smallest group built from a near group's sums: a group of n heads summed directly gathers
# n (n + 1) / 2 blocks per table, one built from a near group 3 (and the near groups' sums).
NEAR_MIN_SIZE = 4


class GroupErrorTable:
    """A memo of e(g) per group: calling it scores one group, `errors` many, the unknown ones in
    one batch per size (`_bucket`: index (B, n) -> (B,))."""

    cache: dict[tuple[int, ...], float]
    device: torch.device

    def __call__(self, group: tuple[int, ...]) -> float:
        value = self.cache.get(group)
        if value is None:
            value = self.errors([group])[0]
        return value

    def errors(
        self,
        groups: Iterable[tuple[int, ...]],
        near: Iterable[tuple[int, ...]] | None = None,  # a speed hint some tables use
    ) -> list[float]:
        return memoised_batches(groups, self.cache, self.device, self._bucket)

    def _bucket(self, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MergeErrorTable(GroupErrorTable):
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
            self.s = None  # S_bh for b <= h, when M is not a multiple of N
            if ratio is None:
                self.s = torch.empty_like(self.q)
            for rows in heads.split(chunk):
                k = k_rows(rows)
                diag[rows] = torch.einsum("rij,rji->r", m[rows], k[torch.arange(len(rows)), rows])
                for r, b in enumerate(rows.tolist()):
                    # Blocks (b, c) for c >= b: the rest of row b is a transpose of stored blocks.
                    self.q[self.pair[b, b:]] = n[b] @ k[r, b:] @ n[b:]
                    if self.s is not None:
                        self.s[self.pair[b, b:]] = 0.5 * (
                            n[b] @ k[r, b:] @ m[b:] + m[b] @ k[r, b:] @ n[b:]
                        )
        self.diag = diag
        self.cache: dict[tuple[int, ...], float] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables (not the memo)."""
        names = ("diag", "t", "u", "m", "n", "q", "s", "pair")
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, a, None) for a in names)
            if isinstance(t, torch.Tensor)
        )

    def errors(
        self,
        groups: Iterable[tuple[int, ...]],
        near: Iterable[tuple[int, ...]] | None = None,
    ) -> list[float]:
        """e(g) for each group (sorted tuples of query heads), scoring the unknown ones at once.

        `near`: groups near the new ones (the partition a local search stands on). A group at
        most one head removed from and one head added to one of them has its block sums built
        from that group's row sums, O(1) blocks instead of O(n^2) (see `_near_errors`); others
        are summed directly. Both give e(g) to rounding."""
        if near is None or not self.weighted:
            return super().errors(groups)
        groups = list(groups)
        todo = [g for g in dict.fromkeys(groups) if g not in self.cache]
        small = [g for g in todo if len(g) < NEAR_MIN_SIZE]
        if small:
            memoised_batches(small, self.cache, self.device, self._bucket)
        if len(small) < len(todo):
            self._near_errors([g for g in todo if len(g) >= NEAR_MIN_SIZE], near)
        return [self.cache[g] for g in groups]

    def _near_errors(self, todo: list[tuple[int, ...]], near: list[tuple[int, ...]]) -> None:
        """Score `todo` into the memo; each group g = p - a + b of a p in `near` (a, b optional):
          V_{p-a} = V_p - R_a(p) - R_a(p)^T + Q_aa,   R_x(p) := sum_{y in p} Q_xy,
          V_{q+b} = V_q + R_b(q) + R_b(q)^T + Q_bb,   R_b(p - a) = R_b(p) - Q_ba,
        and the same for S; N_g, M_g and the own term add and subtract one head. V_g and sym(A)_g
        enter e(g) only through inner products with symmetric matrices (N_g^-1 and
        N_g^-1 M_g N_g^-1), which do not see transposes: so R + R^T counts as 2 R, Q_ba as the
        stored Q_ab, and no block is transposed."""
        near = [tuple(p) for p in near]
        owner = {h: k for k, p in enumerate(near) for h in p}
        found: list[tuple[tuple[int, ...], int, int, int]] = []  # (g, parent, removed, added)
        direct = []
        for g in todo:
            counts: dict[int, int] = {}
            for h in g:
                if h in owner:
                    counts[owner[h]] = counts.get(owner[h], 0) + 1
            if not counts:
                direct.append(g)
                continue
            k = max(counts, key=counts.get)
            out, inn = set(near[k]).difference(g), set(g).difference(near[k])
            if len(out) > 1 or len(inn) > 1:
                direct.append(g)
            else:
                found.append((g, k, out.pop() if out else -1, inn.pop() if inn else -1))
        if direct:
            memoised_batches(direct, self.cache, self.device, self._bucket)
        if not found:
            return
        used = sorted({k for _, k, _, _ in found})
        slot = {k: i for i, k in enumerate(used)}
        members = [torch.tensor(near[k], device=self.device) for k in used]
        tables = [self.q] if self.s is None else [self.q, self.s]
        # Per parent p and head x (up to transposes of their terms): R_x(p); the sum without x,
        # V_p - 2 R_x(p) + Q_xx (slot H: V_p itself); what adding x brings, 2 R_x(p) + Q_xx (slot
        # H: nothing). A group p - a + b is then without[p, a] + with[p, b] - 2 Q_ab.
        heads = torch.arange(self.num_heads, device=self.device)
        without, adding = [], []
        for t in tables:
            r = torch.stack([_pair_sums(t, self.pair[:, index]) for index in members])  # (P,H,D,D)
            own_blocks = t[self.pair[heads, heads]]  # Q_xx
            base = torch.stack([r[i][m].sum(0) for i, m in enumerate(members)])  # V_p
            r.mul_(2.0)
            gain = r + own_blocks
            loss = base[:, None] - r + own_blocks
            without.append(torch.cat([loss, base[:, None]], 1))
            adding.append(torch.cat([gain, torch.zeros_like(base[:, None])], 1))
            del r, gain, loss
        # N and M likewise: sum over p without x (slot H: all of p), and x itself (slot H: 0).
        per_head = []
        for w in (self.n, self.m):
            w_p = torch.stack([w[index].sum(0) for index in members])
            per_head.append(
                (torch.cat([w_p[:, None] - w[None], w_p[:, None]], 1), torch.cat([w, w[:1] * 0]))
            )
        own_p = torch.stack([self.diag[index].sum() for index in members])
        chunk = max(1, GATHER_BYTES // (4 * self.dim**2 * 8))
        for begin in range(0, len(found), chunk):
            part = found[begin : begin + chunk]
            parent = torch.tensor([slot[k] for _, k, _, _ in part], device=self.device)
            a = torch.tensor([r for _, _, r, _ in part], device=self.device)
            b = torch.tensor([r for _, _, _, r in part], device=self.device)
            has_a = (a >= 0).to(torch.float64)[:, None, None]
            has_b = (b >= 0).to(torch.float64)[:, None, None]
            slot_a = torch.where(a >= 0, a, self.num_heads)
            slot_b = torch.where(b >= 0, b, self.num_heads)
            a, b = a.clamp_min(0), b.clamp_min(0)  # absent heads read head 0, weighted by 0
            sums = []
            for table, out, into in zip(tables, without, adding, strict=True):
                total = out[parent, slot_a]
                total += into[parent, slot_b]
                total.addcmul_(table[self.pair[a, b]], has_a * has_b, value=-2.0)
                sums.append(total)
            n_g, m_g = (out[parent, slot_a] + head[slot_b] for out, head in per_head)
            own = own_p[parent] - has_a[:, 0, 0] * self.diag[a] + has_b[:, 0, 0] * self.diag[b]
            values = self._finish(own, sums[0], sums[1] if self.s is not None else None, n_g, m_g)
            self.cache.update(zip([g for g, _, _, _ in part], values.tolist(), strict=True))

    def _bucket(self, index: torch.Tensor) -> torch.Tensor:
        """Errors of B groups of one size n: index (B, n) of sorted query heads -> (B,)."""
        b, n = index.shape
        own = self.diag[index].sum(1)
        if not self.weighted:
            cross = self.t[index[:, :, None], index[:, None, :]].sum((1, 2))
            spread = self.u[index[:, :, None, None], index[:, None, :, None], index[:, None, None]]
            return (own - 2.0 * cross / n + spread.sum((1, 2, 3)) / n**2).clamp_min(0.0)
        # No blocks are gathered (`_pair_sums` sums them in place): a group holds about 8 D x D
        # matrices while it is scored (its sums, the inverse and products), whatever its size.
        chunk = max(1, GATHER_BYTES // (8 * self.dim**2 * 8))
        return torch.cat(
            [
                self._weighted(rows, own[i : i + chunk])
                for i, rows in zip(range(0, b, chunk), index.split(chunk), strict=True)
            ]
        )

    def _weighted(self, index: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        n = index.shape[1]
        iu = torch.triu_indices(n, n, device=self.device)  # diagonal included
        pairs = self.pair[index[:, iu[0]], index[:, iu[1]]]  # (B, n (n + 1) / 2)
        factor = torch.where(iu[0] == iu[1], 1.0, 2.0).to(torch.float64)
        factor = factor.expand(pairs.shape).contiguous()
        v_g = _pair_sums(self.q, pairs, factor)  # V_g
        n_sum, m_g = _pair_sums(self.n, index), _pair_sums(self.m, index)
        # sym(A_g): the rest of A_g does not change tr(N_g^-1 A_g)
        a_g = None if self.s is None else _pair_sums(self.s, pairs, factor)
        return self._finish(own, v_g, a_g, n_sum, m_g)

    def _finish(self, own, v_g, a_g, n_sum, m_g) -> torch.Tensor:
        """e(g) from each group's own term, V_g, sym(A)_g (None: c V_g), sum N and sum M."""
        inverse = _inverse(regularised(n_sum))
        if a_g is None:  # M = c N, so A_g = c V_g
            a_g = self.ratio * v_g
        # The full three-term form, not own - c tr(N^-1 V): its rounding cancels for groups of
        # heads that read one source head, whose error is exactly zero.
        # tr(X Y) = <X, Y^T> = <X, Y> for X symmetric (N_g^-1 and N_g^-1 M_g N_g^-1 both are).
        cross = (inverse * a_g).sum((1, 2))  # tr(N_g^-1 A_g)
        spread = (inverse @ m_g @ inverse * v_g).sum((1, 2))
        return (own - 2.0 * cross + spread).clamp_min(0.0)


def _pair_sums(blocks: torch.Tensor, pairs: torch.Tensor, factor: torch.Tensor | None = None):
    """sum_k factor[:, k] X_{pairs[:, k]} per row, (B, D, D), from blocks (P, D, D), without
    gathering the blocks (an embedding bag reads each one in place: 4x faster on a CPU).

    Without `factor`: the plain sums of the rows' blocks (per-head N or M, a row of Q or S).
    With it, for a group's sum over blocks stored for b <= c: factor 1 on the diagonal and 2
    above it gives sum_b X_bb + 2 sum_{b<c} X_bc, whose symmetric part is the group sum
    sum_b X_bb + sum_{b<c} (X_bc + X_bc^T); that symmetric part is returned."""
    flat = blocks.reshape(blocks.shape[0], -1)
    total = torch.nn.functional.embedding_bag(
        pairs, flat, mode="sum", per_sample_weights=factor
    ).view(-1, *blocks.shape[1:])
    if factor is None:
        return total
    return 0.5 * (total + total.transpose(1, 2))


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


def regularised(m: torch.Tensor) -> torch.Tensor:
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
    return torch.linalg.solve(regularised(m.sum(0)), rhs).to(weights.dtype)


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
