"""OPT: an MHA source with biased q/k/v/out_proj under model.decoder.layers[i].self_attn, learned
positions (added to the embeddings, outside attention) and no RoPE. The module scales q by
1/sqrt(D) before attention (its `scaling`, which the proxies read) and calls the attention
function with scale 1.

Stock OPTAttention reshapes K and V with the *query* head count, so once K or V is regrouped the
module becomes a `GroupedOPTAttention`: the same forward, with each head count inferred by
`view`. `to_stock` turns it back; stock OPT has no GQA, so groupings save in headgroup's format
and `expand_to_mha` exports to stock OPT.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention, eager_attention_forward

from gqa.adapters.base import ModelAdapter, register_adapter


class GroupedOPTAttention(OPTAttention):
    """OPTAttention whose K and V may have their own head counts."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, tgt_len, _ = hidden_states.size()
        shape = (bsz, tgt_len, -1, self.head_dim)
        query = (self.q_proj(hidden_states) * self.scaling).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )
        return self.out_proj(out.reshape(bsz, tgt_len, -1).contiguous()), weights


@register_adapter
class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    rotary_path = None
    projection_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    stock_gqa = False

    def set_module_projection(self, module: nn.Module, which: str, linear: nn.Linear) -> None:
        super().set_module_projection(module, which, linear)
        if which in "kv":
            module.__class__ = GroupedOPTAttention

    def to_stock(self, layer: int) -> None:
        self.attention(layer).__class__ = OPTAttention
