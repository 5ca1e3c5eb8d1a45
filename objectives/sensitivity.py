"""Output-aware weightings M_h of key and value errors (used by proxies and the query-aware merge).

Values. Head h's value error dv = (W_h - W_g) x reaches the attention output through its o_proj
slice O_h (d x D), so its energy is tr(O_h^T F O_h dv dv^T): M_h^V = O_h^T F O_h, with F = I
(`attn_out`) or F = E[g g^T], the second moment of the loss gradient at the attention output
(`fisher`, which makes errors comparable across layers).

Keys. A key error dk changes head h's logits by scale * q^T R dk, R the relative RoPE rotation.
Averaged over rotation angles, each RoPE frequency pair j (dims j and j + D/2) contributes
E|q_j|^2 E|dk_j|^2 / 2, so the weighting is diagonal: (M_h^K)_ii = beta_h scale^2 e_h,pair(i) / 2
with e_h,j = S_h[j, j] + S_h[j + D/2, j + D/2] from the query second moment S_h. A logit error
moves the output by about O_h (v_s - mean v), so beta_h = tr(M_h^V Cov(v_h)) converts logit error
into output energy, putting key and value errors in the same units.
"""

from __future__ import annotations

import torch

from gqa.adapters import ModelAdapter
from objectives.calibration import LayerStats


def value_weights(
    adapter: ModelAdapter, layer: int, stats: LayerStats, fisher: bool = False
) -> torch.Tensor:
    """M_h^V = O_h^T F O_h for every query head: (H, D, D)."""
    o = adapter.projection(layer, "o").weight.detach().float()  # (d, H*D)
    o = o.view(o.shape[0], adapter.num_heads, adapter.head_dim).permute(1, 0, 2)  # (H, d, D)
    if fisher:
        if stats.grad is None:
            raise ValueError(
                "the fisher weighting needs gradient statistics (calibration grad_seqs > 0)"
            )
        return torch.einsum("hdi,de,hej->hij", o, stats.grad.float(), o)
    return torch.einsum("hdi,hdj->hij", o, o)


def key_weights(
    adapter: ModelAdapter, layer: int, stats: LayerStats, fisher: bool = False
) -> torch.Tensor:
    """Diagonal M_h^K (RoPE-aware, per frequency pair), in output-energy units: (H, D, D)."""
    d = adapter.head_dim
    scale = d**-0.5
    energy = stats.query.diagonal(dim1=1, dim2=2)  # (H, D): E[q_i^2]
    pair = energy[:, : d // 2] + energy[:, d // 2 :]  # (H, D/2): E|q_j|^2 per frequency pair
    per_dim = torch.cat([pair, pair], dim=1) * scale**2 / 2  # (H, D)
    m_v = value_weights(adapter, layer, stats, fisher)
    w_v, _ = adapter.head_slices(layer, "v")
    source = adapter.source_kv_index(layer, "v")
    w_v = w_v.detach().float()[source]  # (H, D, d)
    cov_v = torch.einsum("hid,de,hje->hij", w_v, stats.covariance.float(), w_v)
    beta = torch.einsum("hij,hji->h", m_v, cov_v)  # (H,)
    return torch.diag_embed(per_dim * beta[:, None])


def plain_weights(adapter: ModelAdapter) -> torch.Tensor:
    """M_h = I: unweighted reconstruction."""
    eye = torch.eye(adapter.head_dim)
    return eye.expand(adapter.num_heads, -1, -1).clone()
