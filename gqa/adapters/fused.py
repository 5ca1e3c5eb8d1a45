"""Families with one fused q/k/v projection (Phi-3 `qkv_proj`, GPT-2 `c_attn`, GPT-NeoX
`query_key_value`).

A stock fused projection is read through views: `projection(layer, 'k')` is an `nn.Linear` whose
weight shares storage with its rows of the fused weight, so reading, calibration and in-place
head permutations work unchanged. When K or V is replaced (conversion, expansion), the fused
module becomes a `SplitQKV`: three real linears whose outputs are concatenated, so the attention
module's own code still finds q, k and v at the offsets it computes from the sizes we record, K
and V may have different head counts, and recovery trains real parameters. `to_stock` fuses them
back for stock transformers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gqa.adapters.base import ModelAdapter


class SplitQKV(nn.Module):
    """q, k and v projections whose outputs are concatenated, as a fused projection's are."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear whose parameters share storage with `weight` (out, in) and `bias` (out,)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class FusedQKVAdapter(ModelAdapter):
    """Subclasses say where the fused projection lives and how its module records the sizes."""

    fused_attr: ClassVar[str] = "qkv_proj"
    transposed: ClassVar[bool] = False  # GPT-2's Conv1D stores its weight as (in, out)

    def qkv_sizes(self, module: nn.Module) -> tuple[int, int, int]:
        """Output widths of q, k and v in the fused output, as the attention module splits it."""
        raise NotImplementedError

    def qkv_rows(self, module: nn.Module, which: str) -> slice | torch.Tensor:
        """Rows of the fused (out, in) weight that hold q, k or v: a slice (read as a view) or,
        for rows that are not contiguous (GPT-NeoX), an index (read as a copy)."""
        sizes = self.qkv_sizes(module)
        start = sum(sizes[: "qkv".index(which)])
        return slice(start, start + sizes["qkv".index(which)])

    def record_sizes(self, module: nn.Module, sizes: tuple[int, int, int]) -> None:
        """Tell the attention module where k and v now sit in the fused output."""
        raise NotImplementedError

    def fuse(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Module:
        """The family's stock fused module holding q, k and v."""
        raise NotImplementedError

    def _fused_weight(self, fused: nn.Module) -> torch.Tensor:
        return fused.weight.T if self.transposed else fused.weight  # (out, in)

    def module_projection(self, module: nn.Module, which: str) -> nn.Module:
        fused = getattr(module, self.fused_attr)
        if which == "o":
            return super().module_projection(module, which)
        if isinstance(fused, SplitQKV):
            return getattr(fused, which)
        rows = self.qkv_rows(module, which)
        bias = None if fused.bias is None else fused.bias[rows]
        return _view_linear(self._fused_weight(fused)[rows], bias)

    def set_module_projection(self, module: nn.Module, which: str, linear: nn.Linear) -> None:
        if which == "o":
            return super().set_module_projection(module, which, linear)
        fused = getattr(module, self.fused_attr)
        if not isinstance(fused, SplitQKV):
            parts = [_copy_linear(self.module_projection(module, w)) for w in "qkv"]
            fused = SplitQKV(*parts)
            setattr(module, self.fused_attr, fused)
        setattr(fused, which, linear)
        self.record_sizes(
            module, (fused.q.out_features, fused.k.out_features, fused.v.out_features)
        )

    def regrouped_modules(self, layer: int) -> list[nn.Module]:
        return [getattr(self.attention(layer), self.fused_attr)]

    def to_stock(self, layer: int) -> None:
        module = self.attention(layer)
        fused = getattr(module, self.fused_attr)
        if isinstance(fused, SplitQKV):
            setattr(module, self.fused_attr, self.fuse(fused.q, fused.k, fused.v))


def _copy_linear(view: nn.Linear) -> nn.Linear:
    linear = nn.Linear(
        view.in_features,
        view.out_features,
        bias=view.bias is not None,
        dtype=view.weight.dtype,
        device=view.weight.device,
    )
    with torch.no_grad():
        linear.weight.copy_(view.weight)
        if view.bias is not None:
            linear.bias.copy_(view.bias)
    return linear


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out, in) and `bias`, on their device and dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.to(weight)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    return linear


def concat_linear(
    q: nn.Linear, k: nn.Linear, v: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused (out, in) weight and bias of three linears."""
    weight = torch.cat([q.weight, k.weight, v.weight]).detach()
    bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias]).detach()
    return weight, bias
