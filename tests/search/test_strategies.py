"""Strategies: valid groupings for any budget, recovery of planted head clusters, the registry."""

import pytest
import torch

from gqa.adapters import get_adapter
from gqa.grouping import Grouping, neighbour_partition
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from search.budget import Budget, allocate, error_curves
from search.strategies import STRATEGIES, SearchContext, get_strategy, make_strategy
from search.strategies.random_partition import random_partition, stirling2
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=4, grad_seqs=1, sample_seqs=4, batch_size=4)
# Per layer, 8 heads in planted clusters of 4, 3 and 1 exact duplicates, not contiguous.
PLANTED = (((0, 3, 5, 6), (1, 4, 7), (2,)), ((0, 4, 6, 7), (1, 2, 5), (3,)))
FAST = {  # small searches, enough for 8 heads
    "evolutionary": {"evaluations": 300, "population": 16},
    "kmeans": {"n_init": 3, "tokens": 32},
}


def _strategy(name, **params):
    return make_strategy(name, **{**FAST.get(name, {}), **params})


def _context(model, tokenizer, cache) -> SearchContext:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(cache))
        stats = calibrate(model, tokenizer, CONFIG, model_name="tiny", progress=False)
    return SearchContext.from_model(model, proxy=make_proxy("kv_recon", model, stats), stats=stats)


@pytest.fixture(scope="module")
def planted(smol_tokenizer, tmp_path_factory) -> SearchContext:
    model = tiny_model(num_heads=8, num_kv_heads=8, head_dim=8, vocab_size=49152)
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer, partition in enumerate(PLANTED):
            for kind in ("k", "v"):
                weight, bias = adapter.head_slices(layer, kind)
                for group in partition:
                    for head in group[1:]:
                        weight[head].copy_(weight[group[0]])
                        if bias is not None:
                            bias[head].copy_(bias[group[0]])
    return _context(model, smol_tokenizer, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def gqa_source(smol_tokenizer, tmp_path_factory) -> SearchContext:
    model = tiny_model(num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=49152)
    return _context(model, smol_tokenizer, tmp_path_factory.mktemp("cache"))


def _budgets(h):
    odd = 3 if h % 3 else 4  # a G that does not divide H (and exceeds 2 source groups)
    return [
        Budget.uniform(2, 1),
        Budget.uniform(2, h),
        Budget.uniform(2, odd),
        Budget((2, h - 1), (h - 2, 1)),  # G differs per layer and between K and V
    ]


@pytest.fixture(params=["planted", "gqa_source"])
def ctx(request) -> SearchContext:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_meets_every_budget(name, ctx):
    strategy = _strategy(name)
    for budget in _budgets(ctx.num_heads):
        grouping = strategy.propose(ctx, budget)
        assert isinstance(grouping, Grouping)
        assert Budget.of(grouping) == budget
        assert grouping.num_heads == ctx.num_heads
    shared = _strategy(name, share_kv=True).propose(ctx, Budget((3, 5), (3, 5)))
    assert all(layer.k == layer.v for layer in shared.layers)
    assert Budget.of(shared) == Budget((3, 5), (3, 5))
    assert strategy.propose(ctx, budget) == _strategy(name).propose(ctx, budget)  # seeded


@pytest.mark.parametrize("name", ["kmeans", "greedy", "evolutionary", "hierarchical"])
def test_planted_clusters_are_recovered(planted, name):
    grouping = _strategy(name).propose(planted, Budget.uniform(2, 3))
    assert [(layer.k, layer.v) for layer in grouping.layers] == [(p, p) for p in PLANTED]
    assert planted.proxy.score(grouping) == pytest.approx(0.0, abs=1e-6)


def test_neighbour_misses_planted_clusters(planted):
    grouping = make_strategy("neighbour").propose(planted, Budget.uniform(2, 3))
    assert grouping.layers[0].k == neighbour_partition(8, 3)
    assert planted.proxy.score(grouping) > 1.0


@pytest.mark.parametrize("improvement", ["best", "first"])
def test_greedy_is_never_worse_than_its_start(planted, improvement):
    budget = Budget((2, 5), (4, 3))
    for seed in range(4):
        start = make_strategy("random", seed=seed).propose(planted, budget)
        for params in ({}, {"max_steps": 1}, {"restarts": 2}):
            greedy = make_strategy(
                "greedy", start="random", seed=seed, improvement=improvement, **params
            )
            found = greedy.propose(planted, budget)
            for a, b in zip(
                planted.proxy.layer_scores(found), planted.proxy.layer_scores(start), strict=True
            ):
                assert a <= b + 1e-9
        no_steps = make_strategy("greedy", start="random", seed=seed, max_steps=0)
        assert no_steps.propose(planted, budget) == start


def test_evolutionary_respects_its_evaluation_budget(planted, monkeypatch):
    seen = []
    score = planted.partition_error
    monkeypatch.setattr(planted, "partition_error", lambda *a: seen.append(a) or score(*a))
    make_strategy("evolutionary", evaluations=40, population=8).propose(
        planted, Budget((3, 4), (2, 5))
    )
    calls = {}
    for layer, kind, _ in seen:
        calls[layer, kind] = calls.get((layer, kind), 0) + 1
    assert set(calls) == {(0, "k"), (0, "v"), (1, "k"), (1, "v")}
    assert max(calls.values()) <= 40
    assert len(seen) == len(set(seen))  # no partition scored twice


def test_balanced_kmeans_gives_near_equal_sizes(planted):
    grouping = make_strategy("kmeans", balanced=True, n_init=2).propose(
        planted, Budget((3, 2), (5, 3))
    )
    for layer in grouping.layers:
        for partition in (layer.k, layer.v):
            sizes = [len(g) for g in partition]
            assert max(sizes) - min(sizes) <= 1


def test_neighbour_kv_keeps_source_groups_whole():
    ctx = SearchContext.from_model(tiny_model(num_heads=9, num_kv_heads=3))
    strategy = make_strategy("neighbour_kv")

    def part(g):
        return strategy.propose(ctx, Budget.uniform(2, g)).layers[1].k

    assert part(2) == ((0, 1, 2, 3, 4, 5), (6, 7, 8))
    assert part(3) == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    assert part(4) == ((0, 1), (2,), (3, 4, 5), (6, 7, 8))
    assert part(6) == ((0, 1), (2,), (3, 4), (5,), (6, 7), (8,))
    assert make_strategy("neighbour").propose(ctx, Budget.uniform(2, 2)).layers[0].k == (
        (0, 1, 2, 3, 4),
        (5, 6, 7, 8),
    )


def test_neighbour_kv_equals_neighbour_for_mha():
    ctx = SearchContext.from_model(tiny_model(num_heads=7, num_kv_heads=7))
    for g in range(1, 8):
        budget = Budget.uniform(2, g)
        assert make_strategy("neighbour_kv").propose(ctx, budget) == make_strategy(
            "neighbour"
        ).propose(ctx, budget)


def test_random_partitions_are_uniform():
    import numpy as np

    assert [stirling2(8, k) for k in range(1, 9)] == [1, 127, 966, 1701, 1050, 266, 28, 1]
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(2500):
        p = random_partition(5, 3, rng)
        assert len(p) == 3
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) == stirling2(5, 3) == 25
    assert all(60 <= c <= 140 for c in counts.values())  # 100 expected each


def test_error_curves_and_allocation(planted):
    curves = error_curves(make_strategy("hierarchical"), planted, "k")
    assert len(curves) == 2 and all(len(c) == 8 for c in curves)
    for layer in range(2):
        assert curves[layer][2] == pytest.approx(0.0, abs=1e-6)  # G = 3: the planted clusters
        assert curves[layer][0] > 0
    budget = allocate(curves, curves, 6, 5)
    assert sum(budget.k) == 6 and budget.k == (3, 3)


def test_proxy_driven_strategies_need_a_group_proxy(planted):
    bare = SearchContext(planted.num_heads, planted.num_layers, None, planted.source)
    for name in ("greedy", "hierarchical", "evolutionary"):
        with pytest.raises(ValueError, match=f"strategy '{name}' needs a proxy"):
            make_strategy(name).propose(bare, Budget.uniform(2, 3))
    with pytest.raises(ValueError, match="strategy 'kmeans' needs calibration statistics"):
        make_strategy("kmeans").propose(bare, Budget.uniform(2, 3))
    with pytest.raises(ValueError, match="strategy 'greedy' needs a proxy"):  # even if trivial
        make_strategy("greedy").propose(bare, Budget.uniform(2, 1))
    assert make_strategy("neighbour").propose(bare, Budget.uniform(2, 3))


def test_budget_must_fit_the_model(planted):
    with pytest.raises(ValueError, match="budget is for 3 layers but the model has 2"):
        make_strategy("neighbour").propose(planted, Budget.uniform(3, 2))
    with pytest.raises(ValueError, match="9 K groups but there are only 8 query heads"):
        make_strategy("neighbour").propose(planted, Budget.uniform(2, 9))
    mixed = make_strategy("neighbour", share_kv=True).propose(planted, Budget((2, 3), (2, 4)))
    assert mixed.layers[0].shared and not mixed.layers[1].shared  # shared only where K = V


def test_registry_messages():
    with pytest.raises(
        ValueError,
        match=r"unknown strategy 'nope' \(available: coarsen_source, evolutionary, greedy",
    ):
        get_strategy("nope")
    with pytest.raises(
        ValueError, match=r"strategy 'greedy' has no parameter 'steps' \(parameters: seed"
    ):
        make_strategy("greedy", steps=3)
    assert make_strategy("greedy", restarts=2).params()["restarts"] == 2


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("greedy", {"improvement": "worst"}, "improvement"),
        ("greedy", {"start": "nope"}, "start"),
        ("greedy", {"restarts": -1}, "restarts"),
        ("evolutionary", {"elite": 30}, "elite"),
        ("evolutionary", {"mutation_rate": 1.5}, "mutation_rate"),
        ("kmeans", {"n_init": 0}, "n_init"),
        ("hierarchical", {"linkage": "ward"}, "linkage"),
        ("random", {"seed": -1}, "seed"),
        ("neighbour", {"share_kv": "yes"}, "share_kv"),
    ],
)
def test_invalid_hyper_parameters_name_the_field(name, params, field):
    with pytest.raises(ValueError, match=rf"strategy '{name}': {field} "):
        make_strategy(name, **params)
