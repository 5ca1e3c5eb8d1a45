"""`greedy`: local search on one layer's partition with move and swap steps, minimising the proxy.

A move takes one head to another group (never emptying its group, so G is kept); a swap exchanges
two heads of different groups. "best" improvement takes the best improving step of the whole
neighbourhood, "first" the first improving one in a random order. Each run starts from the
partition of the strategy named by `start`; the `restarts` extra runs start from uniformly
random partitions, and the best run wins. Only strictly improving steps are taken, so the result
is never worse than the start. Cost per step: O(H G + H^2) group errors, memoised by the proxy;
the groups a step has not seen yet (those touching the two groups the last step changed) are
scored as one batch, and the deltas of all steps compared as one array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gqa.grouping import Partition, canonical_partition
from search.strategies.base import (
    STRATEGIES,
    SearchContext,
    Strategy,
    make_strategy,
    register_strategy,
)
from search.strategies.random_partition import random_partition


@register_strategy
@dataclass
class Greedy(Strategy):
    name = "greedy"
    needs_proxy = True

    improvement: str = "best"  # "best" | "first"
    restarts: int = 0  # extra runs from random partitions
    start: str = "neighbour"  # the strategy whose partition the first run starts from
    max_steps: int = 1000  # accepted steps per run

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("improvement", ("best", "first"))
        self.check_int("restarts", minimum=0)
        self.check_int("max_steps", minimum=0)
        if self.start not in STRATEGIES:
            self.fail("start", f"must name a strategy ({', '.join(sorted(STRATEGIES))})")

    def uses_seed(self) -> bool:
        # "best" improvement from a fixed start, without random restarts, is deterministic.
        return self.improvement == "first" or self.restarts > 0 or self.start_strategy().uses_seed()

    def start_strategy(self) -> Strategy:
        return make_strategy(self.start, seed=self.seed, share_kv=self.share_kv)

    def check_context(self, ctx: SearchContext) -> None:
        super().check_context(ctx)
        self.start_strategy().check_context(ctx)

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        def error(group: tuple[int, ...]) -> float:
            return ctx.group_error(layer, kind, group)

        # A stream of its own: `rng` is seeded like the start strategy's, so start="random" would
        # otherwise make the first restart a copy of the start.
        rng = np.random.default_rng(int(rng.integers(2**63)))
        best, best_score = None, np.inf
        for run in range(1 + self.restarts):
            if run == 0:
                start = self.start_strategy().layer_partition(ctx, layer, kind, num_groups)
            else:
                start = random_partition(ctx.num_heads, num_groups, rng)
            partition, score = local_search(
                error,
                start,
                ctx.num_heads,
                self.improvement,
                self.max_steps,
                rng,
                errors=lambda groups, near: ctx.group_errors(layer, kind, groups, near),
            )
            if score < best_score:
                best, best_score = partition, score
        return best


def local_search(
    error: Callable[[tuple[int, ...]], float],
    start: Partition,
    num_heads: int,
    improvement: str,
    max_steps: int,
    rng: np.random.Generator,
    errors: Callable[[list, list], list[float]] | None = None,
) -> tuple[Partition, float]:
    """Descend from `start` by strictly improving moves and swaps; (partition, its error).

    `errors(groups, near)`, when given, scores a list of groups at once (same values as `error`;
    `near` is the current partition, one move or swap from every new group, a hint for
    incremental scoring). "best" takes
    the first step of least delta in neighbourhood order, "first" the first improving step in a
    random order (scored in chunks of FIRST_CHUNK), so batching changes no choice."""
    if errors is None:
        errors = lambda groups, near: [error(g) for g in groups]  # noqa: E731
    groups = [tuple(g) for g in start]
    current = errors(groups, None)
    start_score = sum(current)
    for _ in range(max_steps):
        score = sum(current)
        tol = 1e-12 * max(1.0, abs(score))
        candidates = _neighbourhood(groups)
        if not candidates:
            break
        size = len(candidates)
        if improvement == "first":
            candidates = [candidates[i] for i in rng.permutation(size)]
            size = FIRST_CHUNK
        chosen = None
        for begin in range(0, len(candidates), size):
            block = candidates[begin : begin + size]
            new = np.asarray(errors([g for c in block for g in c[2:]], groups)).reshape(-1, 2)
            old = np.asarray([(current[i], current[j]) for i, j, _, _ in block])
            delta = new[:, 0] + new[:, 1] - old[:, 0] - old[:, 1]
            if improvement == "first":
                hits = np.flatnonzero(delta < -tol)
                if hits.size:
                    chosen = block[int(hits[0])]
                    break
            else:
                best = int(np.argmin(delta))
                if delta[best] < -tol:
                    chosen = block[best]
        if chosen is None:
            break
        i, j, groups[i], groups[j] = chosen
        current[i], current[j] = errors([groups[i], groups[j]], None)
    final = canonical_partition(groups, num_heads)
    score = sum(current)
    if score > start_score:  # cannot happen with strict steps; guards against rounding
        return start, start_score
    return final, score


FIRST_CHUNK = 64  # "first" improvement: candidates scored per batch before looking for a hit


def _neighbourhood(groups: list[tuple[int, ...]]):
    """All (i, j, new group i, new group j) reachable by one move or one swap."""
    out = []
    for i, gi in enumerate(groups):
        if len(gi) < 2:
            continue
        for a in gi:
            rest = tuple(h for h in gi if h != a)
            for j, gj in enumerate(groups):
                if j != i:
                    out.append((i, j, rest, tuple(sorted((*gj, a)))))
    for i, gi in enumerate(groups):
        for j in range(i + 1, len(groups)):
            gj = groups[j]
            if len(gi) == 1 and len(gj) == 1:  # exchanging two singletons changes nothing
                continue
            for a in gi:
                for b in gj:
                    new_i = tuple(sorted((*(h for h in gi if h != a), b)))
                    new_j = tuple(sorted((*(h for h in gj if h != b), a)))
                    out.append((i, j, new_i, new_j))
    return out
