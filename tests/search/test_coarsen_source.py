"""`coarsen_source`: groups are unions of the source's KV groups; re-ranking by a second proxy."""

import pytest

from gqa.grouping import LayerGrouping
from objectives.long_context import LongContextConfig
from objectives.proxies import make_proxy
from search.budget import Budget
from search.strategies import make_strategy
from search.strategies.random_partition import stirling2
from tests.search.test_strategies import _context, gqa_source  # noqa: F401  (fixture)
from tests.tiny import tiny_model


def _unions_of_source(ctx, grouping):
    for layer, lg in enumerate(grouping.layers):
        for kind, partition in (("k", lg.k), ("v", lg.v)):
            source = ctx.source_partition(layer, kind)
            for group in partition:  # every group is a union of whole source groups
                assert all(set(s) <= set(group) or not set(s) & set(group) for s in source)


def test_coarsen_source_groups_are_unions_of_source_groups(gqa_source):  # noqa: F811
    ctx = gqa_source  # 6 query heads reading 2 source KV heads per layer
    grouping = make_strategy("coarsen_source").propose(ctx, Budget.uniform(ctx.num_layers, 1))
    _unions_of_source(ctx, grouping)
    # Enumerated candidates: the best by the guide proxy among all S(n, G) coarsenings.
    strategy = make_strategy("coarsen_source", share_kv=True)
    for layer in range(ctx.num_layers):
        candidates = strategy.candidate_partitions(ctx, layer, "kv", 1, None)
        assert len(candidates) == stirling2(2, 1)
    # G above the number of source groups: the source groups are split instead.
    split = make_strategy("coarsen_source").propose(ctx, Budget.uniform(ctx.num_layers, 4))
    for lg in split.layers:
        source = ctx.source_partition(0, "k")
        assert all(any(set(g) <= set(s) for s in source) for g in lg.k)


class _Oracle:
    """A re-ranker that prefers one chosen partition per layer and records what it was asked."""

    def __init__(self, wanted):
        self.wanted = wanted
        self.asked: list = []

    def layer_score(self, layer, grouping: LayerGrouping) -> float:
        self.asked.append((layer, grouping))
        return 0.0 if grouping.k == self.wanted[layer] else 1.0


@pytest.fixture(scope="module")
def three_groups(smol_tokenizer, tmp_path_factory):
    """6 query heads reading 3 source KV heads: 3 ways to merge them into 2 groups per layer."""
    model = tiny_model(num_heads=6, num_kv_heads=3, head_dim=8, vocab_size=49152)
    return _context(model, smol_tokenizer, tmp_path_factory.mktemp("cache"))


def test_reranker_picks_among_the_guides_top_candidates(three_groups):
    ctx = three_groups
    strategy = make_strategy("coarsen_source", share_kv=True)
    ranked = []
    for layer in range(ctx.num_layers):
        candidates = strategy.candidate_partitions(ctx, layer, "kv", 2, None)
        assert len(candidates) == 3
        ranked.append(sorted(candidates, key=lambda p: ctx.partition_error(layer, "kv", p)))
    budget = Budget.uniform(ctx.num_layers, 2)
    plain = strategy.propose(ctx, budget)
    assert [lg.k for lg in plain.layers] == [r[0] for r in ranked]  # the guide's best
    oracle = _Oracle([r[1] for r in ranked])  # prefers each layer's second best
    ctx.reranker, ctx.rerank_top = oracle, 2
    try:
        reranked = strategy.propose(ctx, budget)
        assert [lg.k for lg in reranked.layers] == [r[1] for r in ranked]
        assert all(lg.shared for lg in reranked.layers)
        asked = {(layer, g.k) for layer, g in oracle.asked}
        assert asked == {(layer, p) for layer, r in enumerate(ranked) for p in r[:2]}  # top 2 only
        oracle.wanted = [r[2] for r in ranked]  # outside the top 2: not reachable
        third = strategy.propose(ctx, budget)
        assert all(lg.k != r[2] for lg, r in zip(third.layers, ranked, strict=True))
    finally:
        ctx.reranker = None


def test_long_range_reranker_keeps_whole_the_heads_whose_merge_costs_most_late(
    three_groups, smol_tokenizer, tmp_path, monkeypatch
):
    """Re-ranked by `long_range` over all 3 candidates, each layer merges the pair of source
    heads whose merge adds the least late-position loss on long documents."""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))  # the proxy keeps its costs there
    ctx = three_groups
    model = ctx.adapter.model
    config = LongContextConfig(seq_len=64, ppl_windows=1, buckets=(32,), lengths=(64,))
    proxy = make_proxy(
        "long_range", model, ctx.stats, "mean", tokenizer=smol_tokenizer, long_config=config
    )
    strategy = make_strategy("coarsen_source", share_kv=True)
    ctx.reranker, ctx.rerank_top = proxy, 3
    try:
        chosen = strategy.propose(ctx, Budget.uniform(ctx.num_layers, 2))
    finally:
        ctx.reranker = None
    for layer, lg in enumerate(chosen.layers):
        candidates = strategy.candidate_partitions(ctx, layer, "kv", 2, None)
        costs = {p: proxy.layer_score(layer, LayerGrouping(p, p)) for p in candidates}
        assert lg.k == lg.v == min(costs, key=costs.get)
        assert len(set(costs.values())) == 3  # the three merges do differ
