"""Latent K/V on a whole model: apply a `LatentPlan` (gqa.latent), read it back, lay it out for
loading, and count the bytes its cache holds per token.

A stock model is first converted to its own grouping (exact), like a model given a cache
precision, so that a latent model is always a headgroup model: it saves with its modeling code
(gqa.remote) and its latent layers find the group each query head reads in the grouping plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gqa.adapters import get_adapter
from gqa.latent import (
    CONFIG_KEY,
    LatentError,
    LatentLayer,
    LatentPlan,
    check_family,
    convert_module,
    layout_module,
    rope_pairs_by_norm,
)
from gqa.precision import (
    PrecisionError,
    PrecisionPlan,
    check_latent_layers,
    kind_bytes_per_token,
    model_precision,
)


def model_latent(model: nn.Module) -> LatentPlan | None:
    """The latent plan a model carries, or None."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else LatentPlan.from_dict(data)


def cached_widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """Per layer, the K and V values one token's cache entry holds: heads * head_dim, or a latent
    kind's (its rank, plus the kept rotary values of partial RoPE keys)."""
    adapter = get_adapter(model)
    widths: dict[str, list[int]] = {"k": [], "v": []}
    for layer in range(adapter.num_layers):
        for kind in widths:
            projection = adapter.projection(layer, kind)
            widths[kind].append(
                getattr(projection, "cached_width", None) or projection.out_features
            )
    return widths["k"], widths["v"]


def _prepare(model: nn.Module, plan: LatentPlan):
    from gqa.surgery import convert, current_grouping, model_grouping

    adapter = get_adapter(model)
    check_family(model.config.model_type)
    if model_latent(model) is not None:
        raise LatentError("the model already has latent layers; apply a plan to its source")
    try:
        check_latent_layers(model_precision(model), plan.to_dict())
    except PrecisionError as exc:
        raise LatentError(str(exc)) from None
    plan.check_model(adapter.num_layers, *cached_widths(model), adapter.head_dim)
    if model_grouping(model) is None:
        convert(model, current_grouping(model))
    return adapter, adapter._get(adapter.rotary_path)


@torch.no_grad()
def apply_latent(model: nn.Module, plan: LatentPlan, grams: Sequence[torch.Tensor]) -> nn.Module:
    """Make `model`'s layers latent in place as `plan` says (factors: whitened SVDs under each
    layer's attention-input gram E[x x^T], e.g. `CalibrationStats.layers[l].gram`)."""
    if len(grams) != plan.num_layers:
        raise LatentError(f"need one gram per layer ({plan.num_layers}), got {len(grams)}")
    adapter, rotary = _prepare(model, plan)
    for i, layer in enumerate(plan.layers):
        if layer.is_latent:
            module = adapter.attention(i)
            convert_module(
                module, layer, adapter.num_heads, rotary, grams[i].to(module.q_proj.weight.device)
            )
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    return model


@torch.no_grad()
def choose_rope_pairs(
    model: nn.Module, plan: LatentPlan, grams: Sequence[torch.Tensor], count: int
) -> LatentPlan:
    """`plan` with partial RoPE keys (MHA2MLA) in every layer with a latent K: per K group, the
    `count` rotary pairs of greatest query-key norm under the layer's calibration gram
    (gqa.latent.rope_pairs_by_norm), on `model`'s current grouping."""
    from gqa.surgery import current_grouping

    adapter = get_adapter(model)
    grouping = current_grouping(model)
    layers = []
    for i, layer in enumerate(plan.layers):
        if layer.k_rank is not None:
            k_index = [0] * adapter.num_heads
            for g, group in enumerate(grouping.layers[i].k):
                for head in group:
                    k_index[head] = g
            pairs = rope_pairs_by_norm(
                adapter.projection(i, "q").weight,
                adapter.projection(i, "k").weight,
                grams[i],
                k_index,
                adapter.head_dim,
                count,
            )
            layer = LatentLayer(layer.k_rank, layer.v_rank, pairs)
        layers.append(layer)
    return LatentPlan(tuple(layers))


def layout_latent(model: nn.Module, plan: LatentPlan) -> nn.Module:
    """Give a converted model the shapes and forward of `plan` without factors (weights are
    loaded next)."""
    adapter = get_adapter(model)
    check_family(model.config.model_type)
    plan.check_model(adapter.num_layers, *cached_widths(model), adapter.head_dim)
    rotary = adapter._get(adapter.rotary_path)
    for i, layer in enumerate(plan.layers):
        if layer.is_latent:
            layout_module(adapter.attention(i), layer, adapter.num_heads, rotary)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    return model


def _cached_kinds(model: nn.Module):
    """(plan, [(bits, heads, width)] per layer and kind) of what `model`'s cache holds: a latent
    kind one head of its rank, any other its heads; bits from the precision plan (16 without)."""
    adapter = get_adapter(model)
    plan = model_precision(model) or PrecisionPlan.uniform(adapter.num_layers, 16)
    latent = model_latent(model)
    kinds = []
    for i, (k_width, v_width) in enumerate(zip(*cached_widths(model), strict=True)):
        ranks = latent.layers[i] if latent else None
        for bits, width, rank in (
            (plan.layers[i].k_bits, k_width, ranks and ranks.k_rank),
            (plan.layers[i].v_bits, v_width, ranks and ranks.v_rank),
        ):
            heads, dim = (1, width) if rank else (width // adapter.head_dim, adapter.head_dim)
            kinds.append((bits, heads, dim))
    return plan, kinds


def cache_bytes(model: nn.Module, length: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Exact bytes of the cache `generate` gives `model` (its precision plan, or 16 bits) after
    `length` tokens of `batch` sequences, the full-precision window included."""
    plan, kinds = _cached_kinds(model)
    return sum(
        plan.kind_cache_bytes(bits, heads, dim, length, batch, dtype_bytes)
        for bits, heads, dim in kinds
    )


def cache_bytes_per_token(model: nn.Module, dtype_bytes: int = 2) -> float:
    """Steady-state cache bytes per token of `model` (latent or not) under its precision plan, or
    at 16 bits without one (gqa.precision's formula; the window excluded)."""
    plan, kinds = _cached_kinds(model)
    return sum(
        kind_bytes_per_token(heads, dim, bits, plan.group_size, dtype_bytes)
        for bits, heads, dim in kinds
    )
