"""Grouping strategies: each proposes a grouping for a per-layer budget. Importing this package
registers them all; a new strategy is one file here with `@register_strategy`."""

from search.strategies import (  # noqa: F401  (registration)
    coarsen_source,
    evolutionary,
    greedy,
    hierarchical,
    kmeans,
    neighbour,
    neighbour_kv,
    random_partition,
)
from search.strategies.base import (
    KINDS,
    STRATEGIES,
    SearchContext,
    Strategy,
    get_strategy,
    make_strategy,
    register_strategy,
    with_partition,
)

__all__ = [
    "KINDS",
    "STRATEGIES",
    "SearchContext",
    "Strategy",
    "get_strategy",
    "make_strategy",
    "register_strategy",
    "with_partition",
]
