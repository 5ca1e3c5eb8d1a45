"""Grouped attention for arbitrary (asymmetric, per-layer, K != V) head groupings.

A converted attention layer's `k_proj`/`v_proj` produce only the group heads, so the KV cache
stores G_K and G_V heads. The stock transformers attention module runs unchanged: we register
attention functions with `AttentionInterface` (and their masks with `AttentionMaskInterface`)
that receive the cached, grouped K/V and map them onto the query heads *after* the cache update.

Each converted module carries a `HeadPlan` as non-persistent buffers:
  k_index[h], v_index[h]  group read by query head h                       (H,)
and, for single-token decoding, a packing of the query heads by "cell": the distinct
(K group, V group) pairs. Cell c holds the query heads that read K group cell_k[c] and V group
cell_v[c]; padded to the largest cell size s, the query is reshaped to (B, R, s, D) and attends
to (B, R, S, D) keys, so decoding never materialises H copies of the cache (like `pack_gqa` in
transformers for uniform GQA). When K and V share one partition, R = G and cell_k = cell_v =
arange(G), so the cache is used as is.

A module with a KV-cache precision carries a `hg_kv_quant` (gqa.kv_quant.LayerQuantizer): a forward
pass without a cache past (evaluation, training, a prefill) then reads K/V as the quantized cache
would hold them; with a past, the quantized cache has already done so.

This module imports only torch and transformers: a saved asymmetric checkpoint carries a copy of
it, so that stock transformers runs the checkpoint where headgroup is not installed (gqa.remote).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

SDPA = "headgroup_sdpa"
EAGER = "headgroup_eager"


class LayerGroups(Protocol):
    """One layer's K and V partitions of the query heads (gqa.grouping.LayerGrouping is one)."""

    k: Sequence[Sequence[int]]
    v: Sequence[Sequence[int]]


PLAN_BUFFERS = ("hg_k_index", "hg_v_index", "hg_cell_k", "hg_cell_v", "hg_pack", "hg_unpack")


def _group_of(partition: Sequence[Sequence[int]], num_heads: int) -> list[int]:
    """For each query head, the index of the group that holds it."""
    index = [0] * num_heads
    for g, group in enumerate(partition):
        for head in group:
            index[head] = g
    return index


def install_plan(module: nn.Module, layer: LayerGroups, num_heads: int) -> None:
    """Attach the index buffers that map grouped K/V heads onto this module's query heads."""
    device = next(module.parameters()).device
    k_index = _group_of(layer.k, num_heads)
    v_index = _group_of(layer.v, num_heads)
    cells: dict[tuple[int, int], list[int]] = {}
    for head in range(num_heads):
        cells.setdefault((k_index[head], v_index[head]), []).append(head)
    keys = sorted(cells)
    size = max(len(members) for members in cells.values())
    pack, unpack = [], [0] * num_heads
    for c, key in enumerate(keys):
        members = cells[key]
        for slot, head in enumerate(members):
            unpack[head] = c * size + slot
        pack.extend(members + [members[0]] * (size - len(members)))  # padding rows are discarded

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    tensors = {
        "hg_k_index": long(k_index),
        "hg_v_index": long(v_index),
        "hg_cell_k": long([k for k, _ in keys]),
        "hg_cell_v": long([v for _, v in keys]),
        "hg_pack": long(pack),
        "hg_unpack": long(unpack),
    }
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor, persistent=False)
    module.hg_cell_size = size
    # Skip the cell gather when each cell is exactly one group, in order (K and V share groups).
    module.hg_cells_are_groups = len(keys) == len(layer.k) == len(layer.v) and all(
        k == v == c for c, (k, v) in enumerate(keys)
    )
    # The layout SDPA's enable_gqa reads without copies: G equal contiguous groups, K and V alike.
    groups = len(layer.k)
    module.hg_native_gqa = (
        k_index == v_index
        and num_heads % groups == 0
        and k_index == [h // (num_heads // groups) for h in range(num_heads)]
    )
    module.num_key_value_groups = 1  # we expand K/V ourselves; stock code must not repeat again


def has_plan(module: nn.Module) -> bool:
    return hasattr(module, "hg_k_index")


def remove_plan(module: nn.Module, num_key_value_groups: int) -> None:
    for name in PLAN_BUFFERS:
        delattr(module, name)
    del module.hg_cell_size, module.hg_cells_are_groups, module.hg_native_gqa
    module.num_key_value_groups = num_key_value_groups


def expand_kv(
    module: nn.Module, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G_K, S, D), (B, G_V, S, D) -> (B, H, S, D) each: the K/V head each query head reads."""
    return key.index_select(1, module.hg_k_index), value.index_select(1, module.hg_v_index)


def _decode_packed(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, 1, D)
    key: torch.Tensor,  # (B, G_K, S, D)
    value: torch.Tensor,  # (B, G_V, S, D)
    attention_mask: torch.Tensor | None,  # None or (B, 1, 1, S)
    scaling: float | None,
) -> torch.Tensor:
    batch, _, _, dim = query.shape
    size = module.hg_cell_size
    if not module.hg_cells_are_groups:
        key = key.index_select(1, module.hg_cell_k)
        value = value.index_select(1, module.hg_cell_v)
    packed = query.index_select(1, module.hg_pack).view(batch, -1, size, dim)  # (B, R, s, D)
    out = F.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, scale=scaling
    )
    out = out.reshape(batch, -1, dim).index_select(1, module.hg_unpack)  # (B, H, D)
    return out.unsqueeze(1)  # (B, 1, H, D), the layout transformers' attention functions return


def _simulated_precision(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict,
) -> tuple[torch.Tensor, None]:
    """Attention over K/V quantized as the module's cache precision would hold them."""
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            "simulated KV quantization supports attention without dropout, soft-capping or "
            "position bias"
        )
    quant = module.hg_kv_quant
    key_q, value_q = quant.fake_quantize(key, value)
    heads = None if module.hg_native_gqa else (module.hg_k_index, module.hg_v_index)
    return quant.attend(query, key, value, key_q, value_q, attention_mask, scaling, heads), None


def _simulates(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> bool:
    quant = getattr(module, "hg_kv_quant", None)
    return quant is not None and not quant.exact and query.shape[2] == key.shape[2]


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over grouped K/V. Decoding packs query heads per group; longer queries expand K/V."""
    if _simulates(module, query, key):
        return _simulated_precision(
            module, query, key, value, attention_mask, dropout, scaling, kwargs
        )
    packable = (
        query.shape[2] == 1
        and dropout == 0.0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None  # F.scaled_dot_product_attention cannot soft-cap
        and (attention_mask is None or attention_mask.shape[1] == 1)
    )
    if packable:
        return _decode_packed(module, query, key, value, attention_mask, scaling), None
    key, value = expand_kv(module, key, value)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: expand K/V to the query heads, then the family's own eager attention
    (Gemma 2's soft-caps, GPT-2's does not repeat K/V), LLaMA's when the family has none."""
    if _simulates(module, query, key):
        return _simulated_precision(
            module, query, key, value, attention_mask, dropout, scaling, kwargs
        )
    key, value = expand_kv(module, key, value)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return (eager or eager_attention_forward)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def register() -> None:
    """Make the grouped attention selectable by name (idempotent)."""
    AttentionInterface.register(SDPA, grouped_sdpa_attention)
    AttentionInterface.register(EAGER, grouped_eager_attention)
    # Without a registered mask function transformers builds no mask at all for unknown names,
    # and padded batches would silently attend to padding.
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)


def grouped_implementation(base: str | None) -> str:
    """The grouped attention that stands in for a model's current implementation."""
    if base in (SDPA, EAGER):
        return base
    return EAGER if base is not None and "eager" in base else SDPA


def base_implementation(grouped: str | None) -> str:
    return "eager" if grouped == EAGER else "sdpa"


register()
