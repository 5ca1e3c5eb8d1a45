"""Points of the byte front and what follows from them alone, with no model and no storage.

A point is a model (the source, a stage-2 winner, the source with latent layers, or a layer mix of
them) with its cache: at 16 bits, quantized uniformly, or with bits allocated per layer. The families are small registered
classes, each saying which points it may choose from; `fitting`, `screened` and `choose` are pure
functions over points and their measured values. `search.kv_front` builds the points, measures
them and keeps the record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gqa.grouping import Grouping
from gqa.latent import LatentPlan
from gqa.precision import PrecisionPlan

SOURCE = "source"
MIX_PREFIX = "mix:"
LATENT_PREFIX = "latent:"
CACHES = ("16-bit", "uniform", "allocated")  # how a point's cache is stored
BYTES_TOLERANCE = 1e-9  # relative: a point of exactly the budget's bytes fits it


@dataclass(frozen=True)
class FrontModel:
    """The model of a point: its name, its grouping, its latent layers (gqa.latent), and for a
    layer mix which models gave its layers. `stage2` holds what stage 2 measured of the same
    model (the source, a winner)."""

    name: str  # "source", "<budget>kv:<strategy>", "latent:<digest>" or "mix:<digest>"
    grouping: Grouping
    layers: str = ""  # a layer mix: "18 source, 12 2kv:coarsen_source"
    stage2: Mapping[str, float] | None = field(default=None, compare=False, repr=False)
    latent: LatentPlan | None = None  # layers made latent, on top of the grouping

    @property
    def is_source(self) -> bool:
        return self.name == SOURCE

    @property
    def is_mix(self) -> bool:
        return self.name.startswith(MIX_PREFIX)


@dataclass
class Point:
    model: FrontModel
    plan: PrecisionPlan | None  # None: 16 bits
    kv_bytes: float
    cache: str  # one of CACHES
    proxy: float = 0.0  # the decomposed error estimate (grouping + quantization) that screens it

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise ValueError(f"cache {self.cache!r} is not one of {', '.join(CACHES)}")
        if (self.plan is None) != (self.cache == "16-bit"):
            wrong = "needs a" if self.plan is None else "has no"
            raise ValueError(f"a {self.cache} cache {wrong} precision plan")

    @property
    def key(self) -> str:
        """The point's identity in the storage: its model's name and its plan."""
        plan = None if self.plan is None else self.plan.to_dict()
        return json.dumps([self.model.name, plan], sort_keys=True)

    def label(self) -> str:
        if self.plan is None:
            return "16-bit"
        return self.plan.label() if self.cache == "uniform" else f"allocated {self.plan.label()}"


# -- families --------------------------------------------------------------------------------


class Family:
    """A family of the byte front: the points it may choose from."""

    name: str

    def admits(self, point: Point) -> bool:
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Register a family under its `name` (the order of registration is the report's order)."""
    if cls.name in FAMILIES:
        raise ValueError(f"family {cls.name!r} is already registered")
    FAMILIES[cls.name] = cls()
    return cls


@register_family
class Quantization(Family):
    """The source with uniform K/V bits and group size (or at 16 bits)."""

    name = "quantization"

    def admits(self, point: Point) -> bool:
        return point.model.is_source and point.cache != "allocated"


@register_family
class MixedPrecision(Family):
    """The source with per-layer K/V bits allocated under the budget (or at 16 bits)."""

    name = "mixed_precision"

    def admits(self, point: Point) -> bool:
        return point.model.is_source and point.cache != "uniform"


@register_family
class GroupingOnly(Family):
    """A converted model (or the source) at 16 bits: head grouping alone."""

    name = "grouping"

    def admits(self, point: Point) -> bool:
        return point.cache == "16-bit" and point.model.latent is None


@register_family
class Latent(Family):
    """The source with latent K/V ranks allocated per layer, at 16 bits: low rank alone (only
    where the config gives `latent_ranks`)."""

    name = "latent"

    def admits(self, point: Point) -> bool:
        return point.model.name.startswith(LATENT_PREFIX) and point.cache == "16-bit"


@register_family
class Joint(Family):
    """Everything: every point above, converted models with allocated bits, and layer mixes
    (with latent layers where the config gives `latent_ranks`)."""

    name = "joint"

    def admits(self, point: Point) -> bool:
        return True


# -- pure functions over points --------------------------------------------------------------


def fitting(points: Sequence[Point], fraction: float, source_bytes: float) -> list[Point]:
    """The points whose cache fits `fraction` of the source's 16-bit bytes per token."""
    limit = fraction * source_bytes * (1 + BYTES_TOLERANCE)
    return [p for p in points if p.kv_bytes <= limit]


def family_members(points: Sequence[Point]) -> dict[str, list[Point]]:
    """The points each registered family may choose from."""
    return {name: [p for p in points if f.admits(p)] for name, f in FAMILIES.items()}


def screened(
    points: Sequence[Point], budgets: Sequence[float], source_bytes: float, screen: int
) -> list[Point]:
    """The points worth measuring: per budget, family and full-precision window, the `screen`
    fitting points of least proxy error (every point when `screen` is 0). Windows are screened
    apart because the proxy sees a window on calibration sequences, where it covers a larger share
    of the tokens than at the context the bytes are counted at: across windows the proxy is not
    comparable, so validation chooses between them. The joint family's choice is then made over
    every measured point that fits, so it is never worse on validation than a single axis."""
    if not screen:
        return list(points)
    keep: set[str] = set()
    for fraction in budgets:
        for members in family_members(fitting(points, fraction, source_bytes)).values():
            by_window: dict[int, list[Point]] = {}
            for point in members:
                by_window.setdefault(point.plan.window if point.plan else 0, []).append(point)
            for group in by_window.values():
                keep.update(p.key for p in sorted(group, key=lambda p: p.proxy)[:screen])
    return [p for p in points if p.key in keep]


def choose(
    points: Sequence[Point],
    valid: Callable[[Point], float],
    budgets: Sequence[float],
    source_bytes: float,
) -> list[dict]:
    """Per budget and family, the fitting point of least validation value, as report rows."""
    rows = []
    for fraction in budgets:
        for family, members in family_members(fitting(points, fraction, source_bytes)).items():
            if not members:
                continue
            point = min(members, key=valid)
            rows.append(
                {
                    "budget_fraction": fraction,
                    "family": family,
                    "model": point.model.name,
                    "layers": point.model.layers,
                    "precision": point.label(),
                    "kv_bytes": point.kv_bytes,
                    "kv_fraction": point.kv_bytes / source_bytes,
                    "valid_ppl": valid(point),
                    "proxy": point.proxy,
                    "point": point,
                }
            )
    return rows
