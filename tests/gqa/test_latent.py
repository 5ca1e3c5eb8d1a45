"""Latent K/V layers: exact at full rank, the closed-form error, decoding, save/load, errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import gqa
from gqa.grouping import Grouping
from gqa.latent import LatentError, LatentLayer, LatentPlan, LowRankFactors, whitened_svd
from gqa.latent_model import apply_latent, cache_bytes_per_token, cached_widths, model_latent
from gqa.precision import (
    LayerPrecision,
    PrecisionError,
    PrecisionPlan,
    apply_precision,
    quantized_cache,
)
from tests.tiny import batch, logits, tiny_model

HIDDEN = 48  # tiny_model: 6 heads of head_dim 8
# float64 throughout: the whitened factors rebuild W to ~1e-14 relative (an eigh and an SVD of
# 48-wide matrices) and two layers amplify it little; 1e-9 keeps 1e4 of headroom and is far below
# what any truncation changes (> 1e-3, test_lower_rank_changes_the_model).
F64 = {"rtol": 1e-9, "atol": 1e-9}


def _grams(layers: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Full-rank grams of correlated inputs (a random mixing of independent features)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        x = torch.randn(400, HIDDEN, generator=gen, dtype=torch.float64)
        x = x @ torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64)
        out.append(x.T @ x / x.shape[0])
    return out


def _model(model_type: str = "llama", attn: str = "sdpa", kv_heads: int = 3):
    return tiny_model(model_type, num_kv_heads=kv_heads, attn=attn).double()


@pytest.mark.parametrize(
    ("model_type", "attn", "pad_left"),
    [
        ("llama", "sdpa", False),
        ("llama", "sdpa", True),
        ("llama", "eager", False),
        ("qwen2", "sdpa", False),
    ],
)
def test_full_rank_is_exact(model_type, attn, pad_left):
    source = _model(model_type, attn)
    latent = apply_latent(copy.deepcopy(source), LatentPlan.uniform(2, 24, 24), _grams())
    assert type(latent.model.layers[0].self_attn).__name__.startswith("Latent")
    inputs = batch(pad_left=pad_left)
    torch.testing.assert_close(logits(latent, inputs), logits(source, inputs), **F64)


def test_full_rank_is_exact_on_an_asymmetric_grouping():
    grouping = Grouping.create(
        6, [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]], [[[0, 1, 2, 3, 4, 5]]] * 2
    )
    grouped = gqa.convert(_model(), grouping)
    plan = LatentPlan([(24, 8), (16, None)])  # layer 0: 3 K groups, 1 V group; layer 1: 2 K groups
    latent = apply_latent(copy.deepcopy(grouped), plan, _grams())
    assert cached_widths(latent) == ([24, 16], [8, 8])
    inputs = batch()
    torch.testing.assert_close(logits(latent, inputs), logits(grouped, inputs), **F64)


def test_lower_rank_changes_the_model():
    source = _model()
    latent = apply_latent(copy.deepcopy(source), LatentPlan.uniform(2, 8, 8), _grams())
    inputs = batch()
    assert (logits(latent, inputs) - logits(source, inputs)).abs().max() > 1e-3


def test_dropped_energy_is_the_output_error():
    """The closed form equals the measured mean squared output error on the gram's own inputs."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 20, generator=gen, dtype=torch.float64) @ torch.randn(
        20, 20, generator=gen, dtype=torch.float64
    )
    x = x + 0.5  # a mean: the gram is E[x x^T], not the covariance
    weight = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    factors = whitened_svd(weight, x.T @ x / x.shape[0])
    closed = factors.dropped_energy()
    assert closed.shape == (13,) and closed[-1] == 0
    for rank in range(1, 13):
        down, up = factors.factors(rank)
        measured = (x @ weight.T - x @ down.T @ up.T).square().sum(1).mean()
        torch.testing.assert_close(closed[rank], measured, rtol=1e-9, atol=1e-9 * closed[0].item())
    torch.testing.assert_close(closed[0], (x @ weight.T).square().sum(1).mean(), rtol=1e-9, atol=0)


def test_whitening_beats_a_plain_svd_on_correlated_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(500, 20, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -3, 20, dtype=torch.float64
    )
    weight = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    down, up = whitened_svd(weight, x.T @ x / 500).factors(4)
    u, s, vt = torch.linalg.svd(weight, full_matrices=False)
    plain = u[:, :4] * s[:4] @ vt[:4]

    def error(approx):
        return (x @ (weight - approx).T).square().sum(1).mean()

    assert error(up @ down) < 0.5 * error(plain)


def test_rank_deficient_gram_still_factors():
    x = torch.randn(5, 20, dtype=torch.float64)  # 5 samples of 20 features: rank 5
    weight = torch.randn(6, 20, dtype=torch.float64)
    factors = whitened_svd(weight, x.T @ x / 5)
    down, up = factors.factors(5)
    torch.testing.assert_close(x @ (up @ down).T, x @ weight.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ranks", [(10, None), (None, 12), (10, 12)])
def test_decoding_with_the_cache_equals_the_full_forward(ranks):
    model = apply_latent(_model(), LatentPlan.uniform(2, *ranks), _grams())
    ids = batch(batch_size=1, length=14)["input_ids"]
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :9], cache=cache, use_cache=True).logits]
        for t in range(9, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)
    k_width, v_width = ranks[0] or 24, ranks[1] or 24
    layer = cache.layers[0]
    assert layer.keys.shape[1] * layer.keys.shape[-1] == k_width
    assert layer.values.shape[1] * layer.values.shape[-1] == v_width
    held = sum(x.numel() for layer in cache.layers for x in (layer.keys, layer.values))
    assert held * 2 == cache_bytes_per_token(model) * 14  # 16-bit bytes per token x tokens


def test_generate_caches_the_latent_and_matches_greedy_argmax():
    model = apply_latent(_model(), LatentPlan.uniform(2, 8, 8), _grams())
    prompt = batch(batch_size=1, length=6)["input_ids"]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        argmax = model(out[:, :-1]).logits.argmax(-1)[:, prompt.shape[1] - 1 :]
    assert torch.equal(argmax, out[:, prompt.shape[1] :])


def test_save_and_load_round_trip(tmp_path):
    model = apply_latent(_model(), LatentPlan([(12, None), (8, 16)]), _grams())
    gqa.save(model, tmp_path / "m")
    loaded = gqa.load(tmp_path / "m", dtype=torch.float64)
    assert model_latent(loaded) == model_latent(model)
    inputs = batch()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    remote = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", trust_remote_code=True, dtype=torch.float64
    )
    assert (tmp_path / "m" / "headgroup_latent.py").is_file()
    torch.testing.assert_close(logits(remote, inputs), logits(model, inputs), rtol=0, atol=0)


def test_bad_plans_and_models_are_refused():
    with pytest.raises(LatentError, match="k_rank must be a positive integer"):
        LatentLayer(0, None)
    with pytest.raises(LatentError, match="exceeds the 24 values"):
        apply_latent(_model(), LatentPlan.uniform(2, 25, None), _grams())
    with pytest.raises(LatentError, match="latent plan has 3 layers but the model has 2"):
        apply_latent(_model(), LatentPlan.uniform(3, 8, None), _grams(3))
    with pytest.raises(LatentError, match="need one gram per layer"):
        apply_latent(_model(), LatentPlan.uniform(2, 8, None), _grams(1))
    with pytest.raises(LatentError, match="'qwen3' is not supported"):
        apply_latent(_model("qwen3"), LatentPlan.uniform(2, 8, None), _grams())
    with pytest.raises(LatentError, match="unsupported latent plan version"):
        LatentPlan.from_dict({"version": 9, "layers": []})
    quantized = apply_precision(_model(), PrecisionPlan.uniform(2, 4, 4, group_size=8))
    with pytest.raises(LatentError, match="layer 0 is latent and its cache stays at 16 bits"):
        apply_latent(quantized, LatentPlan.uniform(2, 8, None), _grams())
    latent = apply_latent(_model(), LatentPlan.uniform(2, 8, None), _grams())
    with pytest.raises(PrecisionError, match="but the precision plan gives it K4/V4"):
        apply_precision(latent, PrecisionPlan.uniform(2, 4, 4, group_size=8))
    with pytest.raises(LatentError, match="already has latent layers"):
        apply_latent(latent, LatentPlan.uniform(2, 8, None), _grams())


def test_plan_round_trips_through_json():
    plan = LatentPlan([(12, None), (None, None), (8, 16)])
    assert LatentPlan.from_dict(plan.to_dict()) == plan
    assert [layer.is_latent for layer in plan.layers] == [True, False, True]
    assert isinstance(whitened_svd(torch.eye(3), torch.eye(3)), LowRankFactors)


def test_latent_and_quantized_layers_share_one_real_cache():
    """Layer 0 latent at 16 bits, layer 1 on its heads at K4/V2: the real cache (used by
    `generate`) decodes what the simulated forward computes, token by token."""
    plan = PrecisionPlan((LayerPrecision(16, 16), LayerPrecision(4, 2)), group_size=4)
    model = apply_latent(_model(), LatentPlan([(8, 12), (None, None)]), _grams())
    apply_precision(model, plan)
    ids = batch(batch_size=1, length=14)["input_ids"]
    with torch.no_grad():
        full = model(ids).logits
        cache = quantized_cache(model)
        steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **F64)
    assert cache.layers[0].keys.shape[-1] == 8 and cache.layers[0].values.shape[-1] == 12
    reordered = apply_latent(
        apply_precision(_model(), plan), LatentPlan([(8, 12), (None, None)]), _grams()
    )
    with torch.no_grad():
        torch.testing.assert_close(reordered(ids).logits, full, rtol=0, atol=0)
