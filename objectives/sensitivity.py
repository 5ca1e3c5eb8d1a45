"""Output-aware weightings M_h of key and value errors (used by proxies and the query-aware merge).

Values. Head h's value error dv = (W_h - W_g) x reaches the attention output through its o_proj
slice O_h (d x D), so its energy is tr(O_h^T F O_h dv dv^T): M_h^V = O_h^T F O_h, with F = I
(`attn_out`) or F = E[g g^T], the second moment of the loss gradient at the attention output
(`fisher`, which makes errors comparable across layers).

Keys. A key error dk changes head h's logit by scale * q^T R_delta dk (scale: the module's own, e.g.
1/sqrt(D), Granite's multiplier or Gemma's query pre-scaling), where R_delta is the RoPE
rotation for the query-key distance delta. Its mean square is dk^T S~_h dk * scale^2 with the
RoPE-aware query moment S~_h = E_delta[R_delta^T S_h R_delta], S_h = E[q q^T] before RoPE, and
delta uniform over the nearest `ROPE_WINDOW` positions: high-frequency pairs average out, low
frequencies keep their cross-correlations. (Measured on SmolLM2 at 1 KV head per layer, held-out
ppl of the query-aware merge: full S 2425, S~ with window 64 2224, per-pair energies only 8865.)
A logit error moves the output by about O_h (v_s - mean v), so the layer's key term is scaled by
beta = mean_h tr(M_h^V Cov(v_h)), putting key and value errors in the same units. beta is one
number per layer, so it does not change which merge minimises the layer's error.
"""

from __future__ import annotations

import torch

from gqa.adapters import ModelAdapter
from objectives.calibration import LayerStats


def value_weights(
    adapter: ModelAdapter, layer: int, stats: LayerStats, fisher: bool = False
) -> torch.Tensor:
    """M_h^V = O_h^T F O_h for every query head: (H, D, D)."""
    o = adapter.output_weight(layer).detach().float().cpu()  # (d, H*D)
    o = o.view(o.shape[0], adapter.num_heads, adapter.head_dim).permute(1, 0, 2)  # (H, d, D)
    if fisher:
        if stats.grad is None:
            raise ValueError(
                "the fisher weighting needs gradient statistics (calibration grad_seqs > 0)"
            )
        return torch.einsum("hdi,de,hej->hij", o, stats.grad.float(), o)
    return torch.einsum("hdi,hdj->hij", o, o)


ROPE_WINDOW = 64
_ROPE_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_query_moment(adapter: ModelAdapter, query: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """S~_h = mean over delta < ROPE_WINDOW of R_delta^T S_h R_delta: (H, D, D). Memoised.
    Without RoPE (GPT-2) S~ = S; with partial RoPE the unrotated dims keep R = I."""
    hit = _ROPE_CACHE.get(id(query))
    if hit is not None and hit[0] is query:
        return hit[1]
    d = adapter.head_dim
    inv_freq = adapter.rope_inv_freq(layer)
    if inv_freq is None:
        return query.float()
    inv_freq = inv_freq.double().cpu()  # (R/2,), R the rotated dims
    r = 2 * inv_freq.numel()
    angles = -torch.arange(ROPE_WINDOW, dtype=torch.float64)[:, None] * inv_freq  # (W, R/2)
    cos, sin = angles.cos(), angles.sin()
    rot = torch.eye(d, dtype=torch.float64).repeat(ROPE_WINDOW, 1, 1)
    half = torch.arange(r // 2)
    rot[:, half, half] = cos
    rot[:, half + r // 2, half + r // 2] = cos
    rot[:, half, half + r // 2] = -sin
    rot[:, half + r // 2, half] = sin
    moment = torch.einsum("wji,hjk,wkl->hil", rot, query.double(), rot) / ROPE_WINDOW
    _ROPE_CACHE[id(query)] = (query, moment.float())
    return moment.float()


def key_weights(
    adapter: ModelAdapter, layer: int, stats: LayerStats, fisher: bool = False
) -> torch.Tensor:
    """M_h^K = beta * scale^2 * S~_h, in output-energy units: (H, D, D)."""
    scale2 = adapter.attention_scale(layer) ** 2
    m_v = value_weights(adapter, layer, stats, fisher)
    w_v, _ = adapter.head_slices(layer, "v")
    source = adapter.source_kv_index(layer, "v").cpu()
    w_v = w_v.detach().float().cpu()[source]  # (H, D, d)
    cov_v = torch.einsum("hid,de,hje->hij", w_v, stats.covariance.float(), w_v)
    beta = torch.einsum("hij,hji->h", m_v, cov_v).mean()
    return rope_query_moment(adapter, stats.query, layer) * (beta * scale2)


def plain_weights(adapter: ModelAdapter) -> torch.Tensor:
    """M_h = I: unweighted reconstruction."""
    eye = torch.eye(adapter.head_dim)
    return eye.expand(adapter.num_heads, -1, -1).clone()
