"""Exact (expensive) proxies that run the converted model:

local_attn  relative error ||y - y_src||^2 / ||y_src||^2 of each converted attention layer's
            output on the sampled calibration sequences (one attention-layer forward per new
            layer grouping, memoised)
logit_kl    KL(source || converted) of next-token distributions on the sampled calibration
            sequences (a full forward per candidate). Its per-layer breakdown converts one
            layer at a time; `score` converts all layers together (it does not decompose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqa.grouping import Grouping, LayerGrouping
from gqa.surgery import converted_attention, converted_copy, current_grouping
from objectives.calibration import CalibrationStats
from objectives.proxies.base import Proxy, register_proxy


@register_proxy
class LocalAttentionError(Proxy):
    name = "local_attn"
    cost = "one attention-layer forward on the sampled sequences per new layer grouping"

    def __init__(self, model: nn.Module, stats: CalibrationStats, merge: str = "mean"):
        super().__init__(model, stats, merge)
        self._reference: dict[int, torch.Tensor] = {}
        self._cache: dict[tuple[int, LayerGrouping], float] = {}

    @torch.no_grad()
    def _run(self, module: nn.Module, layer: int) -> torch.Tensor:
        x = self.stats.layers[layer].inputs.to(next(module.parameters()).device)
        x = x.to(next(module.parameters()).dtype)
        return self.adapter.attend(module, x).float()

    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        key = (layer, grouping)
        if key not in self._cache:
            if layer not in self._reference:
                self._reference[layer] = self._run(self.adapter.attention(layer), layer)
            module = converted_attention(self.adapter, layer, grouping, self.merge, self.stats)
            ref = self._reference[layer]
            err = (self._run(module, layer) - ref).pow(2).sum() / ref.pow(2).sum()
            self._cache[key] = float(err)
        return self._cache[key]


@register_proxy
class LogitKL(Proxy):
    name = "logit_kl"
    cost = "a deep copy and a full forward of the model per candidate"
    decomposes = False

    def __init__(self, model: nn.Module, stats: CalibrationStats, merge: str = "mean"):
        super().__init__(model, stats, merge)
        self._source_logp = self._log_probs(model)
        self._source_grouping = current_grouping(model)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module) -> torch.Tensor:
        ids = self.stats.token_ids.to(next(model.parameters()).device)
        return F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)

    @torch.no_grad()
    def kl(self, grouping: Grouping) -> float:
        converted = converted_copy(self.model, grouping, self.merge, self.stats, own=())
        logp = self._log_probs(converted)
        p = self._source_logp.exp()
        return float((p * (self._source_logp - logp)).sum(-1).mean())

    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        layers = list(self._source_grouping.layers)
        layers[layer] = grouping
        return self.kl(Grouping(self._source_grouping.num_heads, tuple(layers)))

    def score(self, grouping: Grouping) -> float:
        grouping.check_model(self.adapter.num_layers, self.adapter.num_heads)
        return self.kl(grouping)
