"""`evolutionary`: a genetic algorithm over set partitions with exactly G groups.

Individuals are canonical partitions, so relabelled copies are one individual; the population
never holds duplicates and no partition is scored twice. Crossover keeps whole groups: a random
number of groups of parent A, then parent B's groups minus the heads already placed, repaired
to G groups (merge the two smallest / split the largest at random). Mutations: move a head,
swap two heads, or merge two groups and split one. Elitism keeps the best `elite`; parents are
picked by tournament. The run stops after `evaluations` distinct partitions were scored per layer
and kind (the fixed budget; cost = evaluations x G group errors, memoised by the proxy). The
initial population holds the neighbour and neighbour_kv partitions (`seed_neighbour`) and
uniformly random ones. When the whole space, S(H, G) partitions, fits in the budget, every
partition is scored instead and the result is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gqa.grouping import Partition, canonical_partition, neighbour_partition
from search.strategies.base import Strategy, register_strategy
from search.strategies.neighbour_kv import split_source_groups
from search.strategies.random_partition import random_partition, stirling2


@register_strategy
@dataclass
class Evolutionary(Strategy):
    name = "evolutionary"
    needs_proxy = True

    population: int = 24
    evaluations: int = 600  # distinct partitions scored per layer and kind
    elite: int = 2
    tournament: int = 3
    crossover_rate: float = 0.7
    mutation_rate: float = 0.8
    seed_neighbour: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("population", minimum=2)
        self.check_int("evaluations", minimum=1)
        self.check_int("elite", minimum=0)
        self.check_int("tournament", minimum=1)
        self.check_real("crossover_rate", 0.0, 1.0)
        self.check_real("mutation_rate", 0.0, 1.0)
        if self.elite >= self.population:
            self.fail("elite", f"must be smaller than population ({self.population})")
        if not isinstance(self.seed_neighbour, bool):
            self.fail("seed_neighbour", "must be True or False")

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        h, g = ctx.num_heads, num_groups
        if stirling2(h, g) <= self.evaluations:  # the budget covers the whole space: be exact
            every = all_partitions(h, g)
            errors = ctx.partition_errors(layer, kind, every)
            return min(zip(errors, every, strict=True))[1]
        scores: dict[Partition, float] = {}
        pending: dict[Partition, None] = {}  # this generation's new individuals, scored at its end

        def score(p: Partition) -> None:
            if p not in scores:
                pending[p] = None

        def score_pending() -> None:
            scores.update(zip(pending, ctx.partition_errors(layer, kind, pending), strict=True))
            pending.clear()

        population: list[Partition] = []
        seeds = []
        if self.seed_neighbour:
            seeds = [
                neighbour_partition(h, g),
                split_source_groups(ctx.source_partition(layer, kind), g),
            ]
        tries = 0
        while (
            len(population) < min(self.population, self.evaluations)
            and tries < 20 * self.population
        ):
            p = seeds.pop(0) if seeds else random_partition(h, g, rng)
            tries += 1
            if p not in population:
                population.append(p)
                score(p)
        score_pending()

        stalled = 0
        while len(scores) < self.evaluations and stalled < 10:
            before = len(scores)
            ranked = sorted(population, key=lambda p: (scores[p], p))
            children = ranked[: self.elite]
            for _ in range(20 * self.population):
                if (
                    len(children) >= self.population
                    or len(scores) + len(pending) >= self.evaluations
                ):
                    break
                child = self._pick(ranked, rng)
                if rng.random() < self.crossover_rate:
                    child = crossover(child, self._pick(ranked, rng), g, rng)
                if rng.random() < self.mutation_rate:
                    child = mutate(child, rng)
                for _ in range(5):  # a copy of someone already here is no new individual
                    if child not in children:
                        break
                    child = mutate(child, rng)
                if child not in children:
                    score(child)
                    children.append(child)
            score_pending()
            population = children
            stalled = stalled + 1 if len(scores) == before else 0
        return min(scores, key=lambda p: (scores[p], p))

    def _pick(self, ranked: list[Partition], rng: np.random.Generator) -> Partition:
        """Tournament selection: the best of `tournament` random members (ranked best first)."""
        return ranked[int(rng.integers(len(ranked), size=self.tournament).min())]


def all_partitions(num_heads: int, num_groups: int) -> list[Partition]:
    """Every partition of range(num_heads) into exactly num_groups groups (S(H, G) of them)."""

    def extend(head: int, groups: list[list[int]]):
        if num_heads - head < num_groups - len(groups):
            return  # too few heads left to open the missing groups
        if head == num_heads:
            yield canonical_partition(groups, num_heads)
            return
        for grp in groups:
            grp.append(head)
            yield from extend(head + 1, groups)
            grp.pop()
        if len(groups) < num_groups:
            groups.append([head])
            yield from extend(head + 1, groups)
            groups.pop()

    return list(extend(0, []))


def crossover(a: Partition, b: Partition, num_groups: int, rng: np.random.Generator) -> Partition:
    """Some whole groups of A, then the rest of the heads grouped as in B, repaired to G groups."""
    take = int(rng.integers(1, num_groups)) if num_groups > 1 else 1
    groups = [list(a[i]) for i in rng.permutation(len(a))[:take]]
    used = {h for grp in groups for h in grp}
    for i in rng.permutation(len(b)):
        rest = [h for h in b[i] if h not in used]
        if rest:
            groups.append(rest)
            used.update(rest)
    return _repair(groups, num_groups, rng)


def mutate(p: Partition, rng: np.random.Generator) -> Partition:
    """One random move, swap, or merge-and-split (assumes 1 < G < H, as strategies see)."""
    groups = [list(grp) for grp in p]
    big = [i for i, grp in enumerate(groups) if len(grp) > 1]
    i = big[int(rng.integers(len(big)))]
    j = int(rng.choice([k for k in range(len(groups)) if k != i]))
    op = int(rng.integers(3))
    if op == 0:  # move
        groups[j].append(groups[i].pop(int(rng.integers(len(groups[i])))))
    elif op == 1:  # swap
        a, b = int(rng.integers(len(groups[i]))), int(rng.integers(len(groups[j])))
        groups[i][a], groups[j][b] = groups[j][b], groups[i][a]
    else:  # merge two groups, then split one in two
        groups[i].extend(groups.pop(j))
        return _repair(groups, len(p), rng)
    return canonical_partition(groups, sum(len(grp) for grp in groups))


def _repair(groups: list[list[int]], num_groups: int, rng: np.random.Generator) -> Partition:
    """Merge the two smallest groups while there are too many; split the largest at a random
    point while there are too few."""
    num_heads = sum(len(grp) for grp in groups)
    while len(groups) > num_groups:
        order = sorted(range(len(groups)), key=lambda k: (len(groups[k]), rng.random()))
        small, other = order[0], order[1]
        groups[other].extend(groups[small])
        groups.pop(small)
    while len(groups) < num_groups:
        largest = max(range(len(groups)), key=lambda k: (len(groups[k]), rng.random()))
        members = [groups[largest][k] for k in rng.permutation(len(groups[largest]))]
        cut = int(rng.integers(1, len(members)))
        groups[largest] = members[:cut]
        groups.append(members[cut:])
    return canonical_partition(groups, num_heads)
