"""Model surgery: numerical equivalence, real KV-cache saving, generation, adapters."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

import gqa
from gqa.adapters import UnsupportedModelError, get_adapter
from gqa.grouping import Grouping
from tests.tiny import batch, logits, tiny_model

ASYM_K = [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]]
ASYM_V = [[[0, 1, 2, 3, 4, 5]], [[0, 2], [1, 3], [4, 5]]]


def asym() -> Grouping:
    return Grouping.create(6, ASYM_K, ASYM_V)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [6, 3, 2])
def test_identity_grouping_reproduces_source(attn, kv_heads):
    model = tiny_model(num_kv_heads=kv_heads, attn=attn)
    inputs = batch()
    own = gqa.current_grouping(model)
    assert [layer.num_k_groups for layer in own.layers] == [kv_heads, kv_heads]
    converted = gqa.convert(copy.deepcopy(model), own)
    torch.testing.assert_close(logits(converted, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    mha = gqa.convert(copy.deepcopy(model), Grouping.identity(6, 2))
    torch.testing.assert_close(logits(mha, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_uniform_contiguous_equals_stock_hf_gqa():
    model = tiny_model(num_kv_heads=6)
    converted = gqa.convert(copy.deepcopy(model), Grouping.neighbour(6, 2, 2))
    # The same conversion done by hand as a stock HF GQA model with 2 KV heads.
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = 2
    stock = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    state = model.state_dict()
    for key in list(state):
        if "k_proj" in key or "v_proj" in key:
            state[key] = state[key].view(2, 3, 8, -1).mean(1).reshape(16, -1)
    stock.load_state_dict(state)
    inputs = batch()
    torch.testing.assert_close(logits(converted, inputs), logits(stock, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [6, 3])
def test_merge_is_mean_of_the_source_heads_each_query_head_reads(kv_heads):
    model = tiny_model(num_kv_heads=kv_heads)
    adapter = get_adapter(model)
    source = {w: adapter.head_slices(0, w)[0].clone() for w in "kv"}
    read = torch.arange(6) // (6 // kv_heads)
    converted = gqa.convert(copy.deepcopy(model), asym())
    new = get_adapter(converted)
    for which, part in (("k", ASYM_K[0]), ("v", ASYM_V[0])):
        weights = new.head_slices(0, which)[0]
        for g, heads in enumerate(sorted(sorted(h) for h in part)):
            expected = source[which][read[heads]].mean(0)
            torch.testing.assert_close(weights[g], expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_asymmetric_equals_expanded_mha_reference(attn, model_type):
    model = tiny_model(model_type, num_kv_heads=3, attn=attn)
    converted = gqa.convert(copy.deepcopy(model), asym())
    reference = gqa.expand_to_mha(
        copy.deepcopy(converted)
    )  # stock MHA, each head a copy of its group
    assert gqa.model_grouping(reference) is None
    assert reference.config._attn_implementation == attn
    inputs = batch()
    torch.testing.assert_close(
        logits(converted, inputs), logits(reference, inputs), atol=1e-5, rtol=0
    )


def test_qwen2_biases_are_merged():
    model = tiny_model("qwen2", num_kv_heads=6)
    with torch.no_grad():
        for layer in get_adapter(model).attentions():
            layer.k_proj.bias.normal_()
    bias = get_adapter(model).head_slices(0, "k")[1].clone()
    converted = gqa.convert(copy.deepcopy(model), asym())
    merged = get_adapter(converted).head_slices(0, "k")[1]
    torch.testing.assert_close(merged[0], bias[[0, 4, 5]].mean(0))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_caches_only_group_heads_and_matches_reference(attn):
    model = tiny_model(num_kv_heads=3, attn=attn)
    grouping = asym()
    converted = gqa.convert(copy.deepcopy(model), grouping)
    reference = gqa.expand_to_mha(copy.deepcopy(converted))
    inputs = batch(pad_left=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    out = converted.generate(**inputs, **kwargs)
    ref = reference.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    cache = gqa.output_cache(out)
    cached_bytes = 0
    for layer, lg in zip(cache.layers, grouping.layers, strict=True):
        assert layer.keys.shape[1] == lg.num_k_groups
        assert layer.values.shape[1] == lg.num_v_groups
        cached_bytes += layer.keys[0, :, 0].numel() * 4 + layer.values[0, :, 0].numel() * 4
    assert cached_bytes == grouping.kv_bytes_per_token(head_dim=8, dtype_bytes=4)


def test_packed_decoding_matches_full_forward():
    """The cache goes in by the keyword this transformers names (`cache_keyword`), so decoding
    raises no deprecation of `past_key_values`."""
    model = gqa.convert(tiny_model(num_kv_heads=6), asym())
    inputs = batch(pad_left=True, length=10)
    full = logits(model, inputs)[:, -1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.* is deprecated")
        prefix = {k: v[:, :-1] for k, v in inputs.items()}
        out = model(**prefix, use_cache=True)
        step = model(
            input_ids=inputs["input_ids"][:, -1:],
            attention_mask=inputs["attention_mask"],
            use_cache=True,
            **{gqa.cache_keyword(model): gqa.output_cache(out)},
        ).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_padding_is_masked():
    """Padding tokens must not change the logits of real tokens (the mask reaches attention)."""
    model = gqa.convert(tiny_model(), asym())
    inputs = batch(pad_left=False)
    garbage = dict(
        inputs, input_ids=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 50)
    )
    torch.testing.assert_close(logits(model, inputs), logits(model, garbage), atol=1e-5, rtol=0)


def test_reconverting_a_converted_model_reads_its_groups():
    model = tiny_model(num_kv_heads=6)
    fine = Grouping.create(6, [[[0, 1], [2, 3], [4, 5]]] * 2)
    coarse = Grouping.create(6, [[[0, 1, 2, 3], [4, 5]]] * 2)
    twice = gqa.convert(gqa.convert(copy.deepcopy(model), fine), coarse)
    once = gqa.convert(copy.deepcopy(model), coarse)
    inputs = batch()
    torch.testing.assert_close(logits(twice, inputs), logits(once, inputs), atol=1e-5, rtol=0)
    assert gqa.model_grouping(twice) == coarse


def test_grouping_must_fit_model():
    model = tiny_model()
    with pytest.raises(
        gqa.GroupingError, match="wrong number of layers: grouping has 3, the model has 2"
    ):
        gqa.convert(model, Grouping.neighbour(6, 3, 2))


def test_unknown_merge_method():
    with pytest.raises(ValueError, match="unknown merge method 'median'"):
        gqa.convert(tiny_model(), asym(), merge="median")


def test_unsupported_model_type_names_it_and_the_docs():
    model = AutoModelForCausalLM.from_config(
        BloomConfig(n_layer=1, n_head=2, hidden_size=8, vocab_size=11)
    )
    with pytest.raises(
        UnsupportedModelError,
        match="model_type 'bloom' has no headgroup adapter.*docs/adding_a_model.md",
    ):
        get_adapter(model)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("own", [(), ("q",), ("q", "o")])
def test_converted_copy_shares_what_it_does_not_own_and_leaves_the_source(model_type, own):
    source = tiny_model(model_type, attn="eager" if model_type == "gpt2" else "sdpa")
    before = logits(source, batch())
    grouping = Grouping.create(6, [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]])
    shared = gqa.converted_copy(source, grouping, own=own)
    reference = gqa.convert(copy.deepcopy(source), grouping)
    torch.testing.assert_close(logits(shared, batch()), logits(reference, batch()))
    source_ptrs = {p.data_ptr() for p in source.parameters()}

    def is_shared(module):
        return all(p.data_ptr() in source_ptrs for p in module.parameters())

    adapter = get_adapter(shared)
    attention = set()
    for i in range(adapter.num_layers):
        module = adapter.attention(i)
        attention |= {id(p) for p in module.parameters()}
        for which in "qkvo":  # k, v new; q, o shared unless owned (a fused qkv is always split)
            fused = model_type == "gpt2" and which != "o"
            expected = which in "qo" and which not in own and not fused
            assert is_shared(adapter.projection(i, which)) == expected, (i, which)
    for p in shared.parameters():  # everything outside attention is the source's own tensor
        if id(p) not in attention:
            assert p.data_ptr() in source_ptrs
    with torch.no_grad():  # changing what the copy owns leaves the source as it was
        for i in range(adapter.num_layers):
            for which in ("k", "v", *own):
                for p in adapter.projection(i, which).parameters():
                    p.mul_(2.0)
    torch.testing.assert_close(logits(source, batch()), before, rtol=0, atol=0)
    assert gqa.current_grouping(source).layers[0].k != grouping.layers[0].k
    separate = gqa.converted_copy(source, grouping, own="all")
    assert not {p.data_ptr() for p in separate.parameters()} & source_ptrs
    with pytest.raises(ValueError, match="own names q/o"):
        gqa.converted_copy(source, grouping, own=("k",))
