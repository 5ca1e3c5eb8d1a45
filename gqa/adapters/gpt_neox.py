"""GPT-NeoX (Pythia): an MHA source whose q/k/v are fused in `query_key_value` *per head* (rows
[h, (q|k|v), D]), partial RoPE on the first `rotary_ndims` dims of each head (rotate-half layout,
as `rope_inv_freq` assumes), biases, and a parallel residual (outside attention).

The stock module splits the fused output into equal q/k/v heads, so once K or V is regrouped the
fused projection becomes a `SplitQKV` and the module a `GroupedGPTNeoXAttention`: the same
forward, reading q, k and v from their own linears. A stock module's q/k/v rows are not
contiguous, so `projection(layer, which)` reads them as copies (writes to them are lost; only
`to_plain_gqa`, refused here, permutes a projection in place). `to_stock` interleaves them back;
stock GPT-NeoX has no GQA, so groupings save in headgroup's format.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from gqa.adapters.base import register_adapter
from gqa.adapters.fused import FusedQKVAdapter, linear_from


class GroupedGPTNeoXAttention(GPTNeoXAttention):
    """GPTNeoXAttention over a `SplitQKV`, so K and V may have their own head counts."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_size)
        qkv = self.query_key_value
        query, key, value = (
            proj(hidden_states).view(shape).transpose(1, 2) for proj in (qkv.q, qkv.k, qkv.v)
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        return self.dense(out.reshape(*input_shape, -1).contiguous()), weights


@register_adapter
class GPTNeoXAdapter(FusedQKVAdapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    rotary_path = "gpt_neox.rotary_emb"
    attention_attr = "attention"
    projection_names = {"o": "dense"}
    fused_attr = "query_key_value"
    stock_gqa = False

    def qkv_rows(self, module: nn.Module, which: str) -> torch.Tensor:
        d = self.head_dim
        fused = module.query_key_value.weight
        rows = torch.arange(fused.shape[0], device=fused.device).view(-1, 3, d)  # (H, q|k|v, D)
        return rows[:, "qkv".index(which)].reshape(-1)

    def record_sizes(self, module: nn.Module, sizes: tuple[int, int, int]) -> None:
        module.__class__ = GroupedGPTNeoXAttention  # it reads the sizes from SplitQKV itself

    def fuse(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Module:
        def per_head(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().view(self.num_heads, self.head_dim, -1)

        weight = torch.stack([per_head(p.weight) for p in (q, k, v)], 1).flatten(0, 2)
        bias = None
        if q.bias is not None:
            bias = torch.stack([per_head(p.bias) for p in (q, k, v)], 1).flatten()
        return linear_from(weight, bias)

    def to_stock(self, layer: int) -> None:
        super().to_stock(layer)
        self.attention(layer).__class__ = GPTNeoXAttention
