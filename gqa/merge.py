"""Merge functions: how the K (or V) projections of a group's query heads become one head.

A merge gets, for one group, the source K (V) slice that each member query head reads, stacked
as (n_members, head_dim, hidden), plus biases (n_members, head_dim) for models that have them.
With a GQA source several members may read the same source head; each counts once per member.
Merges are registered by name; `objectives.merging` adds data-aware ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MergeContext:
    """What a merge may look at besides the weights."""

    layer: int
    kind: str  # "k" or "v"
    heads: tuple[int, ...]  # the group's query heads
    adapter: Any  # gqa.adapters.ModelAdapter of the model being converted
    stats: Any = None  # calibration statistics, for data-aware merges


MergeFn = Callable[
    [torch.Tensor, torch.Tensor | None, MergeContext], tuple[torch.Tensor, torch.Tensor | None]
]
MERGES: dict[str, MergeFn] = {}


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    def decorate(fn: MergeFn) -> MergeFn:
        MERGES[name] = fn
        return fn

    return decorate


def get_merge(name: str) -> MergeFn:
    if name not in MERGES:
        raise ValueError(f"unknown merge method {name!r} (available: {', '.join(sorted(MERGES))})")
    return MERGES[name]


@register_merge("mean")
def mean_merge(
    weights: torch.Tensor, biases: torch.Tensor | None, ctx: MergeContext
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain GQA conversion: the mean of the members' projections."""
    return weights.mean(0), None if biases is None else biases.mean(0)
