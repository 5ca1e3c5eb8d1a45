"""Low-rank latent K/V caches: a layer caches r numbers per token for its keys and/or its values
instead of G heads of D each (Palu, arXiv 2407.21118; TransMLA shows GQA is a special case).

For a layer whose current K projection is W_K (G_K * D outputs) and V projection W_V:
  keys    the cache holds c_K = A_K x (r_K values). Every step the keys of all cached tokens are
          rebuilt, K = B_K c_K + b_K (G_K heads), then rotated by RoPE, as Palu does: RoPE does
          not commute with a projection, so the rotation comes after the rebuild. This costs
          S * r_K * G_K * D multiply-adds per step for S cached tokens.
  values  the cache holds c_V = A_V x (r_V values), and the rebuild is folded into the output
          projection: query head h reads group g(h), and since its attention weights a_h sum to 1,
          W_o,h (B_V,g(h) (a_h . c_V) + b_V,g(h)) = (W_o,h B_V,g(h)) (a_h . c_V) + W_o,h b_V,g(h),
          so attention runs on the latent values directly and o_proj takes H * r_V inputs.
  partial RoPE keys (MHA2MLA, arXiv 2502.14837; `LatentLayer.rope_pairs`): per K group a few
          rotary pairs stay on the group's own key, rotated and cached as they are; the rest of
          every group's key comes from one latent and is never rotated, so its up-projection is
          absorbed into the query and no key is rebuilt (`PartialRopeKeys`). This changes the
          model even at full rank (the other pairs lose their rotation); MHA2MLA fine-tunes.
A layer may make only its keys latent, only its values, or both.

Factors (`whitened_svd`) come from an SVD of W S, where S S^T = E[x x^T] is the calibration gram
of the layer's input (objectives.calibration): A = Q_r^T S^-1, B = P_r Sigma_r. The expected
squared output error E||W x - B A x||^2 is then the energy of the dropped singular values, which
`LowRankFactors.dropped_energy` gives for every rank at once. At full rank the layer is exact.

Positions: a Palu latent-key layer rotates its queries and rebuilt keys by their index in the cache
(0..S-1), not by the model's position ids. RoPE scores depend only on the distance between query
and key, so this equals the model's rotation for every unpadded sequence, and for left-padded ones
it shifts both sides of each row by its padding. Other layers (partial RoPE included) use the
model's positions as usual.

A latent model carries a `LatentPlan` in its config (key `headgroup_latent`), next to its grouping.
The latent layers bypass the attention-function interface (they call transformers' SDPA or eager
attention themselves). Under a cache precision (gqa.precision) a latent is quantized like any
cached kind (gqa.kv_quant): latent keys per channel over blocks of tokens (the latent channels'
scales differ by orders of magnitude, as the singular values do), latent values per token in
groups of channels. A forward without a cache past simulates that cache, and the keys are rebuilt
from the quantized latents, as decoding rebuilds them from the real cache.
This module imports only torch and transformers: a saved latent checkpoint carries a copy of it
(gqa.remote).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

CONFIG_KEY = "headgroup_latent"
FORMAT_VERSION = 1
# Families whose attention is LLaMA's: separate q/k/v/o projections, RoPE on the whole head
# (rotate_half), no per-head norms. The latent forward is written for that layout.
LATENT_MODEL_TYPES = ("llama", "mistral", "qwen2", "granite")


class LatentError(ValueError):
    """A latent plan is not valid, or does not fit the model; the message names the problem."""


# -- plans -----------------------------------------------------------------------------------------


def _check_rank(rank, what: str) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise LatentError(f"{what} must be a positive integer or null, got {rank!r}")
    return int(rank)


def _check_pairs(pairs, k_rank) -> tuple[tuple[int, ...], ...] | None:
    if pairs is None:
        return None
    if k_rank is None:
        raise LatentError("rope_pairs need a latent K (k_rank)")
    try:
        groups = tuple(tuple(sorted(int(i) for i in group)) for group in pairs)
    except (TypeError, ValueError):
        message = f"rope_pairs must be lists of pair indices per K group, got {pairs!r}"
        raise LatentError(message) from None
    counts = {len(group) for group in groups}
    if not groups or len(counts) != 1 or counts == {0}:
        raise LatentError("rope_pairs need the same positive number of pairs for every K group")
    if any(len(set(group)) != len(group) or group[0] < 0 for group in groups):
        raise LatentError(f"rope_pairs must be distinct non-negative pair indices, got {pairs!r}")
    return groups


@dataclass(frozen=True)
class LatentLayer:
    """One layer's latent ranks: None keeps that kind's heads as they are. `rope_pairs` (only with
    a latent K) switches the keys to MHA2MLA's partial RoPE: per K group, the rotary frequency
    pairs kept on the group's own key; None keeps Palu's rebuild-then-rotate."""

    k_rank: int | None = None
    v_rank: int | None = None
    rope_pairs: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_rank", _check_rank(self.k_rank, "k_rank"))
        object.__setattr__(self, "v_rank", _check_rank(self.v_rank, "v_rank"))
        object.__setattr__(self, "rope_pairs", _check_pairs(self.rope_pairs, self.k_rank))

    @property
    def is_latent(self) -> bool:
        return self.k_rank is not None or self.v_rank is not None

    @property
    def rope_dims(self) -> int:
        """Rotary values cached per K group (2 per kept pair; 0 for Palu's keys)."""
        return 2 * len(self.rope_pairs[0]) if self.rope_pairs else 0

    def k_cached(self) -> int | None:
        """Key values cached per token: the rank, plus the kept rotary values of every group."""
        if self.k_rank is None:
            return None
        return self.k_rank + (len(self.rope_pairs) * self.rope_dims if self.rope_pairs else 0)

    def label(self) -> str:
        rope = f"+rope{self.rope_dims // 2}" if self.rope_pairs else ""
        return f"rK{self.k_rank or '-'}{rope}/rV{self.v_rank or '-'}"


@dataclass(frozen=True)
class LatentPlan:
    """Per layer, the latent rank of K and of V (None: that kind stays on its heads)."""

    layers: tuple[LatentLayer, ...]

    def __post_init__(self) -> None:
        layers = tuple(
            layer if isinstance(layer, LatentLayer) else LatentLayer(*layer)
            for layer in self.layers
        )
        if not layers:
            raise LatentError("a latent plan needs at least one layer")
        object.__setattr__(self, "layers", layers)

    @classmethod
    def uniform(cls, num_layers: int, k_rank: int | None, v_rank: int | None) -> LatentPlan:
        return cls((LatentLayer(k_rank, v_rank),) * num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_model(
        self,
        num_layers: int,
        k_widths: Sequence[int],
        v_widths: Sequence[int],
        head_dim: int | None = None,
    ):
        """Raise LatentError unless the plan has one entry per layer and every rank is at most
        the width (heads * head_dim) of the projection it replaces (for partial RoPE: of the key
        values outside the kept pairs, with `head_dim` given)."""
        if num_layers != self.num_layers:
            raise LatentError(
                f"latent plan has {self.num_layers} layers but the model has {num_layers}"
            )
        for i, layer in enumerate(self.layers):
            k_width = k_widths[i]
            if layer.rope_pairs is not None:
                k_width = _check_rope_fit(i, layer, k_widths[i], head_dim)
            for kind, rank, width in (
                ("K", layer.k_rank, k_width),
                ("V", layer.v_rank, v_widths[i]),
            ):
                if rank is not None and rank > width:
                    raise LatentError(
                        f"layer {i}: {kind} rank {rank} exceeds the {width} values it replaces"
                    )

    def cached_widths(self, k_widths: Sequence[int], v_widths: Sequence[int]):
        """Per layer, the (K, V) values cached per token: the latent's where latent, else the
        width."""
        return [
            (layer.k_cached() or kw, layer.v_rank or vw)
            for layer, kw, vw in zip(self.layers, k_widths, v_widths, strict=True)
        ]

    def to_dict(self) -> dict:
        def entry(layer: LatentLayer) -> list:
            pair = [layer.k_rank, layer.v_rank]
            return (
                pair if layer.rope_pairs is None else [*pair, [list(g) for g in layer.rope_pairs]]
            )

        return {"version": FORMAT_VERSION, "layers": [entry(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: object) -> LatentPlan:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise LatentError("a latent plan must be an object with a 'layers' list")
        if data.get("version") != FORMAT_VERSION:
            raise LatentError(f"unsupported latent plan version {data.get('version')!r}")
        pairs = data["layers"]
        if not all(isinstance(pair, list | tuple) and len(pair) in (2, 3) for pair in pairs):
            raise LatentError("latent plan layers must be [k_rank, v_rank(, rope_pairs)] lists")
        return cls(tuple(LatentLayer(*pair) for pair in pairs))


def _check_rope_fit(index: int, layer: LatentLayer, k_width: int, head_dim: int | None) -> int:
    """The key values a partial-RoPE layer's latent replaces (those outside the kept pairs),
    after checking its groups and pair indices against the layer."""
    if head_dim is None:
        raise LatentError("partial RoPE needs the head dimension to check a plan")
    groups = k_width // head_dim
    if len(layer.rope_pairs) != groups:
        raise LatentError(
            f"layer {index}: rope_pairs name {len(layer.rope_pairs)} K groups, the layer has {groups}"
        )
    half = head_dim // 2
    if any(i >= half for group in layer.rope_pairs for i in group) or layer.rope_dims >= head_dim:
        raise LatentError(
            f"layer {index}: rope_pairs must be fewer than {half} pair indices below {half}"
        )
    return groups * (head_dim - layer.rope_dims)


# -- factors ---------------------------------------------------------------------------------------


def whitener(gram: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = gram (symmetric positive semi-definite), in float64. Eigenvalues
    below `floor` times the largest are raised to it, so a rank-deficient gram still inverts."""
    values, vectors = torch.linalg.eigh(gram.double())
    values = values.clamp_min(floor * values.max().clamp_min(torch.finfo(torch.float64).tiny))
    root = values.sqrt()
    return vectors * root, (vectors / root).T


@dataclass(frozen=True)
class LowRankFactors:
    """The whitened SVD of one projection W (out, in): W S = P diag(s) Q^T.

    left = P diag(s) (out, n) and right = Q^T S^-1 (n, in), n = min(out, in); W = left @ right,
    and rank r keeps the first r columns of left and rows of right."""

    singular: torch.Tensor  # (n,), descending
    left: torch.Tensor
    right: torch.Tensor

    @property
    def max_rank(self) -> int:
        return self.singular.numel()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (r, in), up (out, r)) of rank r."""
        if not 1 <= rank <= self.max_rank:
            raise LatentError(f"rank {rank} is outside 1..{self.max_rank}")
        return self.right[:rank], self.left[:, :rank]

    def dropped_energy(self) -> torch.Tensor:
        """(n + 1,): entry r is E||W x - up down x||^2 at rank r (the calibration expectation):
        the sum of the squared singular values beyond r; entry 0 is E||W x||^2."""
        energy = self.singular.double().square().flip(0).cumsum(0).flip(0)
        return torch.cat([energy, energy.new_zeros(1)])


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor) -> LowRankFactors:
    """The activation-aware SVD of `weight` (out, in) under inputs with gram E[x x^T] (in, in)."""
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise LatentError(
            f"gram of shape {tuple(gram.shape)} does not fit a projection with "
            f"{weight.shape[1]} inputs"
        )
    root, inverse = whitener(gram)
    p, s, qt = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return LowRankFactors(s, p * s, qt @ inverse)


# -- modules ---------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a projection through an r-value latent (the part a latent layer caches)."""

    def __init__(self, like: nn.Linear, rank: int):
        super().__init__()
        kwargs = {"dtype": like.weight.dtype, "device": like.weight.device}
        self.down = nn.Linear(like.in_features, rank, bias=False, **kwargs)
        self.up = nn.Linear(rank, like.out_features, bias=like.bias is not None, **kwargs)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def cached_width(self) -> int:
        return self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class PartialRopeKeys(nn.Module):
    """Keys with MHA2MLA's partial RoPE: per K group g, the values of its kept rotary pairs P_g
    (dims i and i + D/2 of each pair i, in rotate_half's layout) come from `rope` and are rotated
    and cached as they are; the other D - 2|P_g| values of every group come from one latent,
    c = down(x), and are never rotated. A query head h of group g scores a key by
    q_rope(h) . k_rope(g) + q_nope(h) . (up_g c) = [q_rope(h), up_g^T q_nope(h)] . [k_rope(g), c]:
    the up-projection is absorbed into the query, so the cached latent is attended directly and
    no key is rebuilt. The NoPE bias (up_g's bias) adds the same amount to every score of a query,
    which the softmax ignores, so it is dropped."""

    def __init__(self, like: nn.Linear, layer: LatentLayer, head_dim: int):
        super().__init__()
        kwargs = {"dtype": like.weight.dtype, "device": like.weight.device}
        groups, kept = len(layer.rope_pairs), layer.rope_dims
        self.pairs, self.head_dim = layer.rope_pairs, head_dim
        self.rope = nn.Linear(like.in_features, groups * kept, bias=like.bias is not None, **kwargs)
        self.down = nn.Linear(like.in_features, layer.k_rank, bias=False, **kwargs)
        self.up = nn.Linear(layer.k_rank, groups * (head_dim - kept), bias=False, **kwargs)
        self._dims: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def cached_width(self) -> int:
        return self.rope.out_features + self.rank

    def dims(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, 2p) head dims kept rotary and (G, D - 2p) the others, per K group."""
        if device not in self._dims:
            half = self.head_dim // 2
            rope = [[*group, *(i + half for i in group)] for group in self.pairs]
            nope = [[d for d in range(self.head_dim) if d not in set(r)] for r in rope]
            self._dims[device] = tuple(torch.tensor(x, device=device) for x in (rope, nope))
        return self._dims[device]


def rope_pairs_by_norm(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    gram: torch.Tensor,
    k_index: Sequence[int],
    head_dim: int,
    count: int,
) -> tuple[tuple[int, ...], ...]:
    """MHA2MLA's 2-norm selection from calibration: per K group g, the `count` rotary pairs i of
    greatest sum over its query heads h of sqrt(E||q_{h,i}||^2 E||k_{g,i}||^2), the expected
    squared norms of the pair's query and key values under inputs of gram E[x x^T]."""
    half = head_dim // 2

    def pair_energy(weight: torch.Tensor) -> torch.Tensor:  # (heads, half)
        rows = weight.double().view(-1, head_dim, weight.shape[-1])
        energy = torch.einsum("hdi,ij,hdj->hd", rows, gram.double().to(rows.device), rows)
        return energy[:, :half] + energy[:, half:]

    q, k = pair_energy(q_weight).sqrt(), pair_energy(k_weight).sqrt()
    scores = torch.zeros_like(k)
    for h, g in enumerate(k_index):
        scores[g] += q[h] * k[g]
    return tuple(tuple(sorted(int(i) for i in row.topk(count).indices)) for row in scores)


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` with zeros appended to its last dimension up to `width`."""
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LatentAttentionMixin:
    """Put before a LLaMA-layout attention class: its forward caches the latent K and/or V.

    Needs on the module: `hg_latent` (LatentLayer), `hg_k_index`/`hg_v_index` (the group each
    query head reads, gqa.attention.install_plan) and `hg_rotary` (the model's rotary module,
    held outside the module tree)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        latent: LatentLayer = self.hg_latent
        batch, length, _ = hidden_states.shape
        d = self.head_dim

        def heads(x: torch.Tensor, width: int = d) -> torch.Tensor:  # (B, T, G*w) -> (B, G, T, w)
            return x.view(x.shape[0], x.shape[1], -1, width).transpose(1, 2)

        query = heads(self.q_proj(hidden_states))
        cos, sin = position_embeddings
        if latent.k_rank is None:
            query = _rope(query, cos.unsqueeze(1), sin.unsqueeze(1))
            key = _rope(heads(self.k_proj(hidden_states)), cos.unsqueeze(1), sin.unsqueeze(1))
        elif latent.rope_pairs is None:
            key = self.k_proj.down(hidden_states).unsqueeze(1)  # (B, 1, T, r_K)
        else:
            query, key = self._partial_rope(query, hidden_states, cos, sin, heads)
        value = self.v_proj(hidden_states)
        value = heads(value) if latent.v_rank is None else value.unsqueeze(1)  # (B, 1, T, r_V)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # A forward without a cache past under a quantized cache precision (hg_kv_quant, set by
        # gqa.precision) reads what the cache would hold: latents quantized like any cached kind.
        quant = getattr(self, "hg_kv_quant", None)
        simulate = quant is not None and not quant.exact and key.shape[2] == length
        key_q, value_q = quant.fake_quantize(key, value) if simulate else (None, None)

        if latent.k_rank is not None:
            query, attention_keys = self._attention_keys(query, key, length, heads)
            key = attention_keys(key)
            key_q = None if key_q is None else attention_keys(key_q)
        v_index = self.hg_v_index if latent.v_rank is None else torch.zeros_like(self.hg_k_index)
        # SDPA's fused CPU kernels need one width for queries, keys and values (else a math
        # fallback several times slower): zeros pad the narrower side, changing no score.
        width, out_width = max(query.shape[-1], value.shape[-1]), value.shape[-1]
        query, key, key_q, value, value_q = (
            None if x is None else _padded(x, width) for x in (query, key, key_q, value, value_q)
        )
        if simulate:
            if self.training and self.attention_dropout:
                raise NotImplementedError("simulated KV quantization supports no attention dropout")
            out = quant.attend(
                query,
                key,
                value,
                key_q,
                value_q,
                attention_mask,
                self.scaling,
                (self.hg_k_index, v_index),
            )
            return self.o_proj(out[..., :out_width].reshape(batch, length, -1)), None
        key = key.index_select(1, self.hg_k_index)
        if latent.v_rank is None:
            value = value.index_select(1, v_index)
        else:
            value = value.expand(-1, query.shape[1], -1, -1)
        eager = "eager" in (self.config._attn_implementation or "")
        attend = eager_attention_forward if eager else sdpa_attention_forward
        out, _ = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out[..., :out_width].reshape(batch, length, -1)), None

    def _partial_rope(self, query, hidden_states, cos, sin, heads):
        """Partial RoPE (PartialRopeKeys): the (B, H, T, 2p + r) queries, the up-projection
        absorbed, and the (B, 1, T, G * 2p + r) cache entry, kept pairs rotated at insertion."""
        keys: PartialRopeKeys = self.k_proj
        rope_dims, nope_dims = keys.dims(query.device)  # (G, 2p), (G, D - 2p)
        groups, kept = rope_dims.shape
        k_rope = heads(keys.rope(hidden_states), kept)  # (B, G, T, 2p)
        cos_g, sin_g = (x[..., rope_dims].transpose(1, 2) for x in (cos, sin))  # (B, G, T, 2p)
        k_rope = _rope(k_rope, cos_g, sin_g)
        latent = keys.down(hidden_states)  # (B, T, r)
        entry = torch.cat([k_rope.transpose(1, 2).flatten(2), latent], dim=-1).unsqueeze(1)
        head_rope, head_nope = rope_dims[self.hg_k_index], nope_dims[self.hg_k_index]  # (H, .)
        rotated = _rope(query, cos.unsqueeze(1), sin.unsqueeze(1))
        q_rope = rotated.gather(-1, head_rope[None, :, None].expand(*query.shape[:3], kept))
        q_nope = query.gather(-1, head_nope[None, :, None].expand(*query.shape[:3], -1))
        up = keys.up.weight.view(groups, -1, keys.rank)[self.hg_k_index]  # (H, D - 2p, r)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, up)
        return torch.cat([q_rope, q_latent], dim=-1), entry

    def _attention_keys(self, query, key, length, heads):
        """The query and a function from a cached key entry (B, 1, S, .) to the (B, G, S, .) keys
        attention reads: Palu's rebuild and rotation by cache index, or partial RoPE's
        [k_rope(g), c] (the query already matches it)."""
        total = key.shape[2]
        if self.hg_latent.rope_pairs is None:
            positions = torch.arange(total, device=key.device)[None]
            cos, sin = self.hg_rotary(query, positions)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            query = _rope(query, cos[:, :, total - length :], sin[:, :, total - length :])

            def rebuild(entry: torch.Tensor) -> torch.Tensor:
                return _rope(heads(self.k_proj.up(entry.squeeze(1))), cos, sin)

            return query, rebuild
        groups, kept = self.k_proj.dims(key.device)[0].shape

        def split(entry: torch.Tensor) -> torch.Tensor:
            k_rope = entry[..., : groups * kept].squeeze(1).unflatten(-1, (groups, kept))
            latent = entry[..., groups * kept :].expand(-1, groups, -1, -1)
            return torch.cat([k_rope.transpose(1, 2), latent], dim=-1)

        return query, split


_LATENT_CLASSES: dict[type, type] = {}


def _latent_class(cls: type) -> type:
    if issubclass(cls, LatentAttentionMixin):
        return cls
    if cls not in _LATENT_CLASSES:
        _LATENT_CLASSES[cls] = type(
            f"Latent{cls.__name__}", (LatentAttentionMixin, cls), {"__module__": cls.__module__}
        )
    return _LATENT_CLASSES[cls]


def check_family(model_type: str) -> None:
    if model_type not in LATENT_MODEL_TYPES:
        raise LatentError(
            f"latent K/V is written for the LLaMA attention layout ({', '.join(LATENT_MODEL_TYPES)}); "
            f"{model_type!r} is not supported"
        )


def _folded_output(o_proj: nn.Linear, rank: int, num_heads: int, bias: bool) -> nn.Linear:
    return nn.Linear(
        num_heads * rank,
        o_proj.out_features,
        bias=bias,
        dtype=o_proj.weight.dtype,
        device=o_proj.weight.device,
    )


def layout_module(module: nn.Module, layer: LatentLayer, num_heads: int, rotary: nn.Module) -> None:
    """Give one attention module (with a grouping plan installed) the shapes and forward of a
    latent layer, with uninitialised weights (loading fills them; `convert_module` sets them)."""
    if layer.rope_pairs is not None:
        module.k_proj = PartialRopeKeys(module.k_proj, layer, module.head_dim)
    elif layer.k_rank is not None:
        module.k_proj = LowRankLinear(module.k_proj, layer.k_rank)
    if layer.v_rank is not None:
        v_bias = module.v_proj.bias is not None
        down = nn.Linear(module.v_proj.in_features, layer.v_rank, bias=False)
        module.v_proj = down.to(module.v_proj.weight)
        bias = module.o_proj.bias is not None or v_bias
        module.o_proj = _folded_output(module.o_proj, layer.v_rank, num_heads, bias)
    module.hg_latent = layer
    module.__dict__["hg_rotary"] = rotary  # a reference, not a submodule: no second copy saved
    module.__class__ = _latent_class(type(module))


@torch.no_grad()
def convert_module(
    module: nn.Module,
    layer: LatentLayer,
    num_heads: int,
    rotary: nn.Module,
    gram: torch.Tensor,
    factors: dict[str, LowRankFactors] | None = None,
) -> nn.Module:
    """Make `module` (grouping plan installed) latent in place, factors from `gram` (E[x x^T] of
    its input), or `factors[kind]` where given (the same SVDs, computed once by a caller that
    tries several ranks)."""
    old_k, old_v, old_o = module.k_proj, module.v_proj, module.o_proj
    factors = factors or {}

    def svd(kind: str, weight: torch.Tensor) -> LowRankFactors:
        return factors[kind] if kind in factors else whitened_svd(weight, gram)

    layout_module(module, layer, num_heads, rotary)
    d = module.head_dim
    if layer.rope_pairs is not None:  # the kept pairs' rows as they are, the rest low-rank
        rope_dims, nope_dims = module.k_proj.dims(old_k.weight.device)
        offsets = torch.arange(len(layer.rope_pairs), device=rope_dims.device)[:, None] * d
        rope_rows, nope_rows = (rope_dims + offsets).flatten(), (nope_dims + offsets).flatten()
        module.k_proj.rope.weight.copy_(old_k.weight[rope_rows])
        if old_k.bias is not None:
            module.k_proj.rope.bias.copy_(old_k.bias[rope_rows])
        nope = whitened_svd(old_k.weight[nope_rows], gram)
        down, up = nope.factors(layer.k_rank)
        module.k_proj.down.weight.copy_(down)
        module.k_proj.up.weight.copy_(up)
    elif layer.k_rank is not None:
        down, up = svd("k", old_k.weight).factors(layer.k_rank)
        module.k_proj.down.weight.copy_(down)
        module.k_proj.up.weight.copy_(up)
        if old_k.bias is not None:
            module.k_proj.up.bias.copy_(old_k.bias)
    if layer.v_rank is not None:
        down, up = svd("v", old_v.weight).factors(layer.v_rank)
        module.v_proj.weight.copy_(down)
        groups = module.hg_v_index.tolist()
        w_o = old_o.weight.double()  # (hidden, H*D)
        blocks = [
            w_o[:, h * d : (h + 1) * d] @ up[g * d : (g + 1) * d] for h, g in enumerate(groups)
        ]
        module.o_proj.weight.copy_(torch.cat(blocks, dim=1))
        if module.o_proj.bias is not None:
            bias = torch.zeros(old_o.out_features, dtype=torch.float64, device=w_o.device)
            if old_o.bias is not None:
                bias += old_o.bias.double()
            if old_v.bias is not None:
                b_v = old_v.bias.double()
                for h, g in enumerate(groups):
                    bias += w_o[:, h * d : (h + 1) * d] @ b_v[g * d : (g + 1) * d]
            module.o_proj.bias.copy_(bias)
    return module


def latent_modules(module: nn.Module) -> list[nn.Module]:
    """The modules whose shapes a latent layer changes (loaded from a latent checkpoint)."""
    layer: LatentLayer | None = getattr(module, "hg_latent", None)
    if layer is None:
        return []
    return [module.k_proj, module.v_proj] + ([module.o_proj] if layer.v_rank is not None else [])
