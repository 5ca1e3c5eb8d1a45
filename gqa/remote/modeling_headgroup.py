"""Modeling code that a saved asymmetric headgroup checkpoint carries (auto_map in config.json).

Stock transformers loads the folder with `trust_remote_code=True`, where headgroup is not
installed: this file, `headgroup_attention.py`, `headgroup_kv_quant.py` and `headgroup_latent.py`
(copies of gqa/attention.py, gqa/kv_quant.py and gqa/latent.py) and the family's `hg_adapter_*.py` (copies of headgroup's
adapters) import only torch and transformers. The model is the stock causal LM named by
BASE_ARCHITECTURE (written in when the checkpoint is saved, as is the adapter import) whose K/V
projections output only the group heads of the grouping in `config.headgroup`, laid out by the
family's adapter, so the KV cache holds the grouped heads; the grouped attention functions map
them onto the query heads after the cache update. Layers named in `config.headgroup_latent` cache
low-rank latents instead (gqa.latent).
"""

from __future__ import annotations

from types import SimpleNamespace

import transformers

try:  # transformers 5: checkpoint keys renamed at load (GPT-NeoX's embed_out -> lm_head)
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
except ImportError:  # older releases rename nothing at load
    get_checkpoint_conversion_mapping = register_checkpoint_conversion_mapping = None

from .headgroup_attention import grouped_implementation, install_plan, register
from .headgroup_kv_quant import LayerQuantizer, QuantizedGenerationMixin
from .headgroup_latent import CONFIG_KEY as LATENT_KEY
from .headgroup_latent import LatentPlan, layout_module
from .hg_adapter_llama import LlamaAdapter as Adapter

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
        adapter = Adapter(self)
        for layer, groups in enumerate(self._layer_groups(adapter)):
            adapter.layout_layer(layer, groups["k"], groups["v"])
        latent = getattr(config, LATENT_KEY, None)
        if latent is not None:  # latent layers: their shapes now, their index buffers below
            rotary = adapter._get(adapter.rotary_path)
            for layer, ranks in enumerate(LatentPlan.from_dict(latent).layers):
                if ranks.is_latent:
                    layout_module(adapter.attention(layer), ranks, adapter.num_heads, rotary)
        if not any(p.is_meta for p in self.parameters()):  # from_config; from_pretrained: below
            self._install_plans()
        self.set_attn_implementation(grouped_implementation(config._attn_implementation))

    def _layer_groups(self, adapter) -> list[dict]:
        layers = getattr(self.config, CONFIG_KEY)["layers"]
        if len(layers) != adapter.num_layers:
            raise ValueError(f"grouping has {len(layers)} layers, the model {adapter.num_layers}")
        return layers

    def _install_plans(self) -> None:
        adapter = Adapter(self)
        for layer, groups in enumerate(self._layer_groups(adapter)):
            plan = SimpleNamespace(k=groups["k"], v=groups["v"])
            install_plan(adapter.attention(layer), plan, adapter.num_heads)
        precision = getattr(self.config, PRECISION_KEY, None)
        if precision is not None:
            group, window = precision["group_size"], precision["window"]
            for layer, (k_bits, v_bits) in enumerate(precision["layers"]):
                quantizer = LayerQuantizer(k_bits, v_bits, group, window)
                adapter.attention(layer).hg_kv_quant = quantizer

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        _adopt_key_renames(cls)
        # Weights are loaded onto modules built on the meta device; the plan's index buffers are
        # not weights, so they are made once the parameters are real.
        model = super().from_pretrained(*args, **kwargs)
        model._install_plans()
        # An attn_implementation asked for at loading ("eager", "sdpa") becomes its grouped twin.
        model.set_attn_implementation(grouped_implementation(model.config._attn_implementation))
        return model


def _adopt_key_renames(cls: type) -> None:
    """transformers renames checkpoint keys by class name or model_type (GPT-NeoX's `embed_out`
    is its `lm_head`) but skips remote-code classes whose name is not registered: register the
    base's renames under this class's name, at each load, as carried families share the name."""
    if get_checkpoint_conversion_mapping is None:
        return
    mapping = get_checkpoint_conversion_mapping(BASE_ARCHITECTURE)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(cls.config_class.model_type) or []
    register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)
