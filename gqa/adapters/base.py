"""The adapter interface: where a model family keeps its attention projections and head counts.

Surgery, calibration and proxies only talk to an adapter, never to a concrete model class, so
supporting a new family is one short file in `gqa/adapters/` (see docs/adding_a_model.md).
Families that differ from the LLaMA layout override a class attribute or one of the hooks below
(`output_weight`, `rope_inv_freq`, `position_embeddings`, `query_head_tensors`,
`regroup_norms`, `expand_norms`, `to_stock`); `gqa.adapters.fused` handles fused q/k/v and
`gqa.adapters.head_norms` per-head q/k norms with a gain per head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

ADAPTERS: dict[str, type[ModelAdapter]] = {}


class UnsupportedModelError(ValueError):
    """No adapter is registered for a model's `model_type`, or its configuration is unsupported."""


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
    adapter = ADAPTERS[model_type](model)
    adapter.check_supported()
    return adapter


class ModelAdapter:
    """Access to a decoder-only model's attention layers. Subclasses fill in the attribute paths."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    rotary_path: ClassVar[str | None] = "model.rotary_emb"  # None: no RoPE
    attention_attr: ClassVar[str] = "self_attn"
    projection_names: ClassVar[dict[str, str]] = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "o_proj",
    }
    # Stock transformers can express a uniform grouping as `num_key_value_heads` (False for
    # MHA-only families: their converted models always save in headgroup's format).
    stock_gqa: ClassVar[bool] = True
    # RoPE that rotates adjacent dims (2i, 2i + 1) (GPT-J, Cohere) rather than (i, i + R/2): the
    # model runs exactly, but `rope_inv_freq` cannot describe it to the RoPE-aware key weighting.
    rope_interleaved: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def check_supported(self) -> None:
        """Raise UnsupportedModelError (one line, saying why) for configurations not handled."""

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

    def attention_scale(self, layer: int) -> float:
        """The factor on q.k logits (1/sqrt(D), Granite's multiplier, Gemma's pre-scaling...)."""
        return float(getattr(self.attention(layer), "scaling", self.head_dim**-0.5))

    # -- modules ---------------------------------------------------------------------------------

    def _get(self, path: str) -> nn.Module:
        module = self.model
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def layers(self) -> nn.ModuleList:
        return self._get(self.layers_path)

    def rope_inv_freq(self, layer: int = 0) -> torch.Tensor | None:
        """RoPE inverse frequencies (R/2,) of `layer`, R <= D the rotated dims: pair i rotates
        dims i and i + R/2 by position * f_i. None for a model without RoPE."""
        if self.rope_interleaved:
            raise UnsupportedModelError(
                f"{self.config.model_type} rotates adjacent dims (interleaved RoPE), which the "
                "RoPE-aware key weighting (attn_out and fisher proxies, query_aware merge) cannot "
                "express; use the mean merge with kv_recon, wse, act_cos or local_attn"
            )
        if self.rotary_path is None:
            return None
        return self._get(self.rotary_path).inv_freq

    def position_embeddings(self, x: torch.Tensor, module: nn.Module | None = None):
        """RoPE (cos, sin) for positions 0..T-1 of x (B, T, d), as `module` takes them; None
        without RoPE (learned positions are added to the embeddings, outside attention)."""
        if self.rotary_path is None:
            return None
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return self._get(self.rotary_path)(x, positions)

    def attend(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one attention module standalone on whole sequences x (B, T, d): causal (within the
        module's sliding window, if any), positions 0..T-1, no padding. Used for layer-local
        errors and layer-wise recovery."""
        out, _ = module(
            hidden_states=x,
            position_embeddings=self.position_embeddings(x, module),
            attention_mask=_window_mask(x, self.sliding_window(module)),
        )
        return out

    def sliding_window(self, module: nn.Module) -> int | None:
        """The window the module passes to attention: its own attribute (Gemma 2/3, Qwen3, set
        per layer) or else the config's (Mistral, Phi-3)."""
        if hasattr(module, "sliding_window"):
            return module.sliding_window
        return getattr(module.config, "sliding_window", None)

    def attention(self, layer: int) -> nn.Module:
        return getattr(self.layers()[layer], self.attention_attr)

    def attentions(self) -> list[nn.Module]:
        return [self.attention(i) for i in range(self.num_layers)]

    # -- projections -----------------------------------------------------------------------------

    def module_projection(self, module: nn.Module, which: str) -> nn.Module:
        """The q/k/v/o projection of one attention module (which in {'q', 'k', 'v', 'o'})."""
        return getattr(module, self.projection_names[which])

    def set_module_projection(self, module: nn.Module, which: str, linear: nn.Linear) -> None:
        setattr(module, self.projection_names[which], linear)

    def projection(self, layer: int, which: str) -> nn.Linear:
        """which in {'q', 'k', 'v', 'o'}."""
        return self.module_projection(self.attention(layer), which)

    def set_projection(self, layer: int, which: str, linear: nn.Linear) -> None:
        self.set_module_projection(self.attention(layer), which, linear)

    def output_weight(self, layer: int) -> torch.Tensor:
        """The output projection's weight as (d, H*D), a view (writes reach the model)."""
        return self.projection(layer, "o").weight

    def source_kv_index(self, layer: int, which: str) -> torch.Tensor:
        """For each query head, the index of the K ('k') or V ('v') head it currently reads."""
        attn = self.attention(layer)
        index = getattr(attn, f"hg_{which}_index", None)
        if index is not None:
            return index.clone()
        kv_heads = self.projection(layer, which).out_features // self.head_dim
        device = self.projection(layer, "q").weight.device
        return torch.arange(self.num_heads, device=device) // (self.num_heads // kv_heads)

    def head_slices(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head weights (n, D, hidden) and biases (n, D) of the q/k/v projection."""
        proj = self.projection(layer, which)
        weight = proj.weight.view(-1, self.head_dim, proj.in_features)
        bias = None if proj.bias is None else proj.bias.view(-1, self.head_dim)
        return weight, bias

    # -- hooks for families whose attention has more than projections ----------------------------

    def query_head_tensors(self, layer: int) -> list[torch.Tensor]:
        """Tensors besides q_proj indexed by query head along dim 0 (as (H*D,)), which move with
        the query heads when they are reordered (OLMo 2's q_norm gain)."""
        return []

    def regroup_norms(
        self, module: nn.Module, layer: int, groups, merged_k: nn.Linear | None
    ) -> None:
        """Adapt norms whose width depends on the number of K heads to `groups` (called before
        the projections are replaced; merged_k None: shapes only, weights are loaded next)."""

    def expand_norms(self, module: nn.Module, k_index: torch.Tensor) -> None:
        """Give K-width norms one slice per query head (k_index: the group each head reads)."""

    def layout_layer(self, layer: int, k_groups, v_groups) -> None:
        """Give layer `layer` the module shapes of a grouping (K and V partitions of its query
        heads) without merging: the weights are loaded next. Used by headgroup's loader and by the
        modeling code a self-contained checkpoint carries (gqa.remote)."""
        self.regroup_norms(self.attention(layer), layer, k_groups, None)
        for which, groups in (("k", k_groups), ("v", v_groups)):
            old = self.projection(layer, which)
            self.set_projection(layer, which, new_linear(old, len(groups) * self.head_dim))

    def regrouped_modules(self, layer: int) -> list[nn.Module]:
        """Modules whose shapes depend on the grouping: loaded from a converted checkpoint."""
        return [self.projection(layer, "k"), self.projection(layer, "v")]

    def to_stock(self, layer: int) -> None:
        """Restore the family's stock module layout once K/V are plain GQA or MHA again."""


def new_linear(like: nn.Linear, out_features: int, device=None) -> nn.Linear:
    """A linear layer like `like` (input width, bias, dtype, device) with `out_features` outputs."""
    return nn.Linear(
        like.in_features,
        out_features,
        bias=like.bias is not None,
        dtype=like.weight.dtype,
        device=device or like.weight.device,
    )


def _window_mask(x: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Additive (1, 1, T, T) mask of causal attention within `window` tokens (None: not needed)."""
    length = x.shape[1]
    if window is None or length <= window:
        return None
    i = torch.arange(length, device=x.device)
    allowed = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    mask = torch.zeros(length, length, dtype=x.dtype, device=x.device)
    return mask.masked_fill(~allowed, torch.finfo(x.dtype).min)[None, None]
