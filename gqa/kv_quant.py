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
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa
QUERY_CHUNK = 256  # queries per SDPA call of the simulated cache (rounded up to whole blocks)


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


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float codes * scale + zero, rounded as the real cache computes it (into `out`, which may be
    `codes`, when given). Per channel (a scale per last-dimension entry) one fused `addcmul`; per
    token (a scale broadcast along the last dimension) a product, then a sum: there `addcmul` is
    about 5x slower on CPU."""
    scale, zero = scale.float(), zero.float()
    if scale.shape[-1] == 1:
        return torch.mul(codes, scale, out=out).add_(zero)
    return torch.addcmul(zero, codes, scale, out=out)


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

PIECES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}  # a code's bits as pieces of 1, 2, 4 or 8 bits


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(width: int, device: torch.device) -> torch.Tensor:
    """(8 // width, 1) uint8: the shift of each code a byte holds (kept: decoding asks per step)."""
    key = (width, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 8, width, dtype=torch.uint8, device=device)[:, None]
    return _SHIFTS[key]


def packed_bytes(bits: int, count: int) -> int:
    """Bytes that `count` codes of `bits` bits take packed (`count` padded to a multiple of 8)."""
    return -(-count // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits along the last dimension (n of them) -> uint8 (..., bits * ceil(n/8)).

    Each piece of a code's bits (PIECES: 3 bits are a 2-bit and a 1-bit piece) is packed planar,
    8 // w codes of w bits a byte, where byte i holds codes i, i + m, i + 2m, ... (m = n / (8 // w)),
    so that unpacking is one broadcast shift and one mask per piece, with no interleaving."""
    codes = codes.to(torch.uint8)
    n = codes.shape[-1]
    codes = F.pad(codes, (0, (-n) % 8))
    out, offset = [], 0
    for width in PIECES[bits]:
        per = 8 // width
        part = (codes >> offset) & (2**width - 1) if width < 8 else codes
        part = part.unflatten(-1, (per, -1))  # (..., per, m)
        out.append((part << _shifts(width, codes.device)).sum(-2, dtype=torch.uint8))
        offset += width
    return torch.cat(out, dim=-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes (..., count)."""
    codes, offset, start = None, 0, 0
    m = packed.shape[-1] // bits  # bytes a 1-bit piece takes
    for width in PIECES[bits]:
        piece = packed[..., start : start + m * width]
        start += m * width
        if width < 8:
            shifts = _shifts(width, packed.device)
            piece = ((piece.unsqueeze(-2) >> shifts) & (2**width - 1)).flatten(-2)
        codes = piece if codes is None else codes | (piece << offset)
        offset += width
    return codes if codes.shape[-1] == count else codes[..., :count]


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

    def seen_quantized(
        self, num_queries: int, num_keys: int, device, rows: slice = slice(None)
    ) -> torch.Tensor:
        """(S_q, S_k) bool, or the `rows` of it: query i (at cache index S_k - S_q + i) reads key
        t quantized."""
        ends = torch.arange(num_keys - num_queries + 1, num_keys + 1, device=device)[rows]
        limit = (ends - self.window).clamp_min(0) // self.group_size * self.group_size
        return torch.arange(num_keys, device=device)[None, :] < limit[:, None]

    def attend(
        self,
        query: torch.Tensor,  # (B, H, S_q, D)
        key: torch.Tensor,  # (B, G, S_k, D), exact
        value: torch.Tensor,
        key_q: torch.Tensor,  # (B, G, S_k, D), as the cache holds them once quantized
        value_q: torch.Tensor,
        attention_mask: torch.Tensor | None,  # None (causal), bool (True: attend) or additive
        scaling: float | None,
        heads: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention where each query reads the keys and values a real cache would give it;
        returns (B, S_q, H, D) like transformers' attention functions. `heads` gives, per query
        head, the K and V head it reads (None: G divides H and query head h reads h // (H / G),
        SDPA's own grouped-query layout).

        Query i reads key t quantized when t < Q(i + 1) and exact when Q(i + 1) <= t <= i. The
        queries are taken in chunks of whole blocks; a chunk [a, b) needs the quantized keys
        t < Q(b) and the exact keys Q(a + 1) <= t < b, so one SDPA call per chunk over those,
        [quantized; exact], with a mask that lets each query see each key once, costs about what
        causal attention does (not the 4x of masking every query over the keys twice)."""
        s_q, s_k = query.shape[2], key.shape[2]
        past = s_k - s_q
        positions = torch.arange(s_k, device=query.device)
        chunk = -(-QUERY_CHUNK // self.group_size) * self.group_size
        outs = []
        for a in range(0, s_q, chunk):
            b = min(a + chunk, s_q)
            quantized = quantized_length(past + b, self.group_size, self.window)
            exact = quantized_length(past + a + 1, self.group_size, self.window)
            seen = self.seen_quantized(s_q, s_k, query.device, slice(a, b))  # (n, S_k)
            if attention_mask is None:  # causal, built a chunk at a time
                rows = torch.arange(past + a, past + b, device=query.device)
                allowed = positions[None, :] <= rows[:, None]
            else:
                allowed = attention_mask[..., a:b, :]
            keep_q, keep_e = seen[:, :quantized], ~seen[:, exact : past + b]
            if allowed.dtype == torch.bool:
                mask = torch.cat(
                    [allowed[..., :quantized] & keep_q, allowed[..., exact : past + b] & keep_e],
                    dim=-1,
                )
                visible = mask.any(-1, keepdim=True)
                # additive: SDPA on CPU is about 25% faster with a float mask than a bool one
                blocked = torch.finfo(query.dtype).min
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                    ~mask, blocked
                )
            else:  # additive
                blocked = torch.finfo(allowed.dtype).min
                mask = torch.cat(
                    [
                        allowed[..., :quantized].masked_fill(~keep_q, blocked),
                        allowed[..., exact : past + b].masked_fill(~keep_e, blocked),
                    ],
                    dim=-1,
                )
                visible = (mask > blocked / 2).any(-1, keepdim=True)
                mask = mask.to(query.dtype)
            keys = torch.cat([key_q[:, :, :quantized], key[:, :, exact : past + b]], dim=2)
            values = torch.cat([value_q[:, :, :quantized], value[:, :, exact : past + b]], dim=2)
            out = _sdpa(query[:, :, a:b], keys, values, mask, scaling, heads)
            # A query that sees no key (padding) gets 0, whatever keys its chunk holds: its
            # output feeds the next layer's keys, which share quantization blocks with real ones.
            outs.append(out.nan_to_num(0.0).masked_fill(~visible, 0.0))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _sdpa(query, key, value, mask, scaling, heads) -> torch.Tensor:
    """SDPA of (B, H, n, D) queries over (B, G, m, D) keys and values, each query head reading
    the K and V head `heads` names (None: h // (H / G))."""
    if heads is not None:
        key, value = key.index_select(1, heads[0]), value.index_select(1, heads[1])
    elif key.shape[1] != query.shape[1] and not _SDPA_GQA:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, **extra)


# -- the real cache -----------------------------------------------------------------------------


class QuantizedStore:
    """One kind (K or V) of one layer's quantized tokens, whole blocks of `group_size` tokens, in
    tensors that grow (amortised: to 1.5x, or to what is asked) rather than in a list of blocks:

        codes  (B, G, capacity, packed bytes of a block)  uint8, `pack`ed
        scale, zero  float16; keys (B, G, capacity, 1, D): per channel over the block's tokens;
                     values (B, G, capacity, group, D / group, 1): per token over channel groups

    so that reading every block back is a fixed number of vectorized operations whatever their
    count. 16-bit kinds hold the blocks as they are (B, G, capacity, group, D)."""

    def __init__(self, bits: int, kind: str, group_size: int):
        self.bits, self.kind, self.group = bits, kind, group_size
        self.blocks = 0
        self.tensors: list[torch.Tensor] = []  # codes, scale, zero (or the exact blocks)

    def append(self, tokens: torch.Tensor) -> None:
        """Quantize and store (B, G, n, D) tokens, n a multiple of `group_size`."""
        b, g, n, d = tokens.shape
        blocks = tokens.reshape(b, g, n // self.group, self.group, d)
        if self.bits >= 16:
            items = [blocks]
        elif self.kind == "k":
            codes, scale, zero = quantize(blocks, self.bits, dim=3)  # per channel over tokens
            items = [pack(codes.flatten(-2), self.bits), scale, zero]
        else:
            groups = blocks.unflatten(-1, (d // self.group, self.group))
            codes, scale, zero = quantize(groups, self.bits, dim=5)  # per token, channel groups
            items = [pack(codes.flatten(-3), self.bits), scale, zero]
        self._write(items)

    def _write(self, items: list[torch.Tensor]) -> None:
        count = items[0].shape[2]
        end = self.blocks + count
        if not self.tensors or end > self.tensors[0].shape[2]:
            capacity = max(end, self.blocks * 3 // 2)
            grown = []
            for i, item in enumerate(items):
                tensor = item.new_empty((*item.shape[:2], capacity, *item.shape[3:]))
                if self.blocks:
                    tensor[:, :, : self.blocks] = self.tensors[i][:, :, : self.blocks]
                grown.append(tensor)
            self.tensors = grown
        for tensor, item in zip(self.tensors, items, strict=True):
            tensor[:, :, self.blocks : end] = item
        self.blocks = end

    def read_into(self, out: torch.Tensor) -> None:
        """Write the stored tokens, dequantized, into `out` (B, G, blocks * group, D)."""
        if not self.blocks:
            return
        b, g, _, d = out.shape
        blocks = out.view(b, g, self.blocks, self.group, d)
        if self.bits >= 16:
            blocks.copy_(self.tensors[0][:, :, : self.blocks])
            return
        packed, scale, zero = (t[:, :, : self.blocks] for t in self.tensors)
        codes = unpack(packed, self.bits, self.group * d).view(b, g, self.blocks, self.group, d)
        if self.kind == "v":
            codes = codes.unflatten(-1, (d // self.group, self.group))
            blocks = blocks.unflatten(-1, (d // self.group, self.group))
        if out.dtype == torch.float32:  # as `dequantize` computes it, in place
            blocks.copy_(codes)  # the cast first: mixed uint8/float operations are 2x slower
            dequantize(blocks, scale, zero, out=blocks)
        else:
            blocks.copy_(dequantize(codes, scale, zero))

    def nbytes(self) -> int:
        """Bytes the stored blocks take (not the spare capacity)."""
        return sum(t[:, :, : self.blocks].numel() * t.element_size() for t in self.tensors)

    def allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def index_select(self, index: torch.Tensor) -> None:
        self.tensors = [t.index_select(0, index) for t in self.tensors]

    def clear(self) -> None:
        self.blocks, self.tensors = 0, []


class ReadBuffers:
    """Scratch tensors that one layer at a time reads its dequantized cache into, shared by the
    layers of a cache: the cache holds only packed codes, plus one layer's K and V in float for
    as long as that layer's attention runs."""

    def __init__(self):
        self.flat: dict[tuple, torch.Tensor] = {}

    def get(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (kind, like.dtype, like.device)
        need = math.prod(shape)
        if key not in self.flat or self.flat[key].numel() < need:
            self.flat[key] = like.new_empty(max(need, need * 5 // 4))
        return self.flat[key][:need].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


class QuantizedKVLayer(DynamicLayer):
    """A layer's cache: quantized blocks (packed) for old tokens, `self.keys`/`self.values` for
    the recent ones in full precision."""

    is_croppable = False

    def __init__(
        self,
        k_bits: int,
        v_bits: int,
        group_size: int,
        window: int,
        buffers: ReadBuffers | None = None,
    ):
        super().__init__()
        self.group_size, self.window = group_size, window
        self.k_store = QuantizedStore(k_bits, "k", group_size)
        self.v_store = QuantizedStore(v_bits, "v", group_size)
        self.buffers = buffers or ReadBuffers()
        self.cumulative_length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens, quantize every block that has left the window, and return the
        keys and values attention reads. A first call (prefill) returns them exact: the grouped
        attention function quantizes them per query, as decoding token by token would. Later
        calls return the quantized blocks dequantized and the window exact, which is what the
        last new query reads (earlier queries of a multi-token step read the blocks quantized
        during that step a few tokens early). What they return lives in buffers shared by the
        layers: valid until the next layer's update."""
        first = not self.is_initialized or self.cumulative_length == 0
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        exact_k, exact_v = self.keys, self.values
        target = quantized_length(self.cumulative_length, self.group_size, self.window)
        ready = target - (self.cumulative_length - self.keys.shape[-2])
        if ready > 0:
            self.k_store.append(self.keys[:, :, :ready])
            self.v_store.append(self.values[:, :, :ready])
            # a copy, never a view: a view (even an empty one) would keep the exact prompt alive
            self.keys = self.keys[:, :, ready:].clone()
            self.values = self.values[:, :, ready:].clone()
        if first:
            return exact_k, exact_v
        if not self.k_store.blocks:
            return self.keys, self.values
        return self._read("k", self.k_store, self.keys), self._read("v", self.v_store, self.values)

    def _read(self, kind: str, store: QuantizedStore, recent: torch.Tensor) -> torch.Tensor:
        b, g, n, d = recent.shape
        stored = store.blocks * self.group_size
        out = self.buffers.get(kind, (b, g, stored + n, d), recent)
        store.read_into(out[:, :, :stored])
        out[:, :, stored:] = recent
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points, and the full-precision window."""
        recent = 0
        if self.is_initialized:
            recent = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return self.k_store.nbytes() + self.v_store.nbytes() + recent

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for store in (self.k_store, self.v_store):
            store.index_select(beam_idx.to(self.device))

    def reset(self) -> None:
        super().reset()
        self.is_initialized = False
        self.cumulative_length = 0
        self.k_store.clear()
        self.v_store.clear()


class QuantizedKVCache(Cache):
    """A cache with one `QuantizedKVLayer` per attention layer, from the layers' quantizers."""

    def __init__(self, quantizers: list[LayerQuantizer]):
        self.buffers = ReadBuffers()
        layers = [
            QuantizedKVLayer(q.k_bits, q.v_bits, q.group_size, q.window, self.buffers)
            for q in quantizers
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held for the tokens: what the formula counts (gqa.precision.cache_bytes)."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes allocated: the stores' spare capacity and the shared read buffers included."""
        recent = sum(
            t.numel() * t.element_size()
            for layer in self.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )
        stores = sum(s.allocated() for layer in self.layers for s in (layer.k_store, layer.v_store))
        return recent + stores + self.buffers.nbytes()


def cache_keyword(model) -> str:
    """The keyword `model.forward` takes its KV cache by: `cache` from transformers 5.25 on,
    where `past_key_values` is deprecated, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output) -> Cache:
    """The KV cache a forward or `generate` returned: `output.cache` from transformers 5.25 on,
    where `past_key_values` is deprecated, `output.past_key_values` before."""
    # not output.get("cache", output.past_key_values): that reads the deprecated field first
    return output["cache"] if "cache" in output else output.past_key_values  # noqa: SIM401


class QuantizedGenerationMixin:
    """Makes `generate` use a `QuantizedKVCache` built from the model's layer quantizers, when it
    has any, unless the caller passes a cache or turns caching off."""

    def generate(self, *args, **kwargs):
        name = cache_keyword(self)
        quantizers = [m.hg_kv_quant for m in self.modules() if hasattr(m, "hg_kv_quant")]
        if quantizers and kwargs.get(name) is None and kwargs.get("use_cache", True) is not False:
            kwargs[name] = QuantizedKVCache(quantizers)
        return super().generate(*args, **kwargs)
