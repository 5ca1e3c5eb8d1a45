"""The adapter interface: where a model family keeps its attention projections and head counts.

Surgery, calibration and proxies only talk to an adapter, never to a concrete model class, so
supporting a new family is one short file in `gqa/adapters/` (see docs/adding_a_model.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

ADAPTERS: dict[str, type[ModelAdapter]] = {}


class UnsupportedModelError(ValueError):
    """No adapter is registered for a model's `model_type`."""


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register an adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no headgroup adapter (supported: {', '.join(sorted(ADAPTERS))}); "
            "see docs/adding_a_model.md to add one"
        )
    return ADAPTERS[model_type](model)


class ModelAdapter:
    """Access to a decoder-only model's attention layers. Subclasses fill in the attribute paths."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    rotary_path: ClassVar[str] = "model.rotary_emb"
    attention_attr: ClassVar[str] = "self_attn"
    projection_names: ClassVar[dict[str, str]] = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "o_proj",
    }

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # -- modules ---------------------------------------------------------------------------------

    def _get(self, path: str) -> nn.Module:
        module = self.model
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def layers(self) -> nn.ModuleList:
        return self._get(self.layers_path)

    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (D/2,): pair i rotates dims i and i + D/2 by position * f_i."""
        return self._get(self.rotary_path).inv_freq

    def position_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for positions 0..T-1 of x (B, T, d), as the attention modules take them."""
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return self._get(self.rotary_path)(x, positions)

    def attend(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one attention module standalone on whole sequences x (B, T, d): causal, positions
        0..T-1, no padding. Used for layer-local errors and layer-wise recovery."""
        out, _ = module(
            hidden_states=x, position_embeddings=self.position_embeddings(x), attention_mask=None
        )
        return out

    def attention(self, layer: int) -> nn.Module:
        return getattr(self.layers()[layer], self.attention_attr)

    def attentions(self) -> list[nn.Module]:
        return [self.attention(i) for i in range(self.num_layers)]

    def projection(self, layer: int, which: str) -> nn.Linear:
        """which in {'q', 'k', 'v', 'o'}."""
        return getattr(self.attention(layer), self.projection_names[which])

    def set_projection(self, layer: int, which: str, linear: nn.Linear) -> None:
        setattr(self.attention(layer), self.projection_names[which], linear)

    def source_kv_index(self, layer: int, which: str) -> torch.Tensor:
        """For each query head, the index of the K ('k') or V ('v') head it currently reads."""
        attn = self.attention(layer)
        index = getattr(attn, f"hg_{which}_index", None)
        if index is not None:
            return index.clone()
        kv_heads = self.projection(layer, which).out_features // self.head_dim
        return torch.arange(self.num_heads, device=attn.q_proj.weight.device) // (
            self.num_heads // kv_heads
        )

    def head_slices(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head weights (n, D, hidden) and biases (n, D) of the q/k/v projection."""
        proj = self.projection(layer, which)
        weight = proj.weight.view(-1, self.head_dim, proj.in_features)
        bias = None if proj.bias is None else proj.bias.view(-1, self.head_dim)
        return weight, bias
