"""The byte front's pure part: which family may choose which point, fitting, screening, choosing."""

import pytest

from gqa.grouping import Grouping
from gqa.latent import LatentPlan
from gqa.precision import PrecisionPlan
from search.front_points import (
    FAMILIES,
    FrontModel,
    Point,
    choose,
    family_members,
    fitting,
    register_family,
    screened,
)

SOURCE = FrontModel("source", Grouping.identity(4, 2))
WINNER = FrontModel("2kv:greedy", Grouping.neighbour(4, 2, 2))
MIX = FrontModel("mix:0123abcd", Grouping.neighbour(4, 2, [4, 2]), layers="1 source, 1 2kv:greedy")
K4 = PrecisionPlan.uniform(2, 4, 4, 8)
LATENT = FrontModel(
    "latent:0123abcd", Grouping.identity(4, 2), latent=LatentPlan([(8, None), (None, 4)])
)
LATENT_MIX = FrontModel(
    "mix:4567abcd", Grouping.neighbour(4, 2, [4, 2]), latent=LatentPlan([(8, None), (None, None)])
)


def _points() -> list[Point]:
    return [
        Point(SOURCE, None, 100.0, "16-bit", proxy=0.0),
        Point(SOURCE, K4, 30.0, "uniform", proxy=5.0),
        Point(SOURCE, K4, 29.0, "allocated", proxy=4.0),
        Point(WINNER, None, 50.0, "16-bit", proxy=3.0),
        Point(WINNER, K4, 15.0, "allocated", proxy=6.0),
        Point(MIX, K4, 25.0, "allocated", proxy=2.0),
    ]


def test_each_family_admits_what_its_name_says():
    members = family_members(_points())
    assert list(members) == ["quantization", "mixed_precision", "grouping", "latent", "joint"]
    described = {f: {(p.model.name, p.cache) for p in ps} for f, ps in members.items()}
    assert described["quantization"] == {("source", "16-bit"), ("source", "uniform")}
    assert described["mixed_precision"] == {("source", "16-bit"), ("source", "allocated")}
    assert described["grouping"] == {("source", "16-bit"), ("2kv:greedy", "16-bit")}
    assert described["latent"] == set()  # no latent points: the family chooses nothing
    assert len(members["joint"]) == len(_points())


def test_latent_family_takes_latent_source_points_and_joint_takes_latent_mixes():
    latent = Point(LATENT, None, 60.0, "16-bit", proxy=1.0)
    mix = Point(LATENT_MIX, K4, 20.0, "allocated", proxy=7.0)
    members = family_members([*_points(), latent, mix])
    assert members["latent"] == [latent]  # not the mix with latent layers
    assert latent not in members["grouping"] and mix in members["joint"]


def test_fitting_keeps_a_point_of_exactly_the_budget():
    fits = fitting(_points(), 0.3, 100.0)
    assert sorted(p.kv_bytes for p in fits) == [15.0, 25.0, 29.0, 30.0]
    assert [p.kv_bytes for p in fitting(_points(), 0.1, 100.0)] == []


def test_screening_keeps_the_least_proxy_point_per_budget_and_family():
    kept = screened(_points(), [1.0, 0.3], 100.0, screen=1)
    # 100%: source 16-bit (quantization, mixed, grouping, joint: proxy 0)
    # 30%: quantization -> uniform (5.0), mixed -> allocated (4.0), joint -> the mix (2.0)
    expected = {
        ("source", "16-bit"),
        ("source", "uniform"),
        ("source", "allocated"),
        (MIX.name, "allocated"),
    }
    assert {(p.model.name, p.cache) for p in kept} == expected
    assert screened(_points(), [1.0, 0.3], 100.0, screen=0) == _points()


def test_screening_keeps_the_least_proxy_point_of_each_window_apart():
    """A windowed plan's proxy is not comparable with an unwindowed one's: a windowed mix of the
    least proxy error does not push the best unwindowed one out; validation decides."""
    windowed = PrecisionPlan.uniform(2, 4, 4, 8, window=16)
    extra = [
        Point(MIX, windowed, 24.0, "allocated", proxy=1.0),
        Point(SOURCE, windowed, 28.0, "allocated", proxy=0.5),
    ]
    kept = screened([*_points(), *extra], [0.3], 100.0, screen=1)
    # 30%: quantization -> the uniform point; mixed -> the source's allocation with the window
    # (0.5) and, apart, without it (4.0); joint -> the windowed source allocation (0.5) and,
    # apart, the unwindowed mix (2.0). Screened together, the windowed points alone would stay.
    assert {(p.model.name, p.cache, p.plan.window) for p in kept} == {
        ("source", "uniform", 0),
        ("source", "allocated", 0),
        ("source", "allocated", 16),
        (MIX.name, "allocated", 0),
    }


def test_choose_takes_the_least_validation_value_and_joint_is_never_worse():
    valid = {"source": 10.0, "2kv:greedy": 12.0, "mix:0123abcd": 9.5}

    def value(p: Point) -> float:
        return valid[p.model.name] + (0.0 if p.plan is None else 1.0)

    rows = choose(_points(), value, [1.0, 0.3], 100.0)
    by = {(r["budget_fraction"], r["family"]): r for r in rows}
    assert by[1.0, "joint"]["model"] == "source" and by[1.0, "joint"]["precision"] == "16-bit"
    assert (0.3, "grouping") not in by  # no 16-bit model fits 30%
    assert by[0.3, "joint"]["valid_ppl"] == min(
        r["valid_ppl"] for r in rows if r["budget_fraction"] == 0.3
    )
    assert by[0.3, "mixed_precision"]["precision"].startswith("allocated")
    mix = by[0.3, "joint"]  # 10.5: better than the source's quantized points (11)
    assert mix["model"] == MIX.name and mix["layers"] == "1 source, 1 2kv:greedy"
    assert mix["kv_fraction"] == pytest.approx(0.25) and mix["point"].cache == "allocated"
    assert {r["family"] for r in rows if r["budget_fraction"] == 1.0} == set(FAMILIES) - {"latent"}


def test_a_point_says_what_is_wrong_with_its_cache():
    with pytest.raises(ValueError, match="cache 'int4' is not one of 16-bit, uniform, allocated"):
        Point(SOURCE, K4, 30.0, "int4")
    with pytest.raises(ValueError, match="a uniform cache needs a precision plan"):
        Point(SOURCE, None, 30.0, "uniform")
    with pytest.raises(ValueError, match="a 16-bit cache has no precision plan"):
        Point(SOURCE, K4, 30.0, "16-bit")


def test_a_family_registers_once():
    class Again:
        name = "joint"

    with pytest.raises(ValueError, match="family 'joint' is already registered"):
        register_family(Again)
