"""KV-cache precision: the real quantized cache, its simulation, bytes, save/load."""

import copy
import json

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.kv_quant import (
    QuantizedStore,
    dequantize,
    fake_quantize_keys,
    fake_quantize_values,
    pack,
    packed_bytes,
    quantize,
    unpack,
)
from gqa.precision import LayerPrecision, PrecisionError, PrecisionPlan
from tests.gqa.test_remote import _run_stock
from tests.tiny import batch, logits, tiny_model

GROUPING = Grouping.create(
    6,
    [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
    [[[0, 1, 2, 3, 4, 5]], [[0, 1], [2], [3, 4, 5]]],
)
MIXED = PrecisionPlan((LayerPrecision(4, 3), LayerPrecision(2, 8)), group_size=4, window=3)
GROUPING4 = Grouping.create(  # 4 layers: quantization errors pass through more of them
    6, [layer.k for layer in GROUPING.layers] * 2, [layer.v for layer in GROUPING.layers] * 2
)
MIXED4 = PrecisionPlan(MIXED.layers * 2, group_size=4, window=3)


def converted(plan=MIXED):
    model = gqa.convert(tiny_model(num_kv_heads=3), GROUPING)
    return gqa.apply_precision(model, plan)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trips_codes_in_bits_over_8_bytes_per_code(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 35))  # 35 codes a row: padding needed
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, bits * 5)
    assert packed.shape[-1] == packed_bytes(bits, 35)
    assert torch.equal(unpack(packed, bits, 35), codes.to(torch.uint8))
    # every bit pattern survives, the top code included
    top = torch.full((1, 64), 2**bits - 1)
    assert torch.equal(unpack(pack(top, bits), bits, 64), top.to(torch.uint8))


def test_quantization_error_shrinks_with_bits_and_is_within_half_a_step():
    x = torch.randn(2, 3, 16, 8) * 3
    errors = []
    for bits in (2, 3, 4, 8):
        k = fake_quantize_keys(x, bits, 4)
        codes, scale, zero = quantize(x.reshape(2, 3, 4, 4, 8), bits, dim=3)
        step = scale.float().expand(2, 3, 4, 4, 8).reshape(x.shape)
        assert ((k - x).abs() <= step / 2 + 1e-3 * x.abs().max()).all()
        errors.append(
            float((k - x).pow(2).mean() + (fake_quantize_values(x, bits, 4) - x).pow(2).mean())
        )
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_real_store_reads_back_what_the_simulation_rounds_to_bit_for_bit(bits):
    """Decoding reads the cache through `QuantizedStore.read_into` (in place, per layout: keys per
    channel over blocks of tokens, values per token over groups of channels); evaluation rounds
    with `dequantize(quantize(...))`. In float32 both must give the same bits, or decoding and
    evaluation drift apart one rounding at a time. (The simulation's straight-through
    `x + (rounded - x)` adds an ulp of its own, which the decoding tests allow for.)"""
    x = torch.randn(2, 3, 24, 16) * 3
    b, g, n, d = x.shape
    simulated = {
        "k": dequantize(*quantize(x.reshape(b, g, n // 8, 8, d), bits, dim=3)),
        "v": dequantize(*quantize(x.reshape(b, g, n, d // 8, 8), bits, dim=4)),
    }
    for kind, rounded in simulated.items():
        store = QuantizedStore(bits, kind, group_size=8)
        store.append(x[:, :, :16])
        store.append(x[:, :, 16:])  # grows: a second append of whole blocks
        out = torch.empty_like(x)
        store.read_into(out)
        assert torch.equal(out, rounded.reshape(x.shape)), kind
        torch.testing.assert_close(
            out, fake_quantize_keys(x, bits, 8) if kind == "k" else fake_quantize_values(x, bits, 8)
        )
        assert store.nbytes() < x.numel() * 4


def test_quantization_is_straight_through():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    fake_quantize_keys(x, 2, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_sixteen_bit_plan_reproduces_the_source_exactly():
    source = tiny_model(num_kv_heads=3)
    inputs = batch()
    expected = logits(source, inputs)
    model = gqa.apply_precision(copy.deepcopy(source), PrecisionPlan.uniform(2, 16))
    assert torch.equal(logits(model, inputs), expected)
    assert gqa.model_precision(model) is None


def test_simulated_forward_with_the_group_larger_than_the_text_is_exact():
    source = tiny_model(num_kv_heads=3)
    inputs = batch(length=12)
    model = gqa.apply_precision(
        copy.deepcopy(source), PrecisionPlan.uniform(2, 2, group_size=8, window=5)
    )
    # 12 tokens, window 5, blocks of 8: only queries at index >= 12 could read quantized tokens
    torch.testing.assert_close(logits(model, inputs), logits(source, inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, batch(length=24)), logits(source, batch(length=24)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad_left", [False, True])
def test_simulated_attention_in_query_chunks_equals_one_chunk(attn, pad_left, monkeypatch):
    """The simulated cache takes queries a few blocks at a time (each chunk reads only the keys it
    can see); on a padded batch that gives the one-chunk result up to float64 rounding."""
    import gqa.kv_quant as kv_quant

    model = tiny_model(num_kv_heads=3, attn=attn, num_layers=4).double()
    model = gqa.apply_precision(gqa.convert(model, GROUPING4), MIXED4)
    inputs = batch(length=29, pad_left=pad_left)
    monkeypatch.setattr(kv_quant, "QUERY_CHUNK", 1024)
    whole = logits(model, inputs)
    for chunk in (1, 4, 8, 13):  # 13: rounded up to whole blocks of 4
        monkeypatch.setattr(kv_quant, "QUERY_CHUNK", chunk)
        torch.testing.assert_close(logits(model, inputs), whole, atol=1e-12, rtol=0)


def test_simulated_cache_reads_uniform_groups_without_copies_and_the_same_values():
    """A stock GQA model given a plan keeps its own uniform grouping: the simulated cache hands
    SDPA the G heads as they are (enable_gqa); indexing every query head's K/V head gives the
    same result."""
    model = gqa.apply_precision(
        tiny_model(num_kv_heads=2).double(), PrecisionPlan.uniform(2, 3, group_size=4)
    )
    modules = [m for m in model.modules() if hasattr(m, "hg_native_gqa")]
    assert modules and all(m.hg_native_gqa for m in modules)
    inputs = batch(length=21)
    native = logits(model, inputs)
    for module in modules:
        module.hg_native_gqa = False
    torch.testing.assert_close(logits(model, inputs), native, atol=1e-12, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prefill", [1, 10])
def test_real_cache_decoding_matches_the_simulated_forward(attn, prefill, monkeypatch):
    """Decoding token by token with the real (packed) cache, well past the window, gives the
    simulated forward's log-probabilities. In float64: quantization rounds to a grid, so a float
    difference of two computation orders can move a value across a rounding boundary and change
    it by a whole step; float32's 1e-7 does so now and then (seen: up to 0.4 in a log-probability
    on SmolLM2), float64's practically never (about 1e-7 x values / step flips expected here).
    What is left is float64 rounding of the two attention paths (1e-9 on log-probabilities of
    order 1-10) with SDPA. Stock eager attention takes its softmax in float32 even in a float64
    model: its 1e-7 may flip an 8-bit code (about 0.1 flips expected here, each moving a
    log-probability by about 1e-5), hence 1e-4 there."""
    import gqa.kv_quant as kv_quant

    monkeypatch.setattr(kv_quant, "QUERY_CHUNK", 8)  # the simulation in several query chunks
    model = tiny_model(num_kv_heads=3, attn=attn, num_layers=4).double()
    model = gqa.apply_precision(gqa.convert(model, GROUPING4), MIXED4)
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        simulated = model(input_ids=ids).logits.log_softmax(-1)
        cache = gqa.quantized_cache(model)
        steps = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    decoded = torch.cat(steps, dim=1).log_softmax(-1)
    torch.testing.assert_close(decoded, simulated, atol=1e-9 if attn == "sdpa" else 1e-4, rtol=0)
    # and the quantization mattered: the unquantized model differs by far more
    plain = gqa.apply_precision(copy.deepcopy(model), None)
    with torch.no_grad():
        exact = plain(input_ids=ids).logits.log_softmax(-1)
    assert (exact - simulated).abs().max() > 1e-3


def test_real_cache_bytes_equal_the_formula():
    model = converted()
    ids = torch.randint(3, 97, (3, 23), generator=torch.Generator().manual_seed(0))
    cache = gqa.quantized_cache(model)
    with torch.no_grad():
        model(input_ids=ids[:, :9], cache=cache, use_cache=True)
        for t in range(9, 23):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            k_heads = [len(layer.k) for layer in GROUPING.layers]
            v_heads = [len(layer.v) for layer in GROUPING.layers]
            expected = MIXED.cache_bytes(k_heads, v_heads, 8, t + 1, batch=3, dtype_bytes=4)
            assert cache.nbytes() == expected
    # 23 tokens, window 3, blocks of 4: 20 quantized tokens in 5 blocks, 3 recent
    assert cache.layers[0].keys.shape[2] == 3 and cache.layers[0].k_store.blocks == 5


def test_the_cache_keeps_no_view_of_the_exact_prompt():
    """After a prefill, the full-precision window is a tensor of its own: a view of the prompt's
    keys (even an empty one) would keep every exact key alive beside the packed codes."""
    model = converted(PrecisionPlan.uniform(2, 4, group_size=4, window=0))
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    cache = gqa.quantized_cache(model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    for layer in cache.layers:
        for recent in (layer.keys, layer.values):
            assert recent.shape[2] == 0
            assert recent.untyped_storage().nbytes() == 0
    assert cache.allocated_bytes() == cache.nbytes()  # no spare capacity after one prefill


def test_steady_state_bytes_per_token():
    plan = PrecisionPlan.uniform(30, 4, group_size=32)
    # the SmolLM2 source (3 KV heads of 64): 16 bits 23040 B/token, 4 bits 7200 (31%)
    assert PrecisionPlan.uniform(30, 16).bytes_per_token([3] * 30, [3] * 30, 64) == 23040
    assert plan.bytes_per_token([3] * 30, [3] * 30, 64) == 7200
    assert PrecisionPlan.uniform(30, 8).bytes_per_token([3] * 30, [3] * 30, 64) == 12960
    assert PrecisionPlan.uniform(30, 3).bytes_per_token([2] * 30, [2] * 30, 64) == 3840
    # the exact size of a long cache approaches the steady-state cost per token
    total = plan.cache_bytes([3] * 30, [3] * 30, 64, 32 * 1000)
    assert total / (32 * 1000) == pytest.approx(7200, rel=1e-12)


def test_generate_uses_the_quantized_cache():
    model = converted()
    ids = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    out = model.generate(
        ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    cache = gqa.output_cache(out)
    assert type(cache).__name__ == "QuantizedKVCache" and cache.get_seq_length() == 18
    # greedy decoding agrees with greedy argmax over the simulated forward of the result
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits
    assert torch.equal(full[:, 6:-1].argmax(-1), out.sequences[:, 7:])


def test_plan_survives_save_load_and_a_remote_code_load_without_headgroup(tmp_path):
    model = converted()
    folder = gqa.save(model, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    assert config["headgroup_kv_precision"]["layers"] == [[4, 3], [2, 8]]
    loaded = gqa.load(folder)
    assert gqa.model_precision(loaded) == MIXED
    inputs = batch(length=20)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))

    stock = _run_stock(folder, tmp_path)
    assert stock["leaked"] == [] and stock["cache_class"] == "QuantizedKVCache"
    ids = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(stock["logits"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(stock["sequences"], generated)
    k_heads, v_heads = [3, 2], [1, 3]
    assert stock["cache_bytes"] == MIXED.cache_bytes(k_heads, v_heads, 8, 12, dtype_bytes=4)


def test_a_uniform_grouping_with_a_plan_is_not_saved_as_plain_gqa(tmp_path):
    model = gqa.convert(tiny_model(num_kv_heads=6), Grouping.neighbour(6, 2, 3))
    gqa.apply_precision(model, PrecisionPlan.uniform(2, 4, group_size=8))
    config = json.loads((gqa.save(model, tmp_path / "u") / "config.json").read_text())
    assert "auto_map" in config and config["headgroup_kv_precision"]["layers"] == [[4, 4]] * 2


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: LayerPrecision(5, 4),
            r"k_bits = 5 is not supported: choose one of \[2, 3, 4, 8, 16\]",
        ),
        (lambda: PrecisionPlan.uniform(2, 4, group_size=0), "group_size must be an integer >= 1"),
        (lambda: PrecisionPlan.uniform(2, 4, window=-1), "window must be an integer >= 0"),
        (
            lambda: PrecisionPlan.from_dict({"version": 1, "layers": [[4]]}),
            "must be \\[k_bits, v_bits\\] pairs",
        ),
    ],
)
def test_bad_plans_are_refused_with_one_line(make, message):
    with pytest.raises(PrecisionError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_a_group_size_that_does_not_divide_head_dim_is_refused():
    model = tiny_model(num_kv_heads=3)  # head_dim 8
    with pytest.raises(PrecisionError, match="group_size 3 does not divide head_dim 8"):
        gqa.apply_precision(model, PrecisionPlan.uniform(2, 4, group_size=3))
    with pytest.raises(PrecisionError, match="plan has 3 layers but the model has 2"):
        gqa.apply_precision(model, PrecisionPlan.uniform(3, 4, group_size=4))


def test_precision_applied_restores_the_plan_and_class():
    model = tiny_model(num_heads=4, num_kv_heads=2).eval()
    cls = type(model)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
    plan = PrecisionPlan.uniform(2, 2, group_size=8)
    with gqa.precision_applied(model, plan) as quantized:
        assert quantized is model and gqa.model_precision(model) == plan
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, exact)
    assert gqa.model_precision(model) is None and type(model) is cls
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, exact, atol=1e-6)
    outer = PrecisionPlan.uniform(2, 4, group_size=8)
    gqa.apply_precision(model, outer)
    with pytest.raises(RuntimeError), gqa.precision_applied(model, plan):
        raise RuntimeError("a failing measurement")
    assert gqa.model_precision(model) == outer  # the plan it had before, not none
