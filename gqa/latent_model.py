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
    LatentPlan,
    check_family,
    convert_module,
    layout_module,
)
from gqa.precision import PrecisionError, check_latent_layers, model_precision


def model_latent(model: nn.Module) -> LatentPlan | None:
    """The latent plan a model carries, or None."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else LatentPlan.from_dict(data)


def cached_widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """Per layer, the K and V values one token's cache entry holds: heads * head_dim, or the
    latent rank of a latent kind."""
    adapter = get_adapter(model)
    widths: dict[str, list[int]] = {"k": [], "v": []}
    for layer in range(adapter.num_layers):
        for kind in widths:
            projection = adapter.projection(layer, kind)
            widths[kind].append(getattr(projection, "rank", None) or projection.out_features)
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
    plan.check_model(adapter.num_layers, *cached_widths(model))
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


def layout_latent(model: nn.Module, plan: LatentPlan) -> nn.Module:
    """Give a converted model the shapes and forward of `plan` without factors (weights are
    loaded next)."""
    adapter = get_adapter(model)
    check_family(model.config.model_type)
    plan.check_model(adapter.num_layers, *cached_widths(model))
    rotary = adapter._get(adapter.rotary_path)
    for i, layer in enumerate(plan.layers):
        if layer.is_latent:
            layout_module(adapter.attention(i), layer, adapter.num_heads, rotary)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    return model


def cache_bytes_per_token(model: nn.Module, dtype_bytes: int = 2) -> int:
    """Steady-state cache bytes per token of `model` at 16 bits (latent or not)."""
    k_widths, v_widths = cached_widths(model)
    return (sum(k_widths) + sum(v_widths)) * dtype_bytes
