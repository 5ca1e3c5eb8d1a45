"""Latent K/V layers: exact at full rank, the closed-form error, decoding, save/load, errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import gqa
from gqa.grouping import Grouping
from gqa.latent import LatentError, LatentLayer, LatentPlan, LowRankFactors, whitened_svd
from gqa.latent_model import (
    apply_latent,
    cache_bytes,
    cache_bytes_per_token,
    cached_widths,
    model_latent,
)
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
    with pytest.raises(LatentError, match="group_size 8 does not divide the latent V rank 12"):
        apply_latent(quantized, LatentPlan.uniform(2, None, 12), _grams())
    latent = apply_latent(_model(), LatentPlan.uniform(2, 8, 12), _grams())
    with pytest.raises(PrecisionError, match="layer 0: group_size 8 does not divide the latent V"):
        apply_precision(latent, PrecisionPlan.uniform(2, 4, 4, group_size=8))
    apply_precision(latent, PrecisionPlan.uniform(2, 4, 16, group_size=8))  # V at 16: allowed
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


@pytest.mark.parametrize("pad_left", [False, True])
def test_quantized_latents_decode_what_the_simulated_forward_computes(pad_left):
    """Latent K at 4 bits (per channel over blocks of 4 tokens) and latent V at 2 bits (per token,
    groups of 4 channels) in layer 0, heads at K3/V16 in layer 1: decoding token by token through
    the real cache gives the simulated forward's logits, and the cache holds the formula's bytes."""
    plan = PrecisionPlan((LayerPrecision(4, 2), LayerPrecision(3, 16)), group_size=4)
    latent = apply_latent(_model(), LatentPlan([(8, 12), (None, None)]), _grams())
    exact = copy.deepcopy(latent)
    apply_precision(latent, plan)
    inputs = batch(batch_size=2, length=14, pad_left=pad_left)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = latent(**inputs).logits
        assert (full - exact(**inputs).logits).abs().max() > 1e-3  # the latents are quantized
        cache = quantized_cache(latent)
        steps = [latent(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 14):
            step = latent(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(step.logits)
    real = torch.cat(steps, 1)
    keep = mask.bool()  # padded rows attend to nothing: their logits are not compared
    torch.testing.assert_close(real[keep], full[keep], **F64)
    assert cache.layers[0].k_store.bits == 4 and cache.layers[0].k_store.blocks == 3
    assert cache.nbytes() == cache_bytes(latent, 14, batch=2, dtype_bytes=8)  # float64 model
    assert cache_bytes(exact, 14, batch=2) == 14 * 2 * cache_bytes_per_token(exact)


def test_quantized_latent_checkpoint_round_trip(tmp_path):
    model = apply_latent(_model(), LatentPlan([(8, 12), (None, 4)]), _grams())
    apply_precision(model, PrecisionPlan((LayerPrecision(4, 2), LayerPrecision(3, 4)), 4))
    gqa.save(model, tmp_path / "m")
    inputs = batch()
    remote = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", trust_remote_code=True, dtype=torch.float64
    )
    for loaded in (gqa.load(tmp_path / "m", dtype=torch.float64), remote):
        torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    ids = batch(batch_size=1, length=5)["input_ids"]
    out = remote.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))


# -- partial RoPE (MHA2MLA) ------------------------------------------------------------------------

PAIRS = ((0, 3), (1, 2), (3, 2))  # per K group of the tiny model (3 groups, head_dim 8: pairs 0-3)


def _partial_rope_reference(adapter, module, x: torch.Tensor, pairs) -> torch.Tensor:
    """One attention layer computed directly: every head of K group g rotates only the dims of
    g's kept pairs (both in its query and in its key), the rest is left unrotated."""
    b, t, _ = x.shape
    d = adapter.head_dim

    def heads(y):
        return y.view(b, t, -1, d).transpose(1, 2)

    q, k, v = (heads(getattr(module, f"{n}_proj")(x)) for n in "qkv")
    cos, sin = adapter.position_embeddings(x, module)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot_q, rot_k = (
        y * cos + torch.cat([-y[..., d // 2 :], y[..., : d // 2]], -1) * sin for y in (q, k)
    )
    kept = torch.zeros(len(pairs), d, dtype=torch.bool)
    for g, group in enumerate(pairs):
        for i in group:
            kept[g, i] = kept[g, i + d // 2] = True
    k_index = module.hg_k_index
    q_used = torch.where(kept[k_index][None, :, None], rot_q, q)
    k_used = torch.where(kept[:, None], rot_k, k).index_select(1, k_index)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_used, k_used, v.index_select(1, module.hg_v_index), is_causal=True, scale=d**-0.5
    )
    return module.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_partial_rope_at_full_rank_is_the_partially_rotated_attention():
    """With the NoPE latent at full rank (3 groups x 4 unrotated values = 12), a partial-RoPE layer
    computes attention where only the kept pairs are rotated: the up-projection absorbed into the
    query and the dropped NoPE bias change nothing (qwen2 has K biases)."""
    for model_type in ("llama", "qwen2"):
        source = gqa.converted_copy(_model(model_type), gqa.current_grouping(_model(model_type)))
        x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
        module = source.model.layers[0].self_attn
        expected = _partial_rope_reference(gqa.get_adapter(source), module, x, PAIRS)
        plan = LatentPlan([LatentLayer(12, None, PAIRS), LatentLayer()])
        latent = apply_latent(copy.deepcopy(source), plan, _grams())
        got = gqa.get_adapter(latent).attend(latent.model.layers[0].self_attn, x)
        torch.testing.assert_close(got, expected, **F64)
        assert cached_widths(latent)[0] == [3 * 4 + 12, 24]


@pytest.mark.parametrize("precision", [None, PrecisionPlan.uniform(2, 4, 4, group_size=4)])
def test_partial_rope_decodes_what_the_full_forward_computes(precision):
    plan = LatentPlan([LatentLayer(6, 12, PAIRS), LatentLayer(5, None, ((1,), (0,), (2,)))])
    model = apply_latent(_model(), plan, _grams())
    apply_precision(model, precision)
    inputs = batch(batch_size=2, length=14, pad_left=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs).logits
        cache = quantized_cache(model)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 14):
            steps.append(
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits
            )
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[keep], full[keep], **F64)
    assert cache.nbytes() == cache_bytes(model, 14, batch=2, dtype_bytes=8)
    assert cached_widths(model) == ([3 * 4 + 6, 3 * 2 + 5], [12, 24])


def test_partial_rope_round_trips_and_picks_the_strongest_pairs(tmp_path):
    source = _model()
    plan = gqa.latent_model.choose_rope_pairs(source, LatentPlan.uniform(2, 8, None), _grams(), 2)
    assert all(len(layer.rope_pairs) == 3 and layer.rope_dims == 4 for layer in plan.layers)
    model = apply_latent(copy.deepcopy(source), plan, _grams())
    gqa.save(model, tmp_path / "m")
    assert model_latent(gqa.load(tmp_path / "m", dtype=torch.float64)) == plan
    remote = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", trust_remote_code=True, dtype=torch.float64
    )
    inputs = batch()
    torch.testing.assert_close(logits(remote, inputs), logits(model, inputs), rtol=0, atol=0)
    # A pair whose query and key rows are scaled up is the one kept.
    with torch.no_grad():
        attention = source.model.layers[0].self_attn
        for proj in (attention.q_proj, attention.k_proj):
            rows = proj.weight.view(-1, 8, HIDDEN)
            rows[:, [2, 6]] *= 100
    picked = gqa.latent_model.choose_rope_pairs(source, LatentPlan.uniform(2, 8, None), _grams(), 1)
    assert picked.layers[0].rope_pairs == ((2,), (2,), (2,))


def test_bad_rope_pairs_are_refused():
    with pytest.raises(LatentError, match="rope_pairs need a latent K"):
        LatentLayer(None, 8, ((0,),))
    with pytest.raises(LatentError, match="same positive number of pairs"):
        LatentLayer(8, None, ((0,), (1, 2)))
    with pytest.raises(LatentError, match="rope_pairs name 2 K groups, the layer has 3"):
        plan = LatentPlan([LatentLayer(8, None, ((0,), (1,))), LatentLayer()])
        apply_latent(_model(), plan, _grams())
    with pytest.raises(LatentError, match="pair indices below 4"):
        apply_latent(
            _model(),
            LatentPlan([LatentLayer(8, None, ((0,), (1,), (4,))), LatentLayer()]),
            _grams(),
        )
    with pytest.raises(LatentError, match="K rank 13 exceeds the 12 values"):
        apply_latent(_model(), LatentPlan([LatentLayer(13, None, PAIRS), LatentLayer()]), _grams())
