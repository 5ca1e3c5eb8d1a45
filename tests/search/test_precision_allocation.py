"""Byte budgets with precision options: the quantization proxy and the exact allocation."""

import itertools

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.precision import LayerPrecision, PrecisionPlan
from objectives.calibration import CalibrationConfig, calibrate
from objectives.kv_quant_error import QuantErrorTable, grouping_errors, kv_quant_errors
from search.byte_allocation import (
    ByteBudget,
    ByteCounting,
    InfeasibleBudget,
    allocate_joint,
    allocate_precision,
    uniform_settings,
)
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


def _per_token(plan: PrecisionPlan, k_heads, v_heads, context: int | None) -> float:
    """A plan's bytes per token: steady state, or the exact cache of `context` tokens / context."""
    if context is None:
        return plan.bytes_per_token(k_heads, v_heads, HEAD_DIM)
    return plan.cache_bytes(k_heads, v_heads, HEAD_DIM, context) / context


def _brute_force(table: QuantErrorTable, budget: float, context: int | None = None):
    best = (float("inf"), None)
    for combo in itertools.product(BITS, repeat=2 * len(table.errors)):
        layers = tuple(LayerPrecision(*combo[i : i + 2]) for i in range(0, len(combo), 2))
        plan = PrecisionPlan(layers, table.group_size, table.window)
        if _per_token(plan, table.k_heads, table.v_heads, context) <= budget + 1e-9:
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


def test_byte_counting_at_a_context_counts_the_window_and_the_last_partial_block():
    """3 heads of 8 values at 4 bits in groups of 8: 24 B/token in the steady state. A cache of
    64 tokens with a window of 16 quantizes 48 (6 blocks of 8 x 8 values: 32 B of codes and 32 B
    of float16 scales and zeros each) and keeps 16 at 16 bits (256 B): 3 x 640 B / 64 = 30."""
    steady, windowed = ByteCounting(8), ByteCounting(8, window=16, context=64)
    assert steady.per_token(4, 3, HEAD_DIM) == 24.0
    assert windowed.per_token(4, 3, HEAD_DIM) == 30.0
    assert windowed.per_token(16, 3, HEAD_DIM) == steady.per_token(16, 3, HEAD_DIM) == 48.0
    # no window and whole blocks: the two countings agree at every width
    for bits in BITS:
        assert ByteCounting(8, 0, 64).per_token(bits, 3, HEAD_DIM) == steady.per_token(
            bits, 3, HEAD_DIM
        )
    # 60 tokens, no window: the last 4 (a partial block) are stored at 16 bits
    assert ByteCounting(8, 0, 60).per_token(4, 1, HEAD_DIM) == (7 * 64 + 4 * 16) / 60
    with pytest.raises(ValueError, match="positive token count"):
        ByteCounting(8, 0, 0)


@pytest.mark.parametrize("fraction", [0.6, 0.7, 0.85])
def test_allocation_at_a_context_counts_the_window_and_equals_brute_force(tiny, fraction):
    """With a full-precision window of 8 tokens in a cache of 32, a quarter of the tokens cost 16
    bits whatever the plan: the allocation must count them, and still be the exact optimum."""
    model, stats = tiny
    table = kv_quant_errors(model, stats, group_size=8, window=8)
    full = PrecisionPlan.uniform(2, 16).bytes_per_token(table.k_heads, table.v_heads, HEAD_DIM)
    budget = fraction * full
    plan = allocate_precision(table, budget, HEAD_DIM, BITS, context=32)
    assert plan.window == 8
    assert _per_token(plan, table.k_heads, table.v_heads, 32) <= budget + 1e-9
    expected, _ = _brute_force(table, budget, context=32)
    assert table.plan_error(plan) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # counted in the steady state the window is free, so that plan may not fit at 32 tokens
    steady = allocate_precision(table, budget, HEAD_DIM, BITS)
    assert table.plan_error(steady) <= table.plan_error(plan) + 1e-15
    if fraction == 0.6:
        assert _per_token(steady, table.k_heads, table.v_heads, 32) > budget


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


@pytest.fixture(scope="module")
def pair(smol_tokenizer, tmp_path_factory):
    """A stock 3-KV-head source, its statistics, and a converted copy that groups differently in
    layer 0 and keeps the source's grouping in layer 1."""
    source = tiny_model(num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        stats = calibrate(source, smol_tokenizer, CONFIG, "tiny-pair", progress=False)
    own = gqa.current_grouping(source).layers[1]
    grouping = Grouping(6, (Grouping.create(6, [[[0, 4, 5], [1, 2, 3]]]).layers[0], own))
    return source, stats, gqa.converted_copy(source, grouping)


def test_grouping_errors_are_zero_where_the_layer_is_the_sources(pair):
    source, stats, converted = pair
    assert grouping_errors(source, source, stats) == (0.0, 0.0)
    errors = grouping_errors(converted, source, stats)
    assert errors[0] > 0  # 2 merged K/V heads of 3
    assert errors[1] == pytest.approx(0.0, abs=1e-12)  # the source's own grouping, merged exactly


def _joint_brute_force(tables, errors, budget, context=None):
    """Every (model, K bits, V bits) per layer: the least summed error within the budget."""
    names = list(tables)
    per_layer = []
    for layer in range(2):
        options = []
        for name, kb, vb in itertools.product(names, BITS, BITS):
            t = tables[name]
            plan = PrecisionPlan((LayerPrecision(kb, vb),), t.group_size, t.window)
            cost = _per_token(plan, (t.k_heads[layer],), (t.v_heads[layer],), context)
            error = errors[name][layer] + t.errors[layer]["k"][kb] + t.errors[layer]["v"][vb]
            options.append((cost, error, name))
        per_layer.append(options)
    fits = [
        (a[1] + b[1], (a[2], b[2]))
        for a, b in itertools.product(*per_layer)
        if a[0] + b[0] <= budget + 1e-9
    ]
    return min(fits)


@pytest.mark.parametrize(
    ("fraction", "window", "context"),
    [(0.32, 0, None), (0.4, 0, None), (0.5, 0, None), (0.65, 0, None), (0.8, 0, None)]
    + [(0.6, 8, 32), (0.75, 8, 40)],
)
def test_joint_allocation_equals_brute_force(pair, fraction, window, context):
    source, stats, converted = pair
    models = {"source": source, "converted": converted}
    tables = {n: kv_quant_errors(m, stats, group_size=8, window=window) for n, m in models.items()}
    errors = {n: grouping_errors(m, source, stats) for n, m in models.items()}
    full = 2 * 2 * 3 * HEAD_DIM * 2  # 2 layers, K and V, 3 heads, fp16
    budget = fraction * full
    joint = allocate_joint(tables, errors, budget, HEAD_DIM, BITS, context=context)
    k = tuple(tables[n].k_heads[i] for i, n in enumerate(joint.models))
    v = tuple(tables[n].v_heads[i] for i, n in enumerate(joint.models))
    assert _per_token(joint.plan, k, v, context) <= budget + 1e-9
    expected, _ = _joint_brute_force(tables, errors, budget, context)
    assert joint.error == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the source-only allocation is inside the joint search space
    try:
        alone = tables["source"].plan_error(
            allocate_precision(tables["source"], budget, HEAD_DIM, BITS, context)
        )
    except InfeasibleBudget:
        alone = float("inf")
    assert joint.error <= alone + 1e-15
    if fraction == 0.32:  # below the source's 2-bit floor: only a grouped layer 0 fits
        assert alone == float("inf") and joint.models == ("converted", "source")


def test_joint_allocation_refuses_mismatched_tables(pair):
    source, stats, converted = pair
    a = kv_quant_errors(source, stats, group_size=8)
    b = kv_quant_errors(converted, stats, group_size=4)
    zeros = (0.0, 0.0)
    with pytest.raises(ValueError, match="differ in group size"):
        allocate_joint({"a": a, "b": b}, {"a": zeros, "b": zeros}, 100.0, HEAD_DIM)
    with pytest.raises(ValueError, match="name the same"):
        allocate_joint({"a": a}, {"b": zeros}, 100.0, HEAD_DIM)
    with pytest.raises(InfeasibleBudget, match="below the least these models can cost"):
        allocate_joint({"a": a}, {"a": zeros}, 10.0, HEAD_DIM)


def _reference_table(model, stats, bits, group_size):
    """The table the slow, obvious way: the whole attention module run once per setting."""
    from gqa.kv_quant import LayerQuantizer

    adapter = gqa.get_adapter(model)
    rows = []
    with torch.no_grad():
        for layer in range(adapter.num_layers):
            module, layer_stats = adapter.attention(layer), stats.layers[layer]
            exact = adapter.attend(module, layer_stats.inputs).double()
            row = {}
            for kind in "kv":
                for b in bits:
                    module.hg_kv_quant = LayerQuantizer(
                        *((b, 16) if kind == "k" else (16, b)), group_size, 0
                    )
                    delta = (adapter.attend(module, layer_stats.inputs).double() - exact).flatten(
                        0, 1
                    )
                    fisher = layer_stats.grad.double()
                    row[kind, b] = float(torch.einsum("nd,de,ne->", delta, fisher, delta)) / len(
                        layer_stats.inputs
                    )
            del module.hg_kv_quant
            rows.append(row)
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text", "olmo"])
def test_one_pass_table_equals_running_the_module_per_setting(family, smol_tokenizer, tmp_path):
    """The table's one pass per layer (projections once, W_o applied to the change of the
    attention output) gives what running the whole module once per setting gives."""
    source = tiny_model(family, num_kv_heads=3, vocab_size=49152)
    grouping = Grouping.create(6, [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path))
        stats = calibrate(source, smol_tokenizer, CONFIG, family, progress=False)
    model = gqa.convert(source, grouping)
    table = kv_quant_errors(model, stats, bits=(2, 4), group_size=4)
    reference = _reference_table(model, stats, (2, 4), 4)
    for row, expected in zip(table.errors, reference, strict=True):
        for (kind, b), value in expected.items():
            assert value > 0
            # float32 attention outputs of size ~1 differ by rounding (~1e-6 relative) between the
            # two paths; the error is a quadratic form of their difference
            assert row[kind][b] == pytest.approx(value, rel=1e-3, abs=1e-9)
