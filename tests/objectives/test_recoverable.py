"""The `recoverable` proxy: fisher error times the share of the local error a layer-wise fit leaves,
fitted once per layer grouping and shared with stage-2 recovery through the disk cache."""

import copy
import importlib

import pytest

import gqa
from gqa.grouping import Grouping, LayerGrouping
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from objectives.proxies.recoverable import Recoverable
from objectives.recovery import LayerwiseConfig, recover
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=8, grad_seqs=2, sample_seqs=8, batch_size=4)
FIT = LayerwiseConfig(steps=6, lr=1e-2, batch_size=3, check_every=2)
MERGED = Grouping.neighbour(6, 2, 2)  # 2 K and V heads per layer (the source has 3)


@pytest.fixture()
def setup(smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    model = tiny_model(num_kv_heads=3, vocab_size=49152)
    stats = calibrate(model, smol_tokenizer, CONFIG, model_name="tiny", progress=False)
    return model, stats


def test_score_is_what_recovery_leaves_in_end_to_end_units(setup):
    model, stats = setup
    proxy = make_proxy("recoverable", model, stats, "mean", recovery=FIT)
    fisher = make_proxy("fisher", model, stats, "mean")
    assert proxy.score(gqa.current_grouping(model)) == 0.0  # the source layout: exact
    one = (tuple(range(6)),)
    fitted = proxy.fitted
    weights = [proxy.layer_weight(layer) for layer in range(len(MERGED.layers))]
    assert proxy.fitted == fitted  # w_l reads the error before training: nothing is fitted
    for layer, lg in enumerate(MERGED.layers):
        fit = proxy.fit(layer, lg)
        assert 0 < fit.final <= fit.initial
        # w_l: fisher error per unit of local error, on the layer's coarsest grouping, before
        # any training (a fit's `initial`).
        coarsest = proxy.fit(layer, LayerGrouping(one, one))
        weight = fisher.layer_score(layer, LayerGrouping(one, one)) / coarsest.initial
        assert weights[layer] == pytest.approx(weight, rel=1e-12)
        assert proxy.layer_weight(layer) == pytest.approx(weight, rel=1e-12)
        assert proxy.layer_score(layer, lg) == pytest.approx(weight * fit.final, rel=1e-12)
        ratio = Recoverable(model, stats, "mean", recovery=FIT, weighting="fisher_ratio")
        expected = fisher.layer_score(layer, lg) * fit.final / fit.initial
        assert ratio.layer_score(layer, lg) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="weighting must be one of layer, fisher_ratio, none"):
        Recoverable(model, stats, "mean", recovery=FIT, weighting="bogus")


def test_fits_are_cached_and_shared_with_layerwise_recovery(setup):
    model, stats = setup
    first = make_proxy("recoverable", model, stats, "query_aware", recovery=FIT)
    value = first.score(MERGED)
    again = make_proxy("recoverable", model, stats, "query_aware", recovery=FIT)
    assert again.score(MERGED) == value and again.fitted == 0  # a second run fits nothing
    # Stage-2 layer-wise recovery of the same grouping reads the proxy's fits: no training.
    module = importlib.import_module("objectives.recovery.layerwise")
    converted = gqa.convert(copy.deepcopy(model), MERGED, merge="query_aware", stats=stats)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "fit_layer", lambda *a, **k: pytest.fail("fitted again"))
        result = recover("layerwise", converted, model, None, stats, FIT, merge="query_aware")
    assert [f for _, f in result.layer_losses] == [
        first.fit(i, lg).final for i, lg in enumerate(MERGED.layers)
    ]
    # Another recovery config is another fit.
    other = make_proxy("recoverable", model, stats, "query_aware", recovery={"steps": 2})
    other.score(MERGED)
    assert other.fitted == 2  # the two merged layers (w_l needs no fit)


def test_a_recovery_on_converted_inputs_is_predicted_by_fits_on_the_source_inputs(setup):
    """Recovery that fits layers in order on the converted model's inputs has no per-layer fit to
    share; the proxy fits each layer on the source's inputs and keys its fits as such."""
    model, stats = setup
    ordered = make_proxy(
        "recoverable", model, stats, "mean", recovery={**vars(FIT), "inputs": "converted"}
    )
    plain = make_proxy("recoverable", model, stats, "mean", recovery=FIT)
    assert ordered.config == plain.config and ordered.config.inputs == "source"
    assert ordered.cache.folder == plain.cache.folder
