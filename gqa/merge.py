"""Merge functions: how the K (or V) projections of a group's query heads become one head.

A merge gets, for one group, the source K (V) slice that each member query head reads, stacked
as (n_members, head_dim, hidden), plus biases (n_members, head_dim) for models that have them.
With a GQA source several members may read the same source head; each counts once per member.
Merges are registered by name; `objectives.merging` adds data-aware ones.

A merge registered with `folds=True` returns a third item, per-member orthogonal frames R
(n_members, head_dim, head_dim): the merged head serves member h in R_h's frame. The surgery
folds R_h into what reads that head (query rows R_h W_q for K, output columns W_o R_h^T for V),
so the rotation itself changes nothing the model computes; only the merge is approximate.
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
FOLDING: set[str] = set()  # merges that return frames to fold into q and o


def register_merge(name: str, folds: bool = False) -> Callable[[MergeFn], MergeFn]:
    def decorate(fn: MergeFn) -> MergeFn:
        MERGES[name] = fn
        if folds:
            FOLDING.add(name)
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
