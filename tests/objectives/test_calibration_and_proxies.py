"""Calibration statistics, proxies and the query-aware merge on a tiny random model."""

import copy

import pytest
import torch

import gqa
from gqa.adapters import get_adapter
from gqa.grouping import Grouping
from objectives import calibration
from objectives.calibration import CalibrationConfig, calibrate
from objectives.long_context import LongContextConfig
from objectives.proxies import PROXIES, make_proxy
from objectives.sensitivity import value_weights
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=6, grad_seqs=2, sample_seqs=6, batch_size=3)
ASYM = Grouping.create(
    6,
    [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
    [[[0, 1, 2, 3, 4, 5]], [[0, 2], [1, 3], [4, 5]]],
)


LONG = LongContextConfig(seq_len=64, ppl_windows=1, buckets=(32,), lengths=(64,))


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_kv_heads=3, vocab_size=49152)


@pytest.fixture(scope="module")
def stats(model, smol_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(cache))
        return calibrate(model, smol_tokenizer, CONFIG, model_name="tiny", progress=False)


def test_statistics_match_brute_force(model, stats):
    adapter = get_adapter(model)
    for layer, s in enumerate(stats.layers):
        x = s.inputs.reshape(-1, adapter.hidden_size).double()  # all tokens kept (sample == num)
        assert x.shape[0] == stats.tokens == 6 * 16
        torch.testing.assert_close(s.gram.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        q = adapter.projection(layer, "q")(x.float()).double().view(-1, 6, 8)
        torch.testing.assert_close(
            s.query.double(), torch.einsum("nhi,nhj->hij", q, q) / x.shape[0], rtol=1e-4, atol=1e-5
        )
        assert s.grad.shape == (48, 48) and float(s.grad.diagonal().sum()) > 0
    assert stats.token_ids.shape == (6, 16)


def test_statistics_are_reused_from_disk(model, smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    first = calibrate(model, smol_tokenizer, CONFIG, model_name="tiny", progress=False)
    assert len(list((tmp_path / "calibration").glob("*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("statistics were recomputed")

    monkeypatch.setattr(calibration, "collect", fail)
    second = calibrate(model, smol_tokenizer, CONFIG, model_name="tiny", progress=False)
    assert torch.equal(first.layers[1].gram, second.layers[1].gram)
    with pytest.raises(AssertionError, match="recomputed"):  # a different seed is a different key
        calibrate(
            model,
            smol_tokenizer,
            CalibrationConfig(**{**CONFIG.__dict__, "seed": 1}),
            "tiny",
            progress=False,
        )


def test_bad_calibration_config():
    with pytest.raises(ValueError, match="calibration grad_seqs must be in 0..num_seqs"):
        CalibrationConfig(num_seqs=4, grad_seqs=5)


@torch.no_grad()
def _brute_kv_error(source_model, converted, stats, layer, kind, weight_of=None):
    """sum_h mean_x |M_h^(1/2) (W_s(h) - W_group(h)) x|^2 on the calibration inputs."""
    a, b = get_adapter(source_model), get_adapter(converted)
    x = stats.layers[layer].inputs.reshape(-1, a.hidden_size).double().detach()
    src = a.head_slices(layer, kind)[0].double()[a.source_kv_index(layer, kind)]
    new = b.head_slices(layer, kind)[0].double()[b.source_kv_index(layer, kind)]
    delta = torch.einsum("hid,nd->nhi", src - new, x)  # (N, H, D)
    if weight_of is None:
        return float(delta.pow(2).sum((1, 2)).mean())
    m = weight_of.double()
    return float(torch.einsum("nhi,hij,nhj->n", delta, m, delta).mean())


@pytest.mark.parametrize("merge", ["mean", "query_aware"])
def test_kv_recon_and_attn_out_values_match_the_converted_model(model, stats, merge):
    converted = gqa.convert(copy.deepcopy(model), ASYM, merge=merge, stats=stats)
    kv = make_proxy("kv_recon", model, stats, merge=merge)
    out = make_proxy("attn_out", model, stats, merge=merge)
    for layer, lg in enumerate(ASYM.layers):
        for kind, groups in (("k", lg.k), ("v", lg.v)):
            expected = _brute_kv_error(model, converted, stats, layer, kind)
            assert sum(kv.group_error(layer, kind, g) for g in groups) == pytest.approx(
                expected, rel=1e-4
            )
        m_v = value_weights(get_adapter(model), layer, stats.layers[layer])
        expected_v = _brute_kv_error(model, converted, stats, layer, "v", weight_of=m_v)
        assert sum(out.group_error(layer, "v", g) for g in lg.v) == pytest.approx(
            expected_v, rel=1e-4
        )


def test_query_aware_is_never_worse_than_mean_on_its_objective(model, stats):
    aware = make_proxy("attn_out", model, stats, merge="query_aware")
    mean = make_proxy("attn_out", model, stats, merge="mean")
    for grouping in (ASYM, Grouping.neighbour(6, 2, 1), Grouping.neighbour(6, 2, 4)):
        assert aware.score(grouping) <= mean.score(grouping) * (1 + 1e-9) + 1e-9
    assert aware.score(Grouping.neighbour(6, 2, 1)) < mean.score(Grouping.neighbour(6, 2, 1))


def test_wse_is_the_frobenius_weight_error(model, stats):
    wse = make_proxy("wse", model, stats)
    a = get_adapter(model)
    w = a.head_slices(0, "k")[0].detach().double()[a.source_kv_index(0, "k")]
    group = (0, 2, 5)
    expected = float((w[list(group)] - w[list(group)].mean(0)).pow(2).sum())
    assert wse.group_error(0, "k", group) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_every_proxy_is_zero_on_the_source_layout_and_positive_when_merging(
    model, stats, name, smol_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))  # where proxies keep what they measure
    long_text = {}
    if PROXIES[name].uses_long_text:  # long_range: late-position loss of real long documents
        long_text = {"tokenizer": smol_tokenizer, "long_config": LONG}
    proxy = make_proxy(name, model, stats, **long_text)
    own = gqa.current_grouping(model)
    assert proxy.score(own) == pytest.approx(0.0, abs=1e-6)
    coarse = Grouping.neighbour(6, 2, 1)
    scores = proxy.layer_scores(coarse)
    assert len(scores) == 2 and all(s != 0 for s in scores)
    if not long_text:  # a measured loss change may fall: only the error proxies are never below 0
        assert all(s > 0 for s in scores)
    if proxy.decomposes:
        assert proxy.score(coarse) == pytest.approx(sum(scores))
    assert isinstance(proxy.cost, str) and proxy.cost


def test_local_attn_matches_converted_model_layer(model, stats):
    proxy = make_proxy("local_attn", model, stats)
    converted = gqa.convert(copy.deepcopy(model), ASYM)
    layer = 1
    x = stats.layers[layer].inputs
    a, b = get_adapter(model), get_adapter(converted)
    with torch.no_grad():
        ref, _ = a.attention(layer)(
            hidden_states=x, position_embeddings=a.position_embeddings(x), attention_mask=None
        )
        out, _ = b.attention(layer)(
            hidden_states=x, position_embeddings=b.position_embeddings(x), attention_mask=None
        )
    expected = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    assert proxy.layer_score(layer, ASYM.layers[layer]) == pytest.approx(expected, rel=1e-4)


def test_unknown_proxy(model, stats):
    with pytest.raises(ValueError, match="unknown proxy 'nope'"):
        make_proxy("nope", model, stats)


def test_query_aware_needs_statistics(model):
    with pytest.raises(ValueError, match="needs calibration statistics"):
        gqa.convert(copy.deepcopy(model), ASYM, merge="query_aware")


def test_rope_query_moment_matches_rotated_logits():
    """dk^T S~ dk equals the mean over distances < ROPE_WINDOW of (RoPE(q) . RoPE(dk))^2."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from objectives.sensitivity import ROPE_WINDOW, rope_query_moment

    model = tiny_model(num_heads=2, head_dim=8, rope_theta=50.0)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(50, 2, 8, generator=gen, dtype=torch.float64)  # 50 samples, 2 heads
    dk = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    moment = rope_query_moment(adapter, torch.einsum("nhi,nhj->hij", q, q).float() / 50).double()
    x = torch.zeros(1, ROPE_WINDOW + 1, 16)
    cos, sin = (t.double() for t in adapter.position_embeddings(x))
    t = ROPE_WINDOW  # query position; keys at t - delta
    total = torch.zeros(2, dtype=torch.float64)
    for delta in range(ROPE_WINDOW):
        s = t - delta
        qr, _ = apply_rotary_pos_emb(
            q[:, :, None, :], q[:, :, None, :], cos[:, t : t + 1], sin[:, t : t + 1]
        )
        _, kr = apply_rotary_pos_emb(
            dk[None, :, None, :], dk[None, :, None, :], cos[:, s : s + 1], sin[:, s : s + 1]
        )
        total += (qr[:, :, 0] * kr[:, :, 0]).sum(-1).pow(2).mean(0)
    expected = total / ROPE_WINDOW
    torch.testing.assert_close(
        torch.einsum("hi,hij,hj->h", dk, moment, dk), expected, rtol=1e-4, atol=1e-6
    )
