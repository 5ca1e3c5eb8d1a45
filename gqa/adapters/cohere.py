"""Cohere (Command-R): the LLaMA layout with optional LayerNorms on each q and k head
(`use_qk_norm`: a (heads, D) gain, one row per head; see head_norms) and interleaved RoPE
(dims 2i and 2i + 1 form a pair), which the RoPE-aware key weighting cannot express (see base).
The parallel attention/MLP block and `logit_scale` are outside attention."""

import torch
from torch import nn

from gqa.adapters.base import register_adapter
from gqa.adapters.head_norms import PerHeadNormAdapter


@register_adapter
class CohereAdapter(PerHeadNormAdapter):
    model_types = ("cohere",)
    q_norm_attr = "q_norm"
    k_norm_attr = "k_norm"
    rope_interleaved = True

    def gains(self, norm: nn.Module) -> torch.Tensor:
        return norm.weight

    def query_gains(self, norm: nn.Module) -> torch.Tensor:
        return norm.weight.view(-1)

    def make_norm(self, like: nn.Module, gains: torch.Tensor) -> nn.Module:
        norm = type(like)(hidden_size=tuple(gains.shape), eps=like.variance_epsilon)
        norm.to(like.weight).weight.data.copy_(gains)
        return norm
