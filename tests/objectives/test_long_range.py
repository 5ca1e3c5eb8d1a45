"""Per-layer long-range costs: one-layer swaps equal the model converted in that layer only, and
both models come back unchanged."""

from __future__ import annotations

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from objectives import long_context as lc
from objectives.long_range import late_nll, layer_swapped, long_range_costs
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
