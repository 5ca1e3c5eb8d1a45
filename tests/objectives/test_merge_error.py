"""Closed-form merge errors against brute force; the query-aware merge is the minimiser."""

import itertools

import pytest
import torch

from objectives.merge_error import MergeErrorTable, merge_weighted


def random_psd(n, dim, gen, diagonal=False):
    a = torch.randn(n, dim, dim, generator=gen, dtype=torch.float64)
    m = a @ a.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=torch.float64)
    return torch.diag_embed(m.diagonal(dim1=1, dim2=2)) if diagonal else m


def brute_error(w, source, c, m, group, merged):
    total = 0.0
    for h in group:
        delta = w[source[h]] - merged
        total += float(torch.trace(m[h] @ delta @ c @ delta.T))
    return total


@pytest.fixture()
def setup():
    gen = torch.Generator().manual_seed(0)
    heads, n_src, dim, hidden = 6, 3, 4, 10
    w = torch.randn(n_src, dim, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(200, hidden, generator=gen, dtype=torch.float64)
    c = x.T @ x / 200
    source = torch.tensor([0, 0, 1, 1, 2, 2])
    return w, source, c, gen, heads, dim


@pytest.mark.parametrize("diagonal", [False, True])
def test_mean_and_query_aware_match_brute_force(setup, diagonal):
    w, source, c, gen, heads, dim = setup
    m = random_psd(heads, dim, gen, diagonal)
    other = random_psd(heads, dim, gen, diagonal)
    mean = MergeErrorTable(w, source, c, m)
    aware = MergeErrorTable(w, source, c, m, merge_weights=m)
    cross = MergeErrorTable(w, source, c, m, merge_weights=other)  # merge weighted by N != M
    for size in (1, 2, 3, 6):
        for group in itertools.combinations(range(heads), size):
            members = w[source[list(group)]]
            expected_mean = brute_error(w, source, c, m, group, members.mean(0))
            expected_aware = brute_error(
                w, source, c, m, group, merge_weighted(members, m[list(group)])
            )
            assert mean(group) == pytest.approx(expected_mean, rel=1e-8, abs=1e-9)
            assert aware(group) == pytest.approx(
                expected_aware, rel=1e-6, abs=1e-8 * float(aware.diag.sum())
            )
            expected_cross = brute_error(
                w, source, c, m, group, merge_weighted(members, other[list(group)])
            )
            assert cross(group) == pytest.approx(
                expected_cross, rel=1e-6, abs=1e-8 * float(aware.diag.sum())
            )
            assert aware(group) <= mean(group) + 1e-9
            assert aware(group) <= cross(group) + 1e-9


def test_query_aware_merge_is_the_minimiser(setup):
    w, source, c, gen, heads, dim = setup
    m = random_psd(heads, dim, gen)
    group = (0, 2, 3, 5)
    best = merge_weighted(w[source[list(group)]], m[list(group)])
    base = brute_error(w, source, c, m, group, best)
    for _ in range(20):
        nudged = best + 1e-3 * torch.randn(best.shape, generator=gen, dtype=torch.float64)
        assert brute_error(w, source, c, m, group, nudged) > base


def test_heads_reading_one_source_head_merge_for_free(setup):
    w, source, c, gen, heads, dim = setup
    table = MergeErrorTable(w, source, c, random_psd(heads, dim, gen))
    assert table((0, 1)) == pytest.approx(0.0, abs=1e-9)
    assert table((0, 2)) > 0


@pytest.mark.parametrize("weighting", ["proportional", "general"])
def test_groups_near_a_partition_score_as_summed_directly(weighting):
    """Greedy's incremental path (a group one move or swap from the current partition, built
    from row sums) gives the direct block sums' errors, for both table layouts."""
    gen = torch.Generator().manual_seed(1)
    heads, dim, hidden = 10, 4, 12
    w = torch.randn(heads, dim, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(300, hidden, generator=gen, dtype=torch.float64)
    c, source = x.T @ x / 300, torch.arange(heads)
    n = random_psd(heads, dim, gen)
    m = 2.5 * n if weighting == "proportional" else random_psd(heads, dim, gen)
    partition = [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    groups = set()
    for p, q in itertools.permutations(partition, 2):
        for a in p:
            groups.add(tuple(sorted(set(p) - {a})))  # move out
            groups.add(tuple(sorted(set(q) | {a})))  # move in
            for b in q:
                groups.add(tuple(sorted(set(p) - {a} | {b})))  # swap
    groups = sorted(groups) + [(0, 5, 6, 7), (1, 2, 8, 9)]  # two steps away: summed directly
    direct = MergeErrorTable(w, source, c, m, n)
    near = MergeErrorTable(w, source, c, m, n)
    assert (near.s is None) == (weighting == "proportional")
    expected = direct.errors(groups)
    got = near.errors(groups, near=partition)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == near.errors(groups)  # memoised
