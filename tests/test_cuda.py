"""The CUDA paths: calibration, proxy tables, strategies, conversion and layer-wise recovery on a
GPU give the CPU's answers. Skipped where torch sees no CUDA device (CI); run on a GPU machine
with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from objectives.recovery import recover
from search.budget import Budget
from search.strategies import SearchContext, make_strategy
from tests.tiny import batch, logits, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = CalibrationConfig(seq_len=16, num_seqs=6, grad_seqs=2, sample_seqs=6, batch_size=3)
GROUPING = Grouping.create(
    8,
    [[[0, 4, 5], [1, 2, 3], [6, 7]], [[5], [0, 1, 2, 3, 4], [6, 7]]],
    [[[0, 1], [2, 3, 4, 5, 6, 7]], [[0, 2], [1, 3], [4, 5, 6, 7]]],
)


@pytest.fixture(scope="module")
def models(smol_tokenizer, tmp_path_factory):
    """(cpu model, cuda copy, CPU statistics, CUDA statistics, tokenizer)."""
    cpu = tiny_model(num_heads=8, num_kv_heads=8, vocab_size=49152)
    gpu = copy.deepcopy(cpu).to("cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        cpu_stats = calibrate(cpu, smol_tokenizer, CONFIG, "tiny", progress=False, use_cache=False)
        gpu_stats = calibrate(gpu, smol_tokenizer, CONFIG, "tiny", progress=False, use_cache=False)
    return cpu, gpu, cpu_stats, gpu_stats, smol_tokenizer


def test_calibration_on_cuda_matches_cpu(models):
    _, _, cpu_stats, gpu_stats, _ = models
    for a, b in zip(cpu_stats.layers, gpu_stats.layers, strict=True):
        torch.testing.assert_close(b.gram.cpu(), a.gram, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.inputs.cpu(), a.inputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fisher", "attn_out", "wse"])
@pytest.mark.parametrize("merge", ["mean", "query_aware"])
def test_proxy_on_cuda_matches_cpu(models, name, merge):
    cpu, gpu, stats, _, _ = models
    expected = make_proxy(name, cpu, stats, merge=merge).layer_scores(GROUPING)
    got = make_proxy(name, gpu, stats, merge=merge).layer_scores(GROUPING)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "strategy, params",
    [("greedy", {}), ("evolutionary", {"evaluations": 60, "population": 8}), ("kmeans", {})],
)
def test_strategies_propose_the_same_on_cuda(models, strategy, params):
    cpu, gpu, stats, _, _ = models
    budget = Budget((3, 5), (4, 2))
    proposals = []
    for model in (cpu, gpu):
        ctx = SearchContext.from_model(
            model, proxy=make_proxy("fisher", model, stats, merge="query_aware"), stats=stats
        )
        grouping = make_strategy(strategy, seed=3, **params).propose(ctx, budget)
        proposals.append([(layer.k, layer.v) for layer in grouping.layers])
    assert proposals[0] == proposals[1]


def test_conversion_on_cuda_matches_cpu(models):
    cpu, gpu, stats, _, _ = models
    inputs = batch()
    on_cpu = gqa.convert(copy.deepcopy(cpu), GROUPING, merge="query_aware", stats=stats)
    on_gpu = gqa.convert(copy.deepcopy(gpu), GROUPING, merge="query_aware", stats=stats)
    assert next(on_gpu.parameters()).is_cuda
    expected = logits(on_cpu, inputs)
    got = logits(on_gpu, {k: v.cuda() for k, v in inputs.items()}).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_layerwise_recovery_on_cuda_never_hurts(models):
    _, gpu, _, stats, tokenizer = models
    converted = gqa.convert(copy.deepcopy(gpu), GROUPING, merge="query_aware", stats=stats)
    result = recover(
        "layerwise",
        converted,
        gpu,
        tokenizer,
        stats,
        {"steps": 20, "lr": 3e-3, "cache": False},
        progress=False,
    )
    assert all(final <= initial for initial, final in result.layer_losses)
    assert result.final_loss < result.initial_loss
    assert all(p.is_cuda for p in converted.parameters())
