"""Modeling code that a saved asymmetric headgroup checkpoint carries (auto_map in config.json).

Stock transformers loads the folder with `trust_remote_code=True`, where headgroup is not
installed: this file and `headgroup_attention.py` (a copy of gqa/attention.py) import only torch
and transformers. The model is the stock causal LM named by BASE_ARCHITECTURE (written in when
the checkpoint is saved) whose K/V projections output only the group heads of the grouping in
`config.headgroup`, so the KV cache holds the grouped heads; the grouped attention functions map
them onto the query heads after the cache update.
"""

from __future__ import annotations

from types import SimpleNamespace

import transformers
from torch import nn

from .headgroup_attention import grouped_implementation, install_plan, register
from .headgroup_kv_quant import LayerQuantizer, QuantizedGenerationMixin

BASE_ARCHITECTURE = "LlamaForCausalLM"  # replaced by the source model's class when saved
CONFIG_KEY = "headgroup"
PRECISION_KEY = "headgroup_kv_precision"  # optional: per-layer K/V cache bits (gqa.precision)

register()
_Base = getattr(transformers, BASE_ARCHITECTURE)


class HeadgroupForCausalLM(QuantizedGenerationMixin, _Base):
    """`BASE_ARCHITECTURE` with grouped K/V projections (any group sizes, K and V apart) and, when
    the config has a precision plan, a quantized KV cache (simulated in forward passes without a
    past, real in `generate`)."""

    def __init__(self, config):
        super().__init__(config)
        for attn, groups in self._grouped_layers():
            for which in ("k", "v"):
                old = getattr(attn, f"{which}_proj")
                out_features = len(groups[which]) * attn.head_dim
                new = nn.Linear(old.in_features, out_features, bias=old.bias is not None)
                setattr(attn, f"{which}_proj", new.to(old.weight.dtype))
        if not any(p.is_meta for p in self.parameters()):  # from_config; from_pretrained: below
            self._install_plans()
        self.set_attn_implementation(grouped_implementation(config._attn_implementation))

    def _grouped_layers(self):
        layers = getattr(self.config, CONFIG_KEY)["layers"]
        modules = self.model.layers
        if len(layers) != len(modules):
            raise ValueError(f"grouping has {len(layers)} layers, the model {len(modules)}")
        return [(module.self_attn, groups) for module, groups in zip(modules, layers, strict=True)]

    def _install_plans(self) -> None:
        heads = self.config.num_attention_heads
        for attn, groups in self._grouped_layers():
            install_plan(attn, SimpleNamespace(k=groups["k"], v=groups["v"]), heads)
        precision = getattr(self.config, PRECISION_KEY, None)
        if precision is not None:
            group, window = precision["group_size"], precision["window"]
            for (attn, _), (k_bits, v_bits) in zip(
                self._grouped_layers(), precision["layers"], strict=True
            ):
                attn.hg_kv_quant = LayerQuantizer(k_bits, v_bits, group, window)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Weights are loaded onto modules built on the meta device; the plan's index buffers are
        # not weights, so they are made once the parameters are real.
        model = super().from_pretrained(*args, **kwargs)
        model._install_plans()
        # An attn_implementation asked for at loading ("eager", "sdpa") becomes its grouped twin.
        model.set_attn_implementation(grouped_implementation(model.config._attn_implementation))
        return model
