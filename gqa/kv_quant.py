"""Low-bit KV cache: asymmetric min-max quantization in the KIVI layout, simulated and for real.

Keys are quantized per channel over blocks of `group_size` tokens, values per token over groups of
`group_size` channels (KIVI, arXiv 2402.02750); each group stores a float16 scale and zero point.
The `window` most recent tokens stay in full precision: a cache of L tokens holds the first
Q(L) = floor(max(L - window, 0) / group_size) * group_size of them quantized, whole blocks only,
and a token's quantized value depends only on its block, never on when the block was quantized.

- `QuantizedKVCache` stores the quantized blocks for real, the codes bit-packed (b bit planes of
  8 codes a byte, so 3 bits cost 3/8 byte), and dequantizes them for attention.
- `LayerQuantizer.attend` simulates that cache in one forward pass (evaluation, search, training):
  query i, which decoding would run against a cache of i + 1 tokens, sees keys and values t < Q(i+1)
  quantized and the rest exact. Decoding token by token with the real cache therefore gives the
  same log-probabilities as the simulated forward, up to float rounding. The rounding is
  straight-through, so the simulated forward trains.

Like gqa/attention.py this module imports only torch and transformers: a saved checkpoint with a
precision plan carries a copy of it (gqa.remote).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

BITS = (2, 3, 4, 8, 16)  # 16: kept in the model's dtype, not quantized
SCALE_BYTES = 2  # float16 scale and float16 zero point per group
_MIN_SCALE = 1e-5


def quantized_length(length: int, group_size: int, window: int) -> int:
    """Q(L): how many of a cache's first `length` tokens are held quantized."""
    return max(length - window, 0) // group_size * group_size


# -- quantization -------------------------------------------------------------------------------


def quantize(x: torch.Tensor, bits: int, dim: int):
    """Codes (float, 0 .. 2^bits - 1), float16 scale and zero point of groups along `dim`."""
    x = x.float()
    levels = 2**bits - 1
    zero = x.amin(dim, keepdim=True).half()
    scale = ((x.amax(dim, keepdim=True) - zero.float()) / levels).clamp_min(_MIN_SCALE).half()
    codes = ((x - zero.float()) / scale.float()).round().clamp_(0, levels)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes * scale.float() + zero.float()


def _key_blocks(key: torch.Tensor, group: int) -> torch.Tensor:
    """(B, G, n, D) with n a multiple of group -> (B, G, n/group, group, D)."""
    b, g, n, d = key.shape
    return key.reshape(b, g, n // group, group, d)


def _value_groups(value: torch.Tensor, group: int) -> torch.Tensor:
    """(B, G, n, D) -> (B, G, n, D/group, group)."""
    b, g, n, d = value.shape
    return value.reshape(b, g, n, d // group, group)


def fake_quantize_keys(key: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys as the cache would return them once quantized (every complete block of tokens);
    tokens past the last complete block are returned unchanged. Straight-through gradient."""
    if bits >= 16:
        return key
    n = key.shape[2] // group * group
    if n == 0:
        return key
    head = _key_blocks(key[:, :, :n], group)
    rounded = dequantize(*quantize(head, bits, dim=3)).reshape(key[:, :, :n].shape).to(key.dtype)
    rounded = torch.cat([rounded, key[:, :, n:]], dim=2)
    return key + (rounded - key).detach()


def fake_quantize_values(value: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values as the cache would return them once quantized. Straight-through gradient."""
    if bits >= 16:
        return value
    groups = _value_groups(value, group)
    rounded = dequantize(*quantize(groups, bits, dim=4)).reshape(value.shape).to(value.dtype)
    return value + (rounded - value).detach()


# -- bit packing --------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits of shape (B, G, ...) -> uint8 (B, G, bits, ceil(n / 8)): bit plane j
    holds bit j of every code, 8 codes a byte. 8-bit codes are stored as they are."""
    b, g = codes.shape[:2]
    flat = codes.reshape(b, g, -1).to(torch.uint8)
    if bits == 8:
        return flat.unsqueeze(2)
    n = flat.shape[-1]
    flat = torch.nn.functional.pad(flat, (0, (-n) % 8))
    weights = (2 ** torch.arange(8, device=flat.device, dtype=torch.uint8)).view(8)
    planes = [
        ((flat >> j) & 1).reshape(b, g, -1, 8).mul(weights).sum(-1, dtype=torch.uint8)
        for j in range(bits)
    ]
    return torch.stack(planes, dim=2)


def unpack(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack`: float codes of `shape`."""
    b, g = packed.shape[:2]
    if bits == 8:
        return packed.reshape(shape).float()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    codes = torch.zeros(b, g, packed.shape[-1] * 8, dtype=torch.uint8, device=packed.device)
    for j in range(bits):
        plane = (packed[:, :, j, :, None] >> shifts) & 1  # (B, G, n/8, 8)
        codes |= plane.reshape(b, g, -1) << j
    n = math.prod(shape[2:])
    return codes[:, :, :n].reshape(shape).float()


# -- simulation ---------------------------------------------------------------------------------


class LayerQuantizer:
    """One attention layer's cache precision, installed on the module as `hg_kv_quant`; the
    grouped attention functions call `attend` for a forward pass without a cache past."""

    def __init__(self, k_bits: int, v_bits: int, group_size: int, window: int):
        self.k_bits, self.v_bits = int(k_bits), int(v_bits)
        self.group_size, self.window = int(group_size), int(window)

    def __repr__(self) -> str:
        return (
            f"LayerQuantizer(k_bits={self.k_bits}, v_bits={self.v_bits}, "
            f"group_size={self.group_size}, window={self.window})"
        )

    @property
    def exact(self) -> bool:
        return self.k_bits >= 16 and self.v_bits >= 16

    def fake_quantize(self, key: torch.Tensor, value: torch.Tensor):
        return (
            fake_quantize_keys(key, self.k_bits, self.group_size),
            fake_quantize_values(value, self.v_bits, self.group_size),
        )

    def seen_quantized(self, num_queries: int, num_keys: int, device) -> torch.Tensor:
        """(S_q, S_k) bool: query i (at cache index S_k - S_q + i) reads key t quantized."""
        ends = torch.arange(num_keys - num_queries + 1, num_keys + 1, device=device)
        limit = (ends - self.window).clamp_min(0) // self.group_size * self.group_size
        return torch.arange(num_keys, device=device)[None, :] < limit[:, None]

    def attend(
        self,
        query: torch.Tensor,  # (B, H, S_q, D)
        key: torch.Tensor,  # (B, H, S_k, D), exact
        value: torch.Tensor,
        key_q: torch.Tensor,  # (B, H, S_k, D), as the cache holds them once quantized
        value_q: torch.Tensor,
        attention_mask: torch.Tensor | None,  # None (causal), bool (True: attend) or additive
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention where each query reads the keys and values a real cache would give it;
        returns (B, S_q, H, D) like transformers' attention functions.

        One fused SDPA call over the keys twice, [quantized; exact], where each query's mask lets
        it see key t's quantized copy if the cache holds t quantized for it, else the exact one:
        the softmax over the union of the two disjoint halves is the attention it would get."""
        s_q, s_k = query.shape[2], key.shape[2]
        seen = self.seen_quantized(s_q, s_k, query.device)  # (S_q, S_k)
        if attention_mask is None:
            attention_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device)
            attention_mask = attention_mask.tril(s_k - s_q)
        if attention_mask.dtype == torch.bool:
            mask = torch.cat([attention_mask & seen, attention_mask & ~seen], dim=-1)
        else:  # additive
            blocked = torch.finfo(attention_mask.dtype).min
            mask = torch.cat(
                [
                    attention_mask.masked_fill(~seen, blocked),
                    attention_mask.masked_fill(seen, blocked),
                ],
                dim=-1,
            ).to(query.dtype)
        out = F.scaled_dot_product_attention(
            query,
            torch.cat([key_q, key], dim=2),
            torch.cat([value_q, value], dim=2),
            attn_mask=mask,
            scale=scaling,
        )
        out = out.nan_to_num(0.0)  # fully masked (padding) rows
        return out.transpose(1, 2).contiguous()


# -- the real cache -----------------------------------------------------------------------------


class _Blocks:
    """One kind (K or V) of one layer: quantized blocks of `group_size` tokens, packed."""

    def __init__(self, bits: int, kind: str, group_size: int):
        self.bits, self.kind, self.group = bits, kind, group_size
        self.stored: list[tuple] = []  # (packed codes, scale, zero, shape) or (exact tensor,)

    def append(self, block: torch.Tensor) -> None:  # (B, G, group, D)
        if self.bits >= 16:
            self.stored.append((block,))
            return
        if self.kind == "k":
            codes, scale, zero = quantize(block, self.bits, dim=2)  # per channel over tokens
        else:
            codes, scale, zero = quantize(_value_groups(block, self.group), self.bits, dim=4)
        self.stored.append((pack(codes, self.bits), scale, zero, codes.shape))

    def tensor(self, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.stored:
            return None
        blocks = []
        for item in self.stored:
            if len(item) == 1:
                blocks.append(item[0])
                continue
            packed, scale, zero, shape = item
            x = dequantize(unpack(packed, self.bits, shape), scale, zero)
            blocks.append(x.reshape(*x.shape[:2], self.group, -1).to(dtype))
        return torch.cat(blocks, dim=2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for item in self.stored for t in item[:3])

    def index_select(self, index: torch.Tensor) -> None:
        self.stored = [
            tuple(t.index_select(0, index) if torch.is_tensor(t) else t for t in item)
            for item in self.stored
        ]


class QuantizedKVLayer(DynamicLayer):
    """A layer's cache: quantized blocks (packed) for old tokens, `self.keys`/`self.values` for
    the recent ones in full precision."""

    is_croppable = False

    def __init__(self, k_bits: int, v_bits: int, group_size: int, window: int):
        super().__init__()
        self.group_size, self.window = group_size, window
        self.k_blocks = _Blocks(k_bits, "k", group_size)
        self.v_blocks = _Blocks(v_bits, "v", group_size)
        self.cumulative_length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens, quantize every block that has left the window, and return the
        keys and values attention reads. A first call (prefill) returns them exact: the grouped
        attention function quantizes them per query, as decoding token by token would. Later
        calls return the quantized blocks dequantized and the window exact, which is what the
        last new query reads (earlier queries of a multi-token step read the blocks quantized
        during that step a few tokens early)."""
        first = not self.is_initialized or self.cumulative_length == 0
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        exact_k, exact_v = self.keys, self.values
        target = quantized_length(self.cumulative_length, self.group_size, self.window)
        done = self.cumulative_length - self.keys.shape[-2]
        g = self.group_size
        while done < target:
            self.k_blocks.append(self.keys[:, :, :g])
            self.v_blocks.append(self.values[:, :, :g])
            self.keys, self.values = self.keys[:, :, g:], self.values[:, :, g:]
            done += g
        if first:
            return exact_k, exact_v
        old_k = self.k_blocks.tensor(self.keys.dtype)
        old_v = self.v_blocks.tensor(self.values.dtype)
        if old_k is None:
            return self.keys, self.values
        return torch.cat([old_k, self.keys], dim=-2), torch.cat([old_v, self.values], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points, and the full-precision window."""
        recent = 0
        if self.is_initialized:
            recent = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return self.k_blocks.nbytes() + self.v_blocks.nbytes() + recent

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for blocks in (self.k_blocks, self.v_blocks):
            blocks.index_select(beam_idx.to(self.device))

    def reset(self) -> None:
        super().reset()
        self.is_initialized = False
        self.cumulative_length = 0
        self.k_blocks.stored.clear()
        self.v_blocks.stored.clear()


class QuantizedKVCache(Cache):
    """A cache with one `QuantizedKVLayer` per attention layer, from the layers' quantizers."""

    def __init__(self, quantizers: list[LayerQuantizer]):
        layers = [QuantizedKVLayer(q.k_bits, q.v_bits, q.group_size, q.window) for q in quantizers]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class QuantizedGenerationMixin:
    """Makes `generate` use a `QuantizedKVCache` built from the model's layer quantizers, when it
    has any, unless the caller passes a cache or turns caching off."""

    def generate(self, *args, **kwargs):
        parameters = inspect.signature(self.forward).parameters
        name = "cache" if "cache" in parameters else "past_key_values"
        quantizers = [m.hg_kv_quant for m in self.modules() if hasattr(m, "hg_kv_quant")]
        if quantizers and kwargs.get(name) is None and kwargs.get("use_cache", True) is not False:
            kwargs[name] = QuantizedKVCache(quantizers)
        return super().generate(*args, **kwargs)
