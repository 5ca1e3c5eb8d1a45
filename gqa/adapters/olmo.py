"""OLMo (v1): the LLaMA layout with optional clipping of the q/k/v projections (`clip_qkv`).

The clip is elementwise on each projection's output, so the identity grouping is exact; a merged
K/V head is clipped after the merge (clip of the mean, not mean of the clips), one more
approximation of the merge that the proxies, which measure the unclipped projections, ignore.
"""

from gqa.adapters.base import register_adapter
from gqa.adapters.llama import LlamaAdapter


@register_adapter
class OlmoAdapter(LlamaAdapter):
    model_types = ("olmo",)
