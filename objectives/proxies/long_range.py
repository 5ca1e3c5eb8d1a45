"""`long_range`: what a layer grouping costs at long range, measured (objectives.long_range).

Every closed-form proxy reads calibration statistics, which see distances no longer than the
calibration sequences, and none of them ranks layers by what merging costs late in a long
document (docs/long_context.md). This proxy measures it: for layer l under grouping g, the source
runs on the held-out long documents of `subset` with only layer l's attention converted to g
(the study's merge, reading the calibration statistics), and

    score_l(g) = NLL_late(source with layer l under g) - NLL_late(source)    (nats per token)

over the last bucket of the LongContextConfig (positions 1024..2047 by default). An exact layer
(every group within one source KV group: the source's grouping or a split of it) scores 0 without
a forward; a score may be slightly negative. The score decomposes
over layers: it is the sum of single-layer costs, which compound in a model that converts many
layers (so it ranks, it does not predict the full model's loss).

Cost: one forward of `ppl_windows` long documents per new layer grouping, memoised, and kept on
disk under $HEADGROUP_CACHE/long_range (keyed by the calibration statistics, the merge and the
documents), so a stopped study measures nothing twice. Meant as a
re-ranker (`[search] rank_proxy = "long_range"`): `coarsen_source` then chooses, per layer,
which source KV heads to merge by their long-range cost, so that the heads that retrieve from
far back (retrieval heads) stay whole. As the guide proxy it scores whole layers only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from gqa.assets import cache_dir
from gqa.grouping import LayerGrouping, write_text_atomic
from gqa.surgery import converted_attention, converted_copy, current_grouping
from objectives.calibration import CalibrationStats
from objectives.long_context import LongContextConfig, long_windows
from objectives.long_range import attention_replaced, late_nll
from objectives.proxies.base import Proxy, register_proxy
from objectives.recovery.layerwise import stats_fingerprint


@register_proxy
class LongRange(Proxy):
    name = "long_range"
    cost = "one forward of the long validation documents per new layer grouping, memoised"
    uses_long_text: ClassVar[bool] = True  # the study passes its tokenizer and [long_context]

    def __init__(
        self,
        model: nn.Module,
        stats: CalibrationStats,
        merge: str = "mean",
        *,
        tokenizer,
        long_config: LongContextConfig,
        subset: str = "valid",
        root: Path | None = None,
    ):
        super().__init__(model, stats, merge)
        self.source_grouping = current_grouping(model)
        self.base = converted_copy(model, self.source_grouping)  # headgroup's attention, exact
        self.base.eval()
        self.long_config = long_config
        self.windows = long_windows(tokenizer, subset, long_config.seq_len, long_config.ppl_windows)
        self._base_nll: float | None = None
        self._layers: dict[tuple[int, LayerGrouping], float] = {}
        self.forwards = 0  # long forwards run (the base's included)
        self.folder = None  # the disk cache (none without statistics to key it by)
        if stats is not None:
            key = {
                "stats": stats_fingerprint(stats),
                "merge": merge,
                "last_bucket": long_config.buckets[-1] if long_config.buckets else 0,
                "windows": hashlib.sha1(self.windows.numpy().tobytes()).hexdigest(),
            }
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            self.folder = (root or cache_dir() / "long_range") / digest

    @property
    def base_nll(self) -> float:
        """The source's own late-bucket NLL on the documents."""
        if self._base_nll is None:
            self._base_nll = self._stored("base", self._late_nll)
        return self._base_nll

    def _late_nll(self) -> float:
        self.forwards += 1
        with torch.no_grad():
            return late_nll(self.base, self.windows, self.long_config)

    def _stored(self, name: str, compute) -> float:
        """`compute()`, read from the disk cache when an earlier run stored it (and stored)."""
        path = None if self.folder is None else self.folder / f"{name}.json"
        if path is not None and path.is_file():
            return float(json.loads(path.read_text())["nll"])
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"nll": value}))
        return value

    def is_exact(self, layer: int, grouping: LayerGrouping) -> bool:
        """Whether every group lies within one source KV group (K and V): then each group's heads
        share one source K/V head and the layer computes exactly what the source's does."""
        source = self.source_grouping.layers[layer]
        return all(
            any(set(group) <= set(whole) for whole in wholes)
            for groups, wholes in ((grouping.k, source.k), (grouping.v, source.v))
            for group in groups
        )

    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        if self.is_exact(layer, grouping):
            return 0.0
        key = (layer, grouping)
        if key not in self._layers:
            name = hashlib.sha1(json.dumps([grouping.k, grouping.v]).encode()).hexdigest()[:16]
            nll = self._stored(f"{layer:03d}-{name}", lambda: self._converted_nll(layer, grouping))
            self._layers[key] = nll - self.base_nll
        return self._layers[key]

    def _converted_nll(self, layer: int, grouping: LayerGrouping) -> float:
        module = converted_attention(self.adapter, layer, grouping, self.merge, self.stats)
        with attention_replaced(self.base, layer, module):
            return self._late_nll()
