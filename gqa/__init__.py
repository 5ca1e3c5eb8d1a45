"""headgroup.gqa: the grouping type and model surgery (MHA/GQA -> asymmetric GQA)."""

from gqa import attention as _attention  # noqa: F401  (registers the grouped attention functions)
from gqa.adapters import ModelAdapter, UnsupportedModelError, get_adapter, register_adapter
from gqa.checkpoint import load, save
from gqa.grouping import Grouping, GroupingError, LayerGrouping
from gqa.kv_quant import cache_keyword, output_cache
from gqa.latent import LatentError, LatentLayer, LatentPlan
from gqa.latent_model import (
    apply_latent,
    cache_bytes,
    cache_bytes_per_token,
    choose_rope_pairs,
    model_latent,
)
from gqa.merge import MERGES, MergeContext, register_merge
from gqa.precision import (
    LayerPrecision,
    PrecisionError,
    PrecisionPlan,
    apply_precision,
    model_precision,
    precision_applied,
    quantized_cache,
)
from gqa.surgery import (
    convert,
    converted_copy,
    current_grouping,
    expand_to_mha,
    model_grouping,
    to_plain_gqa,
)

__all__ = [
    "LatentError",
    "LatentLayer",
    "LatentPlan",
    "apply_latent",
    "cache_bytes",
    "cache_bytes_per_token",
    "choose_rope_pairs",
    "model_latent",
    "LayerPrecision",
    "PrecisionError",
    "PrecisionPlan",
    "apply_precision",
    "model_precision",
    "precision_applied",
    "quantized_cache",
    "cache_keyword",
    "output_cache",
    "MERGES",
    "Grouping",
    "GroupingError",
    "LayerGrouping",
    "MergeContext",
    "ModelAdapter",
    "UnsupportedModelError",
    "convert",
    "converted_copy",
    "current_grouping",
    "expand_to_mha",
    "get_adapter",
    "load",
    "model_grouping",
    "register_adapter",
    "register_merge",
    "save",
    "to_plain_gqa",
]
