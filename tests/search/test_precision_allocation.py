"""Byte budgets with precision options: the quantization proxy and the exact allocation."""

import itertools

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.precision import LayerPrecision, PrecisionPlan
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies.kv_quant_error import QuantErrorTable, kv_quant_errors
from search.precision import ByteBudget, InfeasibleBudget, allocate_precision, uniform_settings
from tests.tiny import tiny_model

BITS = (2, 3, 4, 8, 16)
HEAD_DIM = 8
CONFIG = CalibrationConfig(seq_len=16, num_seqs=4, grad_seqs=2, sample_seqs=4, batch_size=2)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory):
    grouping = Grouping.create(6, [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]])
    source = tiny_model(num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        stats = calibrate(source, smol_tokenizer, CONFIG, "tiny", progress=False)
    return gqa.convert(source, grouping), stats


def _brute_force(table: QuantErrorTable, budget: float):
    best = (float("inf"), None)
    for combo in itertools.product(BITS, repeat=2 * len(table.errors)):
        layers = tuple(LayerPrecision(*combo[i : i + 2]) for i in range(0, len(combo), 2))
        plan = PrecisionPlan(layers, table.group_size, table.window)
        if plan.bytes_per_token(table.k_heads, table.v_heads, HEAD_DIM) <= budget + 1e-9:
            best = min(best, (table.plan_error(plan), plan), key=lambda t: t[0])
    return best


def test_quantization_error_is_zero_at_16_bits_and_falls_with_bits(tiny):
    model, stats = tiny
    table = kv_quant_errors(model, stats, bits=(2, 3, 4, 8), group_size=4)
    assert table.k_heads == (3, 2) and table.v_heads == (3, 2)
    for row in table.errors:
        for kind in "kv":
            values = [row[kind][b] for b in BITS]
            assert values[-1] == 0.0 and all(v >= 0 for v in values)
            assert values[0] > values[2] > values[3]  # 2 > 4 > 8 bits
    assert not hasattr(gqa.get_adapter(model).attention(0), "hg_kv_quant")  # left as it was


def test_quantization_error_predicts_the_measured_loss_change(tiny):
    """The second-order estimate tracks the real change of the loss: the plan the proxy calls
    worse has the larger measured KL to the exact model."""
    model, stats = tiny
    table = kv_quant_errors(model, stats, group_size=4)
    ids = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = model(input_ids=ids).logits.log_softmax(-1)
    measured = {}
    for bits in (2, 4):
        plan = PrecisionPlan.uniform(2, bits, group_size=4)
        quantized = gqa.apply_precision(gqa.converted_copy(model, gqa.model_grouping(model)), plan)
        with torch.no_grad():
            logp = quantized(input_ids=ids).logits.log_softmax(-1)
        measured[bits] = float((exact.exp() * (exact - logp)).sum(-1).mean())
        assert table.plan_error(plan) > 0
    assert measured[2] > measured[4]
    assert table.plan_error(PrecisionPlan.uniform(2, 2, group_size=4)) > table.plan_error(
        PrecisionPlan.uniform(2, 4, group_size=4)
    )


@pytest.mark.parametrize("fraction", [0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_allocation_equals_brute_force(tiny, fraction):
    model, stats = tiny
    table = kv_quant_errors(model, stats, group_size=8)  # per head: b + 4 bytes, 16 at 16 bits
    full = PrecisionPlan.uniform(2, 16).bytes_per_token(table.k_heads, table.v_heads, HEAD_DIM)
    budget = fraction * full
    plan = allocate_precision(table, budget, HEAD_DIM, BITS)
    assert plan.bytes_per_token(table.k_heads, table.v_heads, HEAD_DIM) <= budget + 1e-9
    expected, _ = _brute_force(table, budget)
    assert table.plan_error(plan) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_an_infeasible_byte_budget_is_refused(tiny):
    model, stats = tiny
    table = kv_quant_errors(model, stats, group_size=4)
    with pytest.raises(InfeasibleBudget, match="below the least this grouping can cost"):
        allocate_precision(table, 10.0, HEAD_DIM, BITS)


def test_byte_budgets_and_uniform_settings():
    assert ByteBudget.of_source(0.25, 23040).bytes_per_token == 5760
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="fraction of the source cache"):
            ByteBudget.of_source(bad, 23040)
    settings = uniform_settings((8, 4, 2, 16), (32,))
    assert settings == [(8, 8, 32), (8, 4, 32), (8, 2, 32), (4, 4, 32), (4, 2, 32), (2, 2, 32)]
