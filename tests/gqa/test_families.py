"""Every supported model family on a tiny random config: exact identity conversion, asymmetric
grouping with a real grouped KV cache, save/load, export to stock transformers."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqa
from gqa.grouping import Grouping
from tests.tiny import FAMILIES, tiny_model

# K != V, unequal group sizes, a different number of groups in each layer.
ASYM = Grouping.create(
    6,
    [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
    [[[0, 1, 2, 3, 4, 5]], [[0, 2], [1, 3], [4, 5]]],
)
UNIFORM = Grouping.create(6, [[[0, 3, 5], [1, 2, 4]]] * 2)  # uniform, shared, reordered
NEW_FAMILIES = [f for f in FAMILIES if f not in ("llama", "mistral", "qwen2")]
MHA_ONLY = {"gpt2", "gpt_neox", "opt", "gptj"}  # no num_key_value_heads: the source is MHA


def family_model(family: str, **overrides):
    kv_heads = 6 if family in MHA_ONLY else 3
    attn = "eager" if family == "gemma2" else "sdpa"  # stock sdpa refuses soft-capping
    return tiny_model(family, num_kv_heads=kv_heads, attn=attn, **overrides)


def ids(seed: int = 1, rows: int = 2, length: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (rows, length), generator=gen)


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_identity_grouping_reproduces_source_logits(family):
    model = family_model(family)
    x = ids()
    for grouping in (gqa.current_grouping(model), Grouping.identity(6, 2)):
        converted = gqa.convert(copy.deepcopy(model), grouping)
        assert (logits(converted, x) - logits(model, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_asymmetric_cache_holds_group_heads_and_generate_equals_no_cache_forward(family):
    model = gqa.convert(family_model(family), ASYM)
    x = ids(length=7)  # longer than the sliding windows (4) once generation is done
    out = model.generate(
        input_ids=x,
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    for layer, lg in zip(gqa.output_cache(out).layers, ASYM.layers, strict=True):
        assert layer.keys.shape[1] == lg.num_k_groups
        assert layer.values.shape[1] == lg.num_v_groups
    full = logits(model, out.sequences)
    steps = torch.stack(out.logits, 1)  # (B, new tokens, vocab), from cached decoding
    torch.testing.assert_close(steps, full[:, x.shape[1] - 1 : -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_load_round_trip_and_uniform_export_to_stock(family, tmp_path):
    model = gqa.convert(family_model(family), ASYM)
    gqa.save(model, tmp_path / "asym")
    loaded = gqa.load(tmp_path / "asym")
    x = ids()
    assert gqa.model_grouping(loaded) == ASYM
    assert torch.equal(logits(loaded, x), logits(model, x))

    uniform = gqa.convert(family_model(family), UNIFORM)
    gqa.save(uniform, tmp_path / "uniform")
    if family in MHA_ONLY:  # no stock GQA: saved grouped, exported to stock MHA at full cost
        assert gqa.model_grouping(gqa.load(tmp_path / "uniform")) == UNIFORM
        gqa.expand_to_mha(uniform).save_pretrained(tmp_path / "stock")
        path = tmp_path / "stock"
    else:
        path = tmp_path / "uniform"
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    assert gqa.model_grouping(stock) is None
    torch.testing.assert_close(logits(stock, x), logits(uniform, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_asymmetric_equals_its_stock_mha_expansion(family):
    model = gqa.convert(family_model(family), ASYM)
    x = ids()
    if family == "olmo2":  # k_norm spans all K heads: unequal copies would change it
        with pytest.raises(ValueError, match="olmo2's k_norm normalises over all K heads"):
            gqa.expand_to_mha(copy.deepcopy(model))
        model = gqa.convert(family_model(family), UNIFORM)
    reference = gqa.expand_to_mha(copy.deepcopy(model))
    assert gqa.model_grouping(reference) is None
    torch.testing.assert_close(logits(reference, x), logits(model, x), atol=1e-5, rtol=0)


def test_gpt2_refuses_plain_gqa_and_cross_attention():
    model = gqa.convert(family_model("gpt2"), UNIFORM)
    with pytest.raises(gqa.GroupingError, match="stock transformers has no GQA for model_type"):
        gqa.to_plain_gqa(model)
    with pytest.raises(gqa.UnsupportedModelError, match="gpt2 with cross-attention"):
        gqa.get_adapter(family_model("gpt2", add_cross_attention=True))


def test_gemma2_soft_capping_survives_conversion():
    """The grouped attention must soft-cap as Gemma 2 does: without it logits move a lot."""
    model = family_model("gemma2")
    x = ids()
    converted = gqa.convert(copy.deepcopy(model), Grouping.identity(6, 2))
    uncapped = copy.deepcopy(model)
    uncapped.config.attn_logit_softcapping = None
    for layer in gqa.get_adapter(uncapped).attentions():
        layer.attn_logit_softcapping = None
    assert (logits(uncapped, x) - logits(model, x)).abs().max() > 1e-2
    assert (logits(converted, x) - logits(model, x)).abs().max() <= 1e-5


def test_olmo2_k_norm_gain_is_the_rescaled_mean_of_member_gains():
    model = family_model("olmo2")
    adapter = gqa.get_adapter(model)
    gains = adapter.attention(0).k_norm.weight.detach().view(3, 8).clone()
    converted = gqa.convert(copy.deepcopy(model), ASYM)
    new = gqa.get_adapter(converted).attention(0).k_norm.weight.view(3, 8)
    source = adapter.source_kv_index(0, "k")
    w_src = adapter.projection(0, "k").weight.detach().double()
    w_new = gqa.get_adapter(converted).projection(0, "k").weight.detach().double()
    c = ((w_new.pow(2).sum() / w_new.shape[0]) / (w_src.pow(2).sum() / w_src.shape[0])).sqrt()
    for g, heads in enumerate(ASYM.layers[0].k):
        torch.testing.assert_close(new[g], gains[source[list(heads)]].mean(0) * float(c))
    assert float(c) < 1  # merged heads have less energy than the source heads


@pytest.mark.parametrize(("family", "attr"), [("stablelm", "k_layernorm"), ("cohere", "k_norm")])
def test_per_head_k_norm_gain_is_the_mean_of_member_gains(family, attr):
    model = family_model(family)
    adapter = gqa.get_adapter(model)
    gains = adapter.gains(getattr(adapter.attention(0), attr)).detach().clone()  # (3, D)
    converted = gqa.get_adapter(gqa.convert(copy.deepcopy(model), ASYM))
    new = converted.gains(getattr(converted.attention(0), attr))
    source = adapter.source_kv_index(0, "k")
    assert new.shape == (len(ASYM.layers[0].k), 8)
    for g, heads in enumerate(ASYM.layers[0].k):
        torch.testing.assert_close(new[g], gains[source[list(heads)]].mean(0))


def test_smollm3_layers_without_rope_have_no_rope_frequencies():
    adapter = gqa.get_adapter(family_model("smollm3"))
    assert adapter.rope_inv_freq(0) is not None and adapter.rope_inv_freq(1) is None


@pytest.mark.parametrize("family", ["gptj", "cohere"])
def test_interleaved_rope_is_refused_to_the_rope_aware_proxies(family):
    adapter = gqa.get_adapter(family_model(family))
    with pytest.raises(gqa.UnsupportedModelError, match=f"{family} rotates adjacent dims"):
        adapter.rope_inv_freq(0)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "starcoder2"])
def test_standalone_attend_matches_the_layer_inside_the_model(family):
    """`attend` (layer-local proxies, recovery) must see the sliding window the model uses."""
    model = gqa.convert(family_model(family, sliding_window=4), ASYM)
    adapter = gqa.get_adapter(model)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(x=kwargs["hidden_states"], y=output[0])

    handle = adapter.attention(0).register_forward_hook(hook, with_kwargs=True)
    logits(model, ids(length=11))
    handle.remove()
    with torch.no_grad():
        y = adapter.attend(adapter.attention(0), seen["x"])
    torch.testing.assert_close(y, seen["y"], atol=1e-5, rtol=0)


def test_every_family_loads_self_contained_without_headgroup(tmp_path):
    """Each family's asymmetric folder carries its modeling code (the adapter included): stock
    transformers with trust_remote_code=True, in an interpreter where headgroup cannot be
    imported, gives the converted model's logits, its grouped cache and the same generation.
    Without trust_remote_code, loading fails (no family loads as a different model)."""
    from tests.gqa.test_remote import run_stock_folders

    models, folders = {}, []
    for family in FAMILIES:
        models[family] = gqa.convert(family_model(family), ASYM)
        folders.append(gqa.save(models[family], tmp_path / family))
        assert (folders[-1] / "modeling_headgroup.py").is_file()
    results = run_stock_folders(folders, tmp_path)
    x = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    for (family, model), stock in zip(models.items(), results, strict=True):
        assert stock["leaked"] == [] and stock["class"] == "HeadgroupForCausalLM", family
        with torch.no_grad():
            expected = model(input_ids=x).logits
            generated = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(stock["logits"], expected, rtol=1e-5, atol=1e-5, msg=family)
        assert torch.equal(stock["sequences"], generated), family
        assert stock["k_heads"] == [3, 2] and stock["v_heads"] == [1, 3], family
    # without the carried code stock transformers must not load a different model silently
    for family, folder in zip(models, folders, strict=True):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(folder)
        assert gqa.model_grouping(gqa.load(folder)) == ASYM, family
