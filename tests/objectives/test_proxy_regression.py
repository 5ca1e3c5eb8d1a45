"""Regression pins: proxy values and strategy proposals must not move when the scoring code is
made faster (issue 10). The numbers were computed with the pre-change implementation (the eager
H x H x D x D group tables and one-group-at-a-time scoring, commit 6ef149c) on tiny random
models; they are not derived independently (the brute-force checks are in test_merge_error and
test_calibration_and_proxies). Tolerances follow from the float32 computation behind each proxy
(tests/float_tolerance.py): another CPU sums in another order."""

import pytest

from gqa.grouping import Grouping
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from search.budget import Budget
from search.strategies import SearchContext, make_strategy
from tests.float_tolerance import proxy_rel_tolerance
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=6, grad_seqs=2, sample_seqs=6, batch_size=3)
GROUPINGS = [
    Grouping.create(
        6,
        [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
        [[[0, 1, 2, 3, 4, 5]], [[0, 2], [1, 3], [4, 5]]],
    ),
    Grouping.create(6, [[[0, 1, 2, 3, 4, 5]]] * 2),
    Grouping.create(6, [[[0, 3], [1, 4], [2, 5]], [[0, 1, 2, 3], [4, 5]]]),
]
# (proxy, merge) -> per grouping, per layer score
PINNED_SCORES = {
    ("fisher", "mean"): [
        [0.0005620828428444925, 8.77143754011764e-05],
        [0.0015000213863091245, 0.00011645326107123809],
        [0.0011148909818994568, 5.295226828955018e-05],
    ],
    ("fisher", "query_aware"): [
        [0.0005353908282497674, 8.338763994768812e-05],
        [0.0014603008816781442, 0.00011247548086062501],
        [0.001036871503164345, 5.015407431968094e-05],
    ],
    ("attn_out", "mean"): [
        [3878.583849099042, 8583.762688222707],
        [10383.227657890679, 11427.759325487968],
        [7721.072361419046, 5174.672941127029],
    ],
    ("attn_out", "query_aware"): [
        [3695.435599134328, 8148.667744209137],
        [10109.726283557753, 11026.97556965885],
        [7193.651736345011, 4889.707304678805],
    ],
    ("wse", "mean"): [
        [171.07472961705696, 183.44008385637954],
        [260.15953855972907, 280.84412165563754],
        [195.11965391979683, 142.81701977751612],
    ],
    ("act_cos", "mean"): [
        [3.4258961663129455, 3.532975343547462],
        [5.205539997132833, 5.37894119210457],
        [3.601904160860998, 2.655974650525856],
    ],
    ("kv_recon", "mean"): [
        [181.9618919601371, 202.42753274458036],
        [269.73336646076814, 294.23446557227237],
        [202.30002484557616, 159.0936002662332],
    ],
    ("kv_recon", "query_aware"): [
        [187.22508139505257, 219.23629439190356],
        [276.01644481657695, 308.3358865256376],
        [216.9847264196987, 168.50422877020105],
    ],
}
# (proxy, strategy, params) -> [(K partition, V partition) per layer] at Budget((3, 5), (4, 2)),
# on an 8-head MHA model, query_aware merge.
PINNED_PROPOSALS = {
    ("fisher", "greedy", ()): [
        (((0, 2, 4), (1, 5, 7), (3, 6)), ((0, 4), (1,), (2, 3), (5, 6, 7))),
        (((0, 1, 7), (2,), (3, 4), (5,), (6,)), ((0, 1, 3, 5), (2, 4, 6, 7))),
    ],
    ("fisher", "greedy", (("improvement", "first"), ("restarts", 2), ("start", "random"))): [
        (((0, 2, 4), (1, 5, 7), (3, 6)), ((0, 4, 6, 7), (1, 5), (2,), (3,))),
        (((0, 1, 7), (2,), (3, 4), (5,), (6,)), ((0, 1, 2, 5, 6, 7), (3, 4))),
    ],
    ("fisher", "evolutionary", (("evaluations", 60), ("population", 8))): [
        (((0, 1, 2, 4), (3, 6), (5, 7)), ((0, 4, 6), (1, 7), (2,), (3, 5))),
        (((0, 1, 7), (2,), (3, 4), (5,), (6,)), ((0, 1, 2, 5, 6, 7), (3, 4))),
    ],
    ("fisher", "evolutionary", ()): [
        (((0, 2, 4), (1, 5, 7), (3, 6)), ((0, 4, 6, 7), (1, 5), (2,), (3,))),
        (((0, 1, 7), (2,), (3, 4), (5,), (6,)), ((0, 1, 2, 5, 6, 7), (3, 4))),
    ],
    ("fisher", "hierarchical", ()): [
        (((0, 1, 2, 3, 4, 5), (6,), (7,)), ((0, 4, 5, 6, 7), (1,), (2,), (3,))),
        (((0, 1, 4, 7), (2,), (3,), (5,), (6,)), ((0, 1, 2, 3, 5, 6, 7), (4,))),
    ],
    ("act_cos", "greedy", ()): [
        (((0, 3, 6), (1, 5, 7), (2, 4)), ((0, 7), (1, 5), (2, 3), (4, 6))),
        (((0, 4), (1, 6), (2,), (3, 7), (5,)), ((0, 1, 2, 5, 6), (3, 4, 7))),
    ],
    ("act_cos", "evolutionary", (("evaluations", 60), ("population", 8))): [
        (((0, 3, 6), (1, 5, 7), (2, 4)), ((0, 7), (1, 5), (2, 3), (4, 6))),
        (((0, 3), (1,), (2, 5), (4, 6), (7,)), ((0, 1, 2, 5, 6), (3, 4, 7))),
    ],
    ("wse", "greedy", (("improvement", "first"), ("restarts", 2), ("start", "random"))): [
        (((0, 1, 2, 4, 5), (3, 7), (6,)), ((0, 7), (1, 2), (3, 5, 6), (4,))),
        (((0, 3, 4), (1, 7), (2,), (5,), (6,)), ((0, 6), (1, 2, 3, 4, 5, 7))),
    ],
    ("wse", "evolutionary", (("evaluations", 60), ("population", 8))): [
        (((0, 1, 2, 4), (3, 5, 7), (6,)), ((0, 4, 7), (1, 5), (2,), (3, 6))),
        (((0, 7), (1, 2), (3, 4), (5,), (6,)), ((0, 6), (1, 2, 3, 4, 5, 7))),
    ],
}


def _stats(model, tokenizer, cache, name):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(cache))
        return calibrate(model, tokenizer, CONFIG, model_name=name, progress=False)


@pytest.fixture(scope="module")
def gqa6(smol_tokenizer, tmp_path_factory):
    model = tiny_model(num_kv_heads=3, vocab_size=49152)
    return model, _stats(model, smol_tokenizer, tmp_path_factory.mktemp("cache"), "tiny")


@pytest.fixture(scope="module")
def mha8(smol_tokenizer, tmp_path_factory):
    model = tiny_model(num_heads=8, num_kv_heads=8, vocab_size=49152)
    return model, _stats(model, smol_tokenizer, tmp_path_factory.mktemp("cache"), "tiny8")


@pytest.mark.parametrize("name, merge", sorted(PINNED_SCORES))
def test_proxy_values_are_unchanged(gqa6, name, merge):
    model, stats = gqa6
    rel = proxy_rel_tolerance(name, depth=2, width=64)  # tiny_model: 2 layers, MLP width 64
    proxy = make_proxy(name, model, stats, merge=merge)
    first = proxy.layer_scores(GROUPINGS[0])
    for grouping, expected in zip(GROUPINGS, PINNED_SCORES[name, merge], strict=True):
        assert proxy.layer_scores(grouping) == pytest.approx(expected, rel=rel)
    # Memoised and batched paths give the first answer again, bit for bit (same machine).
    assert proxy.layer_scores(GROUPINGS[0]) == first


@pytest.mark.parametrize("key", sorted(PINNED_PROPOSALS, key=repr))
def test_strategy_proposals_are_unchanged(mha8, key):
    model, stats = mha8
    proxy_name, strategy, params = key
    ctx = SearchContext.from_model(
        model, proxy=make_proxy(proxy_name, model, stats, merge="query_aware"), stats=stats
    )
    grouping = make_strategy(strategy, **dict(params)).propose(ctx, Budget((3, 5), (4, 2)))
    assert [(layer.k, layer.v) for layer in grouping.layers] == PINNED_PROPOSALS[key]


@pytest.mark.parametrize("name", ["fisher", "act_cos"])
def test_bounded_tables_give_the_same_values_and_never_score_a_group_twice(gqa6, name):
    model, stats = gqa6
    free = make_proxy(name, model, stats, merge="query_aware" if name == "fisher" else "mean")
    bounded = make_proxy(
        name,
        model,
        stats,
        merge=free.merge,
        table_budget=1,  # one table resident at a time
    )
    for grouping in GROUPINGS:
        assert bounded.layer_scores(grouping) == free.layer_scores(grouping)
        assert len(bounded._tables) == 1
    assert bounded.builds > free.builds == 4  # 2 layers x K/V, each built once when unbounded
    builds = bounded.builds
    bounded._layers.clear()  # whole-layer memo off: known groups must come from the group memos
    for grouping in GROUPINGS:
        assert bounded.layer_scores(grouping) == free.layer_scores(grouping)
    assert bounded.builds == builds  # every group was known: nothing rebuilt


def test_table_budget_needs_a_table_proxy(gqa6):
    model, stats = gqa6
    with pytest.raises(ValueError, match="keeps no group tables"):
        make_proxy("local_attn", model, stats, table_budget=10**9)
    with pytest.raises(ValueError, match="table budget must be positive"):
        make_proxy("fisher", model, stats, table_budget=0)
