"""Gemma 2: Gemma plus logit soft-capping, alternating sliding-window layers and query
pre-scaling (`query_pre_attn_scalar`). The module passes `softcap` and `sliding_window` to the
attention function; the grouped eager attention calls the family's own eager function, which
soft-caps, and the sliding window reaches it through the mask."""

from gqa.adapters.base import register_adapter
from gqa.adapters.gemma import GemmaAdapter


@register_adapter
class Gemma2Adapter(GemmaAdapter):
    model_types = ("gemma2",)
