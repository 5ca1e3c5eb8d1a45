"""Integration: the real SmolLM2-135M (from the shipped GGUF) on real LAMBADA text."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqa
from gqa.grouping import Grouping
from gqa.models import load_model
from objectives.data import TextSpec, load_passages, token_windows
from objectives.evaluate import perplexity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def text_batch(smollm2):
    tok = smollm2.tokenizer
    passages = [p[:400] for p in load_passages("eval")[:3]]
    return tok(passages, return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs).logits
    return out.masked_fill(inputs["attention_mask"][..., None] == 0, 0)


def test_identity_groupings_reproduce_source_logits(smollm2, text_batch):
    reference = _logits(smollm2.model, text_batch)
    own = gqa.convert(copy.deepcopy(smollm2.model), Grouping.neighbour(9, 30, 3))
    assert (_logits(own, text_batch) - reference).abs().max() <= 1e-4
    mha = load_model("smollm2-135m-mha").model
    assert mha.config.num_key_value_heads == 9
    assert (_logits(mha, text_batch) - reference).abs().max() <= 1e-4
    singletons = gqa.convert(mha, Grouping.identity(9, 30))
    assert (_logits(singletons, text_batch) - reference).abs().max() <= 1e-4


def test_asymmetric_generate_caches_group_heads(smollm2, text_batch):
    k = [[[0, 1, 2, 3, 4, 5], [6, 7, 8]]] * 15 + [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]] * 15
    v = [[[0, 1, 2, 3, 4, 5, 6, 7, 8]]] * 30
    grouping = Grouping.create(9, k, v)
    model = gqa.convert(copy.deepcopy(smollm2.model), grouping)
    smollm2.tokenizer.padding_side = "left"
    inputs = smollm2.tokenizer(
        ["The old man said", "She opened the door and"], return_tensors="pt", padding=True
    )
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = gqa.output_cache(out)
    assert [layer.keys.shape[1] for layer in cache.layers] == [2] * 15 + [3] * 15
    assert all(layer.values.shape[1] == 1 for layer in cache.layers)
    per_token = (
        sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
        * 4
    )
    assert per_token == grouping.kv_bytes_per_token(head_dim=64, dtype_bytes=4)


def test_uniform_conversion_round_trips_through_stock_transformers(smollm2, text_batch, tmp_path):
    model = gqa.convert(
        copy.deepcopy(smollm2.model), Grouping.create(9, [[[0, 4, 8], [1, 2, 3], [5, 6, 7]]] * 30)
    )
    gqa.save(model, tmp_path / "m", tokenizer=smollm2.tokenizer)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert stock.config.num_key_value_heads == 3
    # Query heads were reordered to make groups contiguous, so o_proj sums heads in another
    # order: float32 rounding over 30 layers, not a different function.
    torch.testing.assert_close(
        _logits(stock, text_batch), _logits(model, text_batch), rtol=1e-4, atol=2e-3
    )
    assert torch.equal(_logits(gqa.load(tmp_path / "m"), text_batch), _logits(stock, text_batch))


def test_fewer_kv_heads_raise_perplexity(smollm2):
    windows = token_windows(smollm2.tokenizer, TextSpec("eval", 128, 2))
    source = perplexity(smollm2.model, windows, progress=False)
    merged = perplexity(
        gqa.convert(copy.deepcopy(smollm2.model), Grouping.neighbour(9, 30, 1)),
        windows,
        progress=False,
    )
    assert source.tokens == merged.tokens == 2 * 127
    assert 5 < source.perplexity < merged.perplexity


def test_long_context_retrieval_agrees_with_greedy_decoding_on_the_real_cache(smollm2):
    """SmolLM2 retrieves test passkeys at 512 tokens, and greedy decoding with the real cache
    (16-bit, and a bit-packed K2/V2 one) writes the key exactly when the teacher-forced score
    says so."""
    from gqa.precision import PrecisionPlan
    from objectives.long_context import (
        LongContextConfig,
        generation_agrees,
        passkey_prompts,
        score_prompts,
    )

    config = LongContextConfig(lengths=(512,), depths=(0.2, 0.8), trials=1)
    prompts = passkey_prompts(smollm2.tokenizer, "test", config)
    model = copy.deepcopy(smollm2.model)
    assert all(o.correct for o in score_prompts(model, prompts, progress=False))
    pad = smollm2.tokenizer.eos_token_id
    assert all(generation_agrees(model, p, pad_token_id=pad) for p in prompts)
    with gqa.precision_applied(model, PrecisionPlan.uniform(30, 2, group_size=64)):
        assert all(generation_agrees(model, p, pad_token_id=pad) for p in prompts)
