"""What each converted layer costs at long range, measured one layer at a time.

Short-window statistics cannot see the heads that retrieve from far back (retrieval heads,
arXiv 2404.15574; DuoAttention; RazorAttention): merging them leaves a 256-token window almost
unchanged and breaks recall at 2k tokens. So the cost is measured where it shows: for each layer
l, the base model (the source) runs on held-out long documents with its layer-l attention taken
from the donor (a converted model: its grouping, merge and recovery, with any cache precision),
and the cost is

    cost_l = NLL_late(base with donor's layer l) - NLL_late(base)        (nats per token)

over the positions of the last bucket of LongContextConfig (by default 1024..2047). One forward
of the long windows per layer: L forwards in all. Layers are swapped in place (the two models'
attention modules trade places and are put back), which needs both to run headgroup's grouped
attention (gqa.converted_copy of the source is the exact base).

To weigh these costs against a short-window proxy's errors (the byte front's joint allocation,
search.kv_front with `layer_costs = "long_range"`), `precision_rises` measures the same late-bucket
NLL rise for whole-model cache precision plans, and `nats_per_unit` fits how many nats at long
range one unit of the proxy is worth (least squares through the origin over those plans).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import get_adapter
from gqa.precision import PrecisionPlan, precision_applied
from objectives.long_context import LongContextConfig, late_window_nlls, long_windows


@dataclass
class LongRangeCosts:
    """Per layer, the late-bucket NLL the donor's layer adds to the base; `base_nll` is the
    base's own late-bucket NLL, `whole` what the donor itself (every layer) adds (None: not
    measured)."""

    costs: list[float]
    base_nll: float
    whole: float | None = None

    def most_costly(self, k: int) -> list[int]:
        """The k layers of highest cost, highest first."""
        return sorted(range(len(self.costs)), key=lambda i: -self.costs[i])[:k]

    def compounding(self) -> float:
        """How much the whole donor costs against the sum of its layers' costs (each read as at
        least 0): the single-layer costs times this add up to the measured whole. 1 where
        nothing is known (no whole, or no layer costs anything)."""
        total = sum(max(c, 0.0) for c in self.costs)
        return self.whole / total if self.whole is not None and total > 0 else 1.0


@contextmanager
def attention_replaced(model: nn.Module, layer: int, module: nn.Module) -> Iterator[nn.Module]:
    """`model` with its attention of `layer` replaced by `module`; restored on exit."""
    adapter = get_adapter(model)
    owner, attr = adapter.layers()[layer], adapter.attention_attr
    original = getattr(owner, attr)
    setattr(owner, attr, module)
    try:
        yield model
    finally:
        setattr(owner, attr, original)


@contextmanager
def layer_swapped(base: nn.Module, donor: nn.Module, layer: int) -> Iterator[nn.Module]:
    """`base` with its attention of `layer` replaced by the donor's (the donor gets the base's
    meanwhile); both are restored on exit."""
    mine, theirs = get_adapter(base).attention(layer), get_adapter(donor).attention(layer)
    with attention_replaced(base, layer, theirs), attention_replaced(donor, layer, mine):
        yield base


def late_nll(model: nn.Module, windows, config: LongContextConfig) -> float:
    """Mean NLL of the targets at positions >= the last bucket edge."""
    return float(late_window_nlls(model, windows, config).mean())


def long_range_costs(
    base: nn.Module,
    donor: nn.Module,
    tokenizer,
    config: LongContextConfig | None = None,
    subset: str = "valid",
    progress: bool = True,
) -> LongRangeCosts:
    """Per-layer long-range cost of the donor's layers (see the module docstring), and the
    whole donor's, on the long_ppl windows of `subset` (selection reads "valid")."""
    config = config or LongContextConfig()
    layers = get_adapter(base).num_layers
    if get_adapter(donor).num_layers != layers:
        raise ValueError("base and donor have different numbers of layers")
    windows = long_windows(tokenizer, subset, config.seq_len, config.ppl_windows)
    base_nll = late_nll(base, windows, config)
    costs = []
    for layer in tqdm(range(layers), desc="long-range cost per layer", disable=not progress):
        with layer_swapped(base, donor, layer):
            costs.append(late_nll(base, windows, config) - base_nll)
    return LongRangeCosts(costs, base_nll, late_nll(donor, windows, config) - base_nll)


def precision_rises(
    model: nn.Module,
    tokenizer,
    plans: Sequence[PrecisionPlan],
    config: LongContextConfig | None = None,
    subset: str = "valid",
    progress: bool = True,
) -> list[float]:
    """Per plan, the late-bucket NLL (nats per token) that `model`'s cache at that precision adds
    to its 16-bit cache, on the long_ppl windows of `subset`: one forward per plan."""
    config = config or LongContextConfig()
    windows = long_windows(tokenizer, subset, config.seq_len, config.ppl_windows)
    base = late_nll(model, windows, config)
    rises = []
    for plan in tqdm(plans, desc="long-range cost per precision", disable=not progress):
        with precision_applied(model, plan) as quantized:
            rises.append(late_nll(quantized, windows, config) - base)
    return rises


def nats_per_unit(errors: Sequence[float], rises: Sequence[float]) -> float:
    """The least-squares slope through the origin of measured long-range rises (nats per late
    token) on the proxy errors of the same settings: what one unit of the proxy is worth at long
    range. A ValueError when the pairs cannot give a positive slope."""
    if len(errors) != len(rises) or not errors:
        raise ValueError("nats_per_unit needs one rise per proxy error, and at least one")
    norm = sum(e * e for e in errors)
    slope = sum(e * r for e, r in zip(errors, rises, strict=True)) / norm if norm > 0 else 0.0
    if not slope > 0:
        raise ValueError(
            f"the measured long-range rises {[round(r, 4) for r in rises]} do not grow with the "
            f"proxy errors {[round(e, 4) for e in errors]}: no positive nats per proxy unit"
        )
    return slope
