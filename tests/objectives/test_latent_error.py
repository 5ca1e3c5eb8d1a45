"""The latent error table (closed form and allocation units) and the latent rank allocation."""

import copy
import itertools
import json

import pytest
import torch

from gqa.latent import LatentLayer, LatentPlan
from gqa.latent_model import apply_latent, cache_bytes_per_token
from gqa.precision import LayerPrecision, PrecisionPlan, kind_bytes_per_token, precision_applied
from objectives.calibration import CalibrationConfig, calibrate
from objectives.kv_quant_error import grouping_errors, kv_quant_errors
from objectives.latent_error import latent_errors, quantizable
from search.byte_allocation import (
    InfeasibleBudget,
    allocate_joint,
    allocate_latent,
    allocate_precision,
)
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=8, grad_seqs=2, sample_seqs=4, batch_size=4)
RANKS = (4, 8, 16)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory):
    source = tiny_model(num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        stats = calibrate(source, smol_tokenizer, CONFIG, "tiny", progress=False)
    return source, stats, latent_errors(source, stats, RANKS)


def test_errors_fall_with_rank_and_vanish_at_full_width(tiny):
    _, _, table = tiny
    for row, closed, widths in zip(table.errors, table.closed, table.widths, strict=True):
        for kind in "kv":
            assert widths[kind] == 24
            assert sorted(row[kind]) == [4, 8, 16, 24] and row[kind][24] == 0.0
            values = [row[kind][r] for r in (4, 8, 16)]
            assert values[0] > values[1] > values[2] > 0
            fractions = [closed[kind][r] for r in (4, 8, 16, 24)]
            assert 1 > fractions[0] > fractions[1] > fractions[2] > fractions[3] == 0


def test_table_entry_is_the_error_of_that_single_change(tiny):
    """An entry equals the grouping-error measure of the model with only that kind of that layer
    latent: the allocation's units, measured on the whole converted model."""
    source, stats, table = tiny
    grams = [layer.gram for layer in stats.layers]
    plan = LatentPlan((LatentLayer(None, None), LatentLayer(8, None)))
    latent = apply_latent(copy.deepcopy(source), plan, grams)
    measured = grouping_errors(latent, source, stats)
    assert measured[0] == pytest.approx(0.0, abs=1e-9)
    assert measured[1] == pytest.approx(table.errors[1]["k"][8], rel=1e-6)


def test_allocation_is_the_best_plan_under_the_budget(tiny):
    _, _, table = tiny
    budget = 2 * (24 + 16 + 8 + 8)  # bytes per token at 16 bits
    plan, error = allocate_latent(table, budget)
    options = [table.ranks(layer, kind) for layer in range(2) for kind in "kv"]
    best = min(
        (
            sum(table.errors[i // 2]["kv"[i % 2]][r] for i, r in enumerate(combo))
            for combo in itertools.product(*options)
            if 2 * sum(combo) <= budget
        ),
    )
    assert error == pytest.approx(best)
    chosen = sum((layer.k_rank or 24) + (layer.v_rank or 24) for layer in plan.layers)
    assert 2 * chosen <= budget
    full, _ = allocate_latent(table, 2 * 4 * 24)
    assert not any(layer.is_latent for layer in full.layers)
    with pytest.raises(InfeasibleBudget, match="below the least these ranks can cost"):
        allocate_latent(table, 2 * 4 * 4 - 1)


def test_allocated_plan_builds_a_model_of_the_planned_bytes(tiny):
    source, stats, table = tiny
    plan, _ = allocate_latent(table, 2 * 60)
    latent = apply_latent(copy.deepcopy(source), plan, [layer.gram for layer in stats.layers])
    assert cache_bytes_per_token(latent) <= 2 * 60
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        assert torch.isfinite(latent(ids).logits).all()


def test_joint_allocation_with_latent_options_beats_each_axis(tiny):
    """Latent ranks as options of the joint allocation: never worse (in its units) than bits
    alone or ranks alone at the same budget, within budget, and latent layers stay 16-bit."""
    source, stats, table = tiny
    quant = kv_quant_errors(source, stats, bits=(2, 4), group_size=4)
    zeros = {"source": (0.0, 0.0)}
    for budget in (130.0, 150.0, 170.0):  # the 16-bit source: 192 B; 2 bits g4: 120 B
        joint = allocate_joint(
            {"source": quant}, zeros, budget, 8, (2, 4, 16), latent=table, latent_model="source"
        )
        bits_only = allocate_precision(quant, budget, 8, (2, 4, 16))
        assert joint.error <= quant.plan_error(bits_only) + 1e-12
        try:
            _, ranks_error = allocate_latent(table, budget)
            assert joint.error <= ranks_error + 1e-12
        except InfeasibleBudget:
            pass
        assert _spent(joint) <= budget + 1e-9
        for precision, ranks in zip(joint.plan.layers, _ranks(joint), strict=True):
            if ranks.k_rank:  # the table has no quantized latents: latent kinds stay 16-bit
                assert precision.k_bits == 16
            if ranks.v_rank:
                assert precision.v_bits == 16
    with pytest.raises(ValueError, match="needs latent_model"):
        allocate_joint({"source": quant}, zeros, 60.0, 8, (2, 4, 16), latent=table)


def _ranks(joint) -> list[LatentLayer]:
    return list(joint.latent.layers) if joint.latent else [LatentLayer()] * len(joint.plan.layers)


def _spent(joint, group_size: int = 4) -> float:
    """Bytes per token of a joint allocation of the tiny source (3 heads of 8 per kind)."""
    spent = 0.0
    for precision, ranks in zip(joint.plan.layers, _ranks(joint), strict=True):
        for bits, rank in ((precision.k_bits, ranks.k_rank), (precision.v_bits, ranks.v_rank)):
            heads, width = (1, rank) if rank else (3, 8)
            spent += kind_bytes_per_token(heads, width, bits, group_size)
    return spent


@pytest.fixture(scope="module")
def quantized_table(tiny):
    source, stats, _ = tiny
    return latent_errors(source, stats, RANKS, bits=(2, 4), group_size=4)


def test_quantized_latent_entry_is_the_error_of_that_single_change(tiny, quantized_table):
    """A quantized entry equals the same measure of the whole model with that layer's K latent at
    rank 8 and its latent cache at 2 bits (the simulated quantized cache)."""
    source, stats, table = tiny
    assert quantized_table.errors == table.errors
    assert set(quantized_table.quantized[1]["k"]) == {(r, b) for r in RANKS for b in (2, 4)}
    assert quantizable("v", 8, 4) and not quantizable("v", 6, 4) and quantizable("k", 6, 4)
    plan = LatentPlan((LatentLayer(None, None), LatentLayer(8, None)))
    latent = apply_latent(copy.deepcopy(source), plan, [layer.gram for layer in stats.layers])
    precision = PrecisionPlan((LayerPrecision(16, 16), LayerPrecision(2, 16)), group_size=4)
    with precision_applied(latent, precision):
        measured = grouping_errors(latent, source, stats)
    assert measured[1] == pytest.approx(quantized_table.quantized[1]["k"][8, 2], rel=1e-6)
    assert quantized_table.quantized[1]["k"][8, 2] > table.errors[1]["k"][8]


def test_joint_allocation_over_quantized_latents_is_the_brute_force_best(tiny, quantized_table):
    """Per kind: the heads at 2, 4 or 16 bits, or a latent at a measured (rank, bits); the joint
    knapsack finds the best of every combination over both layers, and quantized latents can only
    lower its error."""
    source, stats, table = tiny
    quant = kv_quant_errors(source, stats, bits=(2, 4), group_size=4)
    zeros = {"source": (0.0, 0.0)}
    bits = (2, 4, 16)

    def kind_options(layer: int, kind: str) -> list[tuple[float, float]]:
        heads = [(kind_bytes_per_token(3, 8, b, 4), quant.errors[layer][kind][b]) for b in bits]
        latents = [
            (kind_bytes_per_token(1, r, b, 4), e)
            for r, b, e in quantized_table.options(layer, kind)
            if r < 24
        ]
        return heads + latents

    for budget in (60.0, 90.0, 130.0):  # every kind at 2 bits: 120 B; rank 4 at 2 bits: 12 B
        joint = allocate_joint(
            {"source": quant}, zeros, budget, 8, bits, latent=quantized_table, latent_model="source"
        )
        layers = [
            [
                (kc + vc, ke + ve)
                for (kc, ke), (vc, ve) in itertools.product(
                    kind_options(layer, "k"), kind_options(layer, "v")
                )
            ]
            for layer in range(2)
        ]
        best = min(a[1] + b[1] for a, b in itertools.product(*layers) if a[0] + b[0] <= budget)
        assert joint.error == pytest.approx(best)
        assert _spent(joint) <= budget + 1e-9
        unquantized = allocate_joint(
            {"source": quant}, zeros, budget, 8, bits, latent=table, latent_model="source"
        )
        assert joint.error <= unquantized.error + 1e-12


def test_error_tables_round_trip_through_json(tiny, quantized_table):
    """Both tables survive JSON (how the byte front keeps them in its storage) exactly: integer
    settings, (rank, bits) settings, widths, group size and window."""
    source, stats, _ = tiny
    quant = kv_quant_errors(source, stats, bits=(2, 4), group_size=4, window=2)
    for table in (quant, quantized_table):
        text = json.dumps(table.to_json())
        assert type(table).from_json(json.loads(text)) == table
    assert any(isinstance(key, tuple) for key in quantized_table.quantized[0]["k"])
