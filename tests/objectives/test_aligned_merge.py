"""The `aligned` merge: members rotated into a common frame, the frames folded into q and o."""

from __future__ import annotations

import copy

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from objectives.calibration import CalibrationConfig, calibrate
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=4, grad_seqs=2, sample_seqs=4, batch_size=2)
D = 8  # head_dim of the tiny models; RoPE pairs (i, i + 4)


def _random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return q.float()


def _rope_rotation(gen: torch.Generator) -> torch.Tensor:
    """A rotation in each RoPE frequency pair (dims i, i + 4): it commutes with RoPE."""
    r = torch.eye(D)
    for i, angle in enumerate(torch.rand(D // 2, generator=gen) * 6.28):
        c, s = angle.cos(), angle.sin()
        j = i + D // 2
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.fixture(scope="module")
def rotated_twins(smol_tokenizer, tmp_path_factory):
    """A source with 2 KV heads per layer (query heads 0-2 read the first, 3-5 the second) in
    which the second K head is the first in another RoPE-commuting frame and the second V head
    the first in another orthogonal frame: two heads that compute the same thing."""
    model = tiny_model(num_kv_heads=2, vocab_size=49152)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj, rotation in ((attn.k_proj, _rope_rotation), (attn.v_proj, _random_rotation)):
                proj.weight[D:] = rotation(gen) @ proj.weight[:D]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        stats = calibrate(model, smol_tokenizer, CONFIG, "twins", progress=False)
    return model, stats


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_heads_equal_up_to_rotation_merge_exactly(rotated_twins):
    model, stats = rotated_twins
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    one = Grouping.neighbour(6, 2, 1)  # both source KV heads into one
    source = _logits(model, ids)
    aligned = gqa.converted_copy(model, one, "aligned", stats)
    torch.testing.assert_close(_logits(aligned, ids), source, rtol=0, atol=1e-4)
    plain = gqa.converted_copy(model, one, "query_aware", stats)
    assert (_logits(plain, ids) - source).abs().max() > 1e-2  # without the frames it is lossy
    # the source is untouched (aligned changes q and o of the copy only)
    torch.testing.assert_close(_logits(model, ids), source, rtol=0, atol=0)


def test_identity_grouping_reproduces_the_source(rotated_twins):
    model, stats = rotated_twins
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    for grouping in (gqa.current_grouping(model), Grouping.identity(6, 2)):
        converted = gqa.convert(copy.deepcopy(model), grouping, "aligned", stats)
        torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_aligned_is_at_least_as_good_as_query_aware_on_a_random_model(smol_tokenizer, tmp_path):
    """On unrelated heads the frames can only help the layer output error of a merge."""
    from objectives.proxies import make_proxy

    model = tiny_model(num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path))
        stats = calibrate(model, smol_tokenizer, CONFIG, "random3", progress=False)
    grouping = Grouping.neighbour(6, 2, 1)
    errors = {
        merge: make_proxy("local_attn", model, stats, merge=merge).score(grouping)
        for merge in ("query_aware", "aligned")
    }
    assert errors["aligned"] < errors["query_aware"]


def test_aligned_refuses_per_head_norms(smol_tokenizer, tmp_path):
    model = tiny_model("qwen3", num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path))
        stats = calibrate(model, smol_tokenizer, CONFIG, "qwen3", progress=False)
    with pytest.raises(ValueError, match="cannot fold frames past qwen3's per-head q_norm, k_norm"):
        gqa.converted_copy(model, Grouping.neighbour(6, 2, 1), "aligned", stats)


def _aligned_error_by_hand(model, stats, proxy, layer: int, kind: str, group: tuple[int, ...]):
    """sum_h tr(M_h (W_h - R_h^T W_g) C (W_h - R_h^T W_g)^T) from the merge function itself:
    member h reads the merged head W_g through its frame R_h (folded into q or o)."""
    from gqa.merge import MergeContext, get_merge

    adapter = gqa.get_adapter(model)
    weights, _ = adapter.head_slices(layer, kind)
    members = weights[adapter.source_kv_index(layer, kind)[list(group)]].detach()
    ctx = MergeContext(layer, kind, group, adapter, stats)
    merged, _, frames = get_merge("aligned")(members, None, ctx)
    m = proxy.head_weights(layer, kind)[list(group)].double()
    gram = proxy.gram(layer, kind).double()
    diff = members.double() - frames.double().mT @ merged.double()
    return float(torch.einsum("hij,hjd,de,hie->", m, diff, gram, diff))


def test_fisher_proxy_scores_the_aligned_merge_exactly(smol_tokenizer, tmp_path):
    """The guide proxy under `aligned` equals the error of what the merge builds, frames
    included, and differs from the query-aware closed form."""
    from objectives.proxies import make_proxy

    model = tiny_model(num_kv_heads=3, vocab_size=49152)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path))
        stats = calibrate(model, smol_tokenizer, CONFIG, "random3", progress=False)
    aligned = make_proxy("fisher", model, stats, merge="aligned")
    plain = make_proxy("fisher", model, stats, merge="query_aware")
    for layer, kind, group in ((0, "k", (0, 2, 5)), (1, "v", (1, 2, 3, 4)), (1, "k", (0, 5))):
        expected = _aligned_error_by_hand(model, stats, aligned, layer, kind, group)
        got = aligned.group_error(layer, kind, group)
        # float64 on both sides except the merged head, which the merge returns in float32
        assert got == pytest.approx(expected, rel=1e-4)
        assert abs(got - plain.group_error(layer, kind, group)) > 1e-3 * got
    # a single head (a source KV head kept as it is) costs nothing
    assert aligned.score(gqa.current_grouping(model)) == pytest.approx(0, abs=1e-6)
    # groups scored in one batch (per size, chunked) equal groups scored one at a time
    groups = [(0, 1), (0, 3), (2, 4), (1, 3, 5), (0, 2, 4), (0, 1, 2, 3, 4, 5)]
    batch = make_proxy("fisher", model, stats, merge="aligned").table(1, "v").errors(groups)
    single = [make_proxy("fisher", model, stats, merge="aligned").table(1, "v")(g) for g in groups]
    assert batch == pytest.approx(single, rel=1e-9, abs=1e-12 * max(single))


def test_fisher_proxy_sees_heads_equal_up_to_rotation_as_free_under_aligned(rotated_twins):
    from objectives.proxies import make_proxy

    model, stats = rotated_twins
    one = Grouping.neighbour(6, 2, 1)
    aligned = make_proxy("fisher", model, stats, merge="aligned").score(one)
    plain = make_proxy("fisher", model, stats, merge="query_aware").score(one)
    assert aligned < 1e-6 * plain
