"""Qwen3-MoE: the experts are in the MLP; its attention is Qwen3's (per-head q/k RMSNorm)."""

from gqa.adapters.base import register_adapter
from gqa.adapters.qwen3 import Qwen3Adapter


@register_adapter
class Qwen3MoeAdapter(Qwen3Adapter):
    model_types = ("qwen3_moe",)
