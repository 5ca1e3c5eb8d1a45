"""Per-layer long-range costs: one-layer swaps equal the model converted in that layer only, and
both models come back unchanged; the `long_range` proxy built on them."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.precision import PrecisionPlan
from objectives import long_context as lc
from objectives.calibration import CalibrationConfig, calibrate
from objectives.long_range import (
    LongRangeCosts,
    late_nll,
    layer_swapped,
    long_range_costs,
    nats_per_unit,
    precision_rises,
)
from objectives.proxies import make_proxy
from tests.tiny import tiny_model

CONFIG = lc.LongContextConfig(seq_len=64, ppl_windows=2, buckets=(32,), lengths=(64,))


def test_each_cost_is_the_model_converted_in_that_layer_only(smol_tokenizer):
    model = tiny_model(num_heads=4, num_kv_heads=4, num_layers=3, vocab_size=len(smol_tokenizer))
    model.eval()
    source = Grouping.neighbour(4, 3, 4)
    grouped = Grouping.neighbour(4, 3, 2)
    base = gqa.converted_copy(model, source)
    donor = gqa.converted_copy(model, grouped, "mean")
    windows = lc.long_windows(smol_tokenizer, "valid", CONFIG.seq_len, CONFIG.ppl_windows)
    with torch.no_grad():
        before = base(input_ids=windows).logits, donor(input_ids=windows).logits
    result = long_range_costs(base, donor, smol_tokenizer, CONFIG, progress=False)
    assert result.base_nll == pytest.approx(late_nll(base, windows, CONFIG), rel=1e-6)
    for layer in range(3):
        layers = list(source.layers)
        layers[layer] = grouped.layers[layer]
        only = gqa.converted_copy(model, Grouping(4, tuple(layers)), "mean")
        expected = late_nll(only, windows, CONFIG) - result.base_nll
        assert result.costs[layer] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert any(abs(c) > 1e-4 for c in result.costs)  # the swaps changed something
    whole = late_nll(donor, windows, CONFIG) - result.base_nll
    assert result.whole == pytest.approx(whole, rel=1e-4, abs=1e-6)
    positive = sum(max(c, 0.0) for c in result.costs)
    expected = whole / positive if positive > 0 else 1.0  # a random model may gain everywhere
    assert result.compounding() == pytest.approx(expected, rel=1e-4)
    assert result.most_costly(1) == [max(range(3), key=result.costs.__getitem__)]
    with torch.no_grad():  # both models are back as they were
        assert torch.equal(base(input_ids=windows).logits, before[0])
        assert torch.equal(donor(input_ids=windows).logits, before[1])


def test_a_swap_is_undone_when_the_body_fails(smol_tokenizer):
    model = tiny_model(num_heads=4, num_kv_heads=4, num_layers=2, vocab_size=len(smol_tokenizer))
    base = gqa.converted_copy(model, Grouping.neighbour(4, 2, 4))
    donor = gqa.converted_copy(model, Grouping.neighbour(4, 2, 2), "mean")
    original = base.model.layers[1].self_attn
    with pytest.raises(RuntimeError, match="boom"), layer_swapped(base, donor, 1):
        assert base.model.layers[1].self_attn is not original
        raise RuntimeError("boom")
    assert base.model.layers[1].self_attn is original


def _one_layer_changed(source: Grouping, grouping: Grouping, layer: int) -> Grouping:
    layers = list(source.layers)
    layers[layer] = grouping.layers[layer]
    return Grouping(source.num_heads, tuple(layers))


def test_long_range_proxy_is_the_late_nll_the_one_converted_layer_adds(smol_tokenizer):
    model = tiny_model(num_heads=4, num_kv_heads=2, num_layers=3, vocab_size=len(smol_tokenizer))
    model.eval()
    source, merged = gqa.current_grouping(model), Grouping.neighbour(4, 3, 1)
    proxy = make_proxy(
        "long_range", model, None, "mean", tokenizer=smol_tokenizer, long_config=CONFIG
    )
    windows = lc.long_windows(smol_tokenizer, "valid", CONFIG.seq_len, CONFIG.ppl_windows)
    before = model(input_ids=windows).logits.detach()
    exact = late_nll(gqa.converted_copy(model, source), windows, CONFIG)
    assert proxy.layer_score(0, source.layers[0]) == 0.0 and proxy.forwards == 0  # nothing run
    split = Grouping.neighbour(4, 3, 4).layers[0]  # each source KV group split: still exact
    assert proxy.layer_score(0, split) == 0.0 and proxy.forwards == 0
    only = gqa.converted_copy(model, Grouping(4, (split, *source.layers[1:])), "mean")
    assert late_nll(only, windows, CONFIG) == pytest.approx(exact, rel=1e-5)
    scores = proxy.layer_scores(merged)
    for layer in range(3):
        only = gqa.converted_copy(model, _one_layer_changed(source, merged, layer), "mean")
        expected = late_nll(only, windows, CONFIG) - exact
        assert scores[layer] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert any(abs(s) > 1e-4 for s in scores)
    assert proxy.forwards == 4  # the base once, then one per new layer grouping
    assert proxy.score(merged) == pytest.approx(sum(scores)) and proxy.forwards == 4  # memoised
    assert torch.equal(model(input_ids=windows).logits, before)  # the source is untouched
    assert proxy.base_nll == pytest.approx(exact, rel=1e-6)


def test_long_range_proxy_needs_the_long_documents():
    model = tiny_model(num_heads=4, num_kv_heads=2, num_layers=1)
    with pytest.raises(ValueError, match="proxy 'long_range' reads long documents: it needs a "):
        make_proxy("long_range", model, None, "mean")


def test_long_range_costs_are_kept_on_disk_and_keyed_by_the_merge(
    smol_tokenizer, tmp_path, monkeypatch
):
    """A second proxy on the same statistics, merge and documents runs no forward; another merge
    measures again."""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = tiny_model(num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=len(smol_tokenizer))
    model.eval()
    calibration = CalibrationConfig(seq_len=16, num_seqs=4, grad_seqs=1, sample_seqs=4)
    stats = calibrate(model, smol_tokenizer, calibration, model_name="tiny", progress=False)
    merged = Grouping.neighbour(4, 2, 1)

    def proxy(merge: str):
        return make_proxy(
            "long_range", model, stats, merge, tokenizer=smol_tokenizer, long_config=CONFIG
        )

    first = proxy("aligned")
    scores = first.layer_scores(merged)
    assert first.forwards == 3
    again = proxy("aligned")
    assert again.layer_scores(merged) == scores and again.forwards == 0
    other = proxy("mean")
    assert other.layer_scores(merged) != scores and other.forwards == 3


def test_precision_rises_are_the_late_nll_each_plan_adds_and_the_cache_comes_back(smol_tokenizer):
    model = tiny_model(num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=len(smol_tokenizer))
    model = gqa.converted_copy(model.eval(), Grouping.neighbour(4, 2, 2))
    windows = lc.long_windows(smol_tokenizer, "valid", CONFIG.seq_len, CONFIG.ppl_windows)
    base = late_nll(model, windows, CONFIG)
    plans = [PrecisionPlan.uniform(2, k, v, 8) for k, v in ((4, 4), (2, 2))]
    rises = precision_rises(model, smol_tokenizer, plans, CONFIG, progress=False)
    for plan, rise in zip(plans, rises, strict=True):
        with gqa.precision_applied(model, plan) as quantized:
            expected = late_nll(quantized, windows, CONFIG) - base
        assert rise == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert rises[1] > rises[0] > 0  # 2 bits cost more than 4 at long range too
    assert late_nll(model, windows, CONFIG) == pytest.approx(base, rel=1e-12)  # 16 bits again


def test_compounding_scales_single_layer_costs_to_the_whole():
    costs = LongRangeCosts([0.1, -0.05, 0.3], base_nll=2.0, whole=0.8)
    assert costs.compounding() == pytest.approx(2.0, rel=1e-12)  # 0.8 / (0.1 + 0 + 0.3)
    assert LongRangeCosts([0.1], 2.0).compounding() == 1.0  # the whole not measured
    assert LongRangeCosts([-0.1, 0.0], 2.0, whole=0.5).compounding() == 1.0  # nothing costs


def test_nats_per_unit_is_the_slope_through_the_origin():
    assert nats_per_unit([1.0, 2.0, 4.0], [0.5, 1.0, 2.0]) == pytest.approx(0.5, rel=1e-12)
    # least squares: sum(e r) / sum(e^2)
    assert nats_per_unit([1.0, 3.0], [1.0, 1.0]) == pytest.approx(4 / 10, rel=1e-12)
    with pytest.raises(ValueError, match="do not grow with the proxy errors"):
        nats_per_unit([1.0, 2.0], [-0.1, -0.2])
    with pytest.raises(ValueError, match="do not grow with the proxy errors"):
        nats_per_unit([0.0], [0.3])
    with pytest.raises(ValueError, match="one rise per proxy error"):
        nats_per_unit([1.0], [])
