"""`recoverable`: the error a layer grouping keeps *after* layer-wise recovery, in end-to-end units.

Layer-wise recovery fits each layer alone on the source's attention inputs, so what a layer keeps
after recovery depends only on that layer's grouping. For layer l under grouping g, with
e_l^before(g) and e_l^after(g) the layer's relative attention-output error on held-out
calibration sequences before and after a fit of the configured `layerwise` recovery:

  weighting = "layer" (default)   score_l(g) = w_l * e_l^after(g),
        w_l = fisher_l(g1) / e_l^before(g1), g1 = every head in one group: a per-layer factor
        that turns local attention error into end-to-end (gradient-weighted) error, the same for
        every grouping of the layer, so layers are comparable and candidates of one layer are
        ranked by what recovery leaves;
  weighting = "fisher_ratio"      score_l(g) = fisher_l(g) * e_l^after(g) / e_l^before(g);
  weighting = "none"              score_l(g) = e_l^after(g).

An exact layer (g equals the source) scores 0. The score decomposes over layers. Fits are stored
per (layer, grouping) in `LayerFitCache`, which stage-2 recovery reads too, so no layer grouping is
fitted twice and a promoted candidate's layer-wise recovery costs nothing new. (A recovery that fits
on the converted model's inputs, `inputs = "converted"`, is predicted by fits on the source's.)
`experiments/benchmarks/bench_recoverability.py` compares the weightings against post-recovery
perplexity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from gqa.grouping import LayerGrouping
from gqa.surgery import converted_attention
from objectives.calibration import CalibrationStats
from objectives.proxies.base import Proxy, make_proxy, register_proxy
from objectives.recovery import LayerFit, LayerFitCache, LayerwiseConfig, fit_layer, recovery_config
from objectives.recovery.layerwise import (
    check_stats,
    holdout_split,
    relative_error,
    source_outputs,
)

WEIGHTINGS = ("layer", "fisher_ratio", "none")


@register_proxy
class Recoverable(Proxy):
    name = "recoverable"
    cost = "one short layer-wise fit per new layer grouping (cached on disk), plus fisher"
    uses_recovery: ClassVar[bool] = True  # the study passes its layer-wise recovery config

    def __init__(
        self,
        model: nn.Module,
        stats: CalibrationStats,
        merge: str = "mean",
        recovery: LayerwiseConfig | Mapping[str, Any] | None = None,
        weighting: str = "layer",
    ):
        super().__init__(model, stats, merge)
        check_stats(stats, self.adapter.num_layers)
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"recoverable weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}"
            )
        # A layer's fit on the source's inputs: what it keeps depends on its grouping alone. With
        # `inputs = "converted"` recovery fits in order instead, so the proxy's fits are not its.
        config = recovery_config("layerwise", recovery)
        self.config: LayerwiseConfig = dataclasses.replace(config, inputs="source")
        self.mode = weighting
        self.fisher = make_proxy("fisher", model, stats, merge)
        self._layer_weights: dict[int, float] = {}
        self.cache = LayerFitCache(stats, merge, self.config) if self.config.cache else None
        self._fits: dict[tuple[int, LayerGrouping], LayerFit] = {}
        self._targets: dict[int, torch.Tensor] = {}
        self.fitted = 0  # fits computed by this proxy (not read from the cache)

    def fit(self, layer: int, grouping: LayerGrouping) -> LayerFit:
        """The layer's fit under `grouping`: from memory, the disk cache, or computed now."""
        key = (layer, grouping)
        fit = self._fits.get(key)
        if fit is None:
            fit = self.cache.get(layer, grouping) if self.cache else None
            if fit is None:
                fit = self._fit(layer, grouping)
                if self.cache:
                    self.cache.put(layer, grouping, fit)
            fit.weights, fit.history = {}, []  # keep only the errors in memory
            self._fits[key] = fit
        return fit

    def _fit(self, layer: int, grouping: LayerGrouping) -> LayerFit:
        inputs = self.stats.layers[layer].inputs
        module = converted_attention(self.adapter, layer, grouping, self.merge, self.stats)
        self.fitted += 1
        return fit_layer(module, self.adapter, inputs, self._target(layer), self.config, layer)

    def layer_weight(self, layer: int) -> float:
        """w_l: end-to-end (fisher) error per unit of local error, measured on the layer's
        coarsest grouping (every head in one group), where both are largest and best resolved."""
        if layer not in self._layer_weights:
            heads = (tuple(range(self.adapter.num_heads)),)
            coarsest = LayerGrouping(heads, heads)
            local = max(self.initial_error(layer, coarsest), 1e-30)
            self._layer_weights[layer] = self.fisher.layer_score(layer, coarsest) / local
        return self._layer_weights[layer]

    def initial_error(self, layer: int, grouping: LayerGrouping) -> float:
        """The layer's held-out error under `grouping` before any training: a fit's `initial`,
        read from a fit already made or measured without training one."""
        fit = self._fits.get((layer, grouping))
        if fit is None and self.cache:
            fit = self.cache.get(layer, grouping)
        if fit is not None:
            return fit.initial
        inputs = self.stats.layers[layer].inputs
        module = converted_attention(self.adapter, layer, grouping, self.merge, self.stats)
        _, held = holdout_split(inputs.shape[0], self.config.holdout)
        target = self._target(layer)
        return relative_error(
            module, self.adapter, inputs[held], target[held], self.config.batch_size
        )

    def _target(self, layer: int) -> torch.Tensor:
        if layer not in self._targets:
            self._targets[layer] = source_outputs(
                self.adapter, layer, self.stats.layers[layer].inputs, self.config.batch_size
            )
        return self._targets[layer]

    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        fit = self.fit(layer, grouping)
        if fit.initial <= self.config.exact_tol:
            return 0.0
        if self.mode == "none":
            return fit.final
        if self.mode == "fisher_ratio":
            return self.fisher.layer_score(layer, grouping) * fit.ratio
        return self.layer_weight(layer) * fit.final
