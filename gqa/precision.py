"""KV-cache precision: a property of a converted model, like its grouping.

A `PrecisionPlan` gives each layer K bits and V bits (16, 8, 4, 3, 2), with one group size and
one full-precision window of recent tokens for the model (gqa.kv_quant has the layout). It is
stored in the model config (key `headgroup_kv_precision`, so it survives save/load), installed on
the attention modules (simulated quantization in every forward without a cache past) and used by
`generate` (a real `QuantizedKVCache`).

Bytes per token, per layer and kind, for G cached heads of head_dim D at b bits with groups of g:
    b = 16:  G * D * dtype_bytes
    b < 16:  G * D * (b / 8 + 2 * SCALE_BYTES / g)     (a float16 scale and zero per g values)
`kv_bytes_per_token` is this steady-state cost summed over layers and kinds (the window excluded:
it does not grow with the context), the one place the formula is written; `cache_bytes` is the
exact size of a cache holding L tokens, window included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

from torch import nn

from gqa.kv_quant import (
    BITS,
    SCALE_BYTES,
    LayerQuantizer,
    QuantizedGenerationMixin,
    QuantizedKVCache,
    quantized_length,
)
from gqa.latent import CONFIG_KEY as LATENT_KEY

QUANTIZED_BITS = tuple(b for b in BITS if b < 16)  # (2, 3, 4, 8): the widths that quantize
CONFIG_KEY = "headgroup_kv_precision"
FORMAT_VERSION = 1


class PrecisionError(ValueError):
    """A precision plan is not valid, or does not fit the model; the message names the problem."""


def _check_int(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise PrecisionError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_bits(bits, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, Integral) or bits not in BITS:
        raise PrecisionError(f"{what} = {bits!r} is not supported: choose one of {list(BITS)}")
    return int(bits)


@dataclass(frozen=True)
class LayerPrecision:
    """One layer's cache precision: bits per stored key and per stored value."""

    k_bits: int = 16
    v_bits: int = 16

    def __post_init__(self) -> None:
        check_bits(self.k_bits, "k_bits")
        check_bits(self.v_bits, "v_bits")

    def label(self) -> str:
        return f"K{self.k_bits}/V{self.v_bits}"


def kind_bytes_per_token(heads: int, head_dim: int, bits: int, group_size: int, dtype_bytes=2):
    """Steady-state bytes per token of one kind (K or V) of one layer."""
    if bits >= 16:
        return heads * head_dim * dtype_bytes
    return heads * head_dim * (bits / 8 + 2 * SCALE_BYTES / group_size)


def kind_cache_bytes(
    bits: int,
    heads: int,
    width: int,
    length: int,
    group_size: int,
    window: int = 0,
    batch: int = 1,
    dtype_bytes: int = 2,
) -> int:
    """Exact bytes one kind (K or V) of one layer takes in a `QuantizedKVCache` holding `length`
    tokens: `heads` cached heads of `width` values each, the first Q(length) tokens quantized in
    whole blocks at `bits` (packed codes, a float16 scale and zero per `width` values per block),
    the rest (the window and the last partial block) at `dtype_bytes`; 16 bits stores all so."""
    q = quantized_length(length, group_size, window)
    blocks, recent = q // group_size, length - q
    values_per_block = group_size * width  # per sequence and head
    if bits >= 16:
        stored = blocks * values_per_block * dtype_bytes
    else:
        codes = bits * -(-values_per_block // 8) if bits < 8 else values_per_block
        stored = blocks * (codes + 2 * SCALE_BYTES * width)  # one scale per width
    return batch * heads * (stored + recent * width * dtype_bytes)


def kv_bytes_per_token(
    k_heads: Sequence[int],
    v_heads: Sequence[int],
    head_dim: int,
    plan: PrecisionPlan | None = None,
    dtype_bytes: int = 2,
) -> float:
    """Steady-state KV-cache bytes per token of a model that caches k_heads[l] K heads and
    v_heads[l] V heads in layer l (a grouping's group counts), at 16 bits without a plan, else at
    the plan's bits. `Grouping.kv_bytes_per_token` and `PrecisionPlan.bytes_per_token` call it."""
    if plan is None:
        bits, group_size = [(16, 16)] * len(k_heads), 1  # the group size is unused at 16 bits
    else:
        bits, group_size = [(layer.k_bits, layer.v_bits) for layer in plan.layers], plan.group_size
    if len(k_heads) != len(bits) or len(v_heads) != len(bits):
        raise PrecisionError(f"need {len(bits)} K and V head counts")
    return sum(
        kind_bytes_per_token(gk, head_dim, kb, group_size, dtype_bytes)
        + kind_bytes_per_token(gv, head_dim, vb, group_size, dtype_bytes)
        for (kb, vb), gk, gv in zip(bits, k_heads, v_heads, strict=True)
    )


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-layer K/V bits, the group size and the full-precision window of recent tokens."""

    layers: tuple[LayerPrecision, ...]
    group_size: int = 32
    window: int = 0

    def __post_init__(self) -> None:
        layers = tuple(
            layer if isinstance(layer, LayerPrecision) else LayerPrecision(*layer)
            for layer in self.layers
        )
        if not layers:
            raise PrecisionError("a precision plan needs at least one layer")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "group_size", _check_int(self.group_size, "group_size", 1))
        object.__setattr__(self, "window", _check_int(self.window, "window", 0))

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        k_bits: int = 16,
        v_bits: int | None = None,
        group_size: int = 32,
        window: int = 0,
    ) -> PrecisionPlan:
        layer = LayerPrecision(k_bits, k_bits if v_bits is None else v_bits)
        return cls((layer,) * _check_int(num_layers, "num_layers", 1), group_size, window)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def exact(self) -> bool:
        """True when nothing is quantized (every layer 16/16)."""
        return all(layer.k_bits >= 16 and layer.v_bits >= 16 for layer in self.layers)

    def label(self) -> str:
        """'K4/V3 g32' for a uniform plan, 'mixed g32' otherwise (window appended when set)."""
        kinds = {layer.label() for layer in self.layers}
        text = kinds.pop() if len(kinds) == 1 else "mixed"
        text = "16-bit" if self.exact else f"{text} g{self.group_size}"
        return text + (f" w{self.window}" if self.window and not self.exact else "")

    def check_model(self, num_layers: int, head_dim: int) -> None:
        if num_layers != self.num_layers:
            raise PrecisionError(
                f"precision plan has {self.num_layers} layers but the model has {num_layers}"
            )
        if not self.exact and head_dim % self.group_size:
            raise PrecisionError(
                f"group_size {self.group_size} does not divide head_dim {head_dim}: values are "
                "quantized per token in groups of group_size channels"
            )

    # -- bytes -----------------------------------------------------------------------------------

    def bytes_per_token(
        self, k_heads: Sequence[int], v_heads: Sequence[int], head_dim: int, dtype_bytes: int = 2
    ) -> float:
        """Steady-state KV bytes per token for these per-layer cached head counts."""
        return kv_bytes_per_token(k_heads, v_heads, head_dim, self, dtype_bytes)

    def cache_bytes(
        self,
        k_heads: Sequence[int],
        v_heads: Sequence[int],
        head_dim: int,
        length: int,
        batch: int = 1,
        dtype_bytes: int = 2,
    ) -> int:
        """Exact bytes of a `QuantizedKVCache` holding `length` tokens of `batch` sequences:
        packed codes (b bit planes of ceil(n / 8) bytes), float16 scales and zero points, and the
        recent tokens (and 16-bit kinds) at `dtype_bytes`."""
        total = 0
        for layer, gk, gv in zip(self.layers, k_heads, v_heads, strict=True):
            for bits, heads in ((layer.k_bits, gk), (layer.v_bits, gv)):
                total += self.kind_cache_bytes(bits, heads, head_dim, length, batch, dtype_bytes)
        return total

    def kind_cache_bytes(
        self, bits: int, heads: int, width: int, length: int, batch: int = 1, dtype_bytes: int = 2
    ) -> int:
        """Exact bytes one layer's K (or V) takes in a `QuantizedKVCache` holding `length`
        tokens: `heads` cached heads of `width` values each (a latent kind: 1 head of its rank)."""
        return kind_cache_bytes(
            bits, heads, width, length, self.group_size, self.window, batch, dtype_bytes
        )

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "group_size": self.group_size,
            "window": self.window,
            "layers": [[layer.k_bits, layer.v_bits] for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: object) -> PrecisionPlan:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise PrecisionError("a precision plan must be an object with a 'layers' list")
        if data.get("version") != FORMAT_VERSION:
            raise PrecisionError(f"unsupported precision plan version {data.get('version')!r}")
        pairs = data["layers"]
        if not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
            raise PrecisionError("precision plan layers must be [k_bits, v_bits] pairs")
        layers = tuple(LayerPrecision(*pair) for pair in pairs)
        return cls(layers, data.get("group_size", 32), data.get("window", 0))


# -- models ---------------------------------------------------------------------------------------


def check_latent_layers(plan: PrecisionPlan | None, latent: dict | None) -> None:
    """Latent layers (gqa.latent, `latent` their plan as stored in a config) quantize their latents
    like any cached kind: keys per channel over blocks of tokens, values per token in groups of
    `group_size` channels. Raise PrecisionError naming the first latent V whose rank the group
    size does not divide."""
    if plan is None or latent is None or plan.exact:
        return
    for i, (precision, ranks) in enumerate(zip(plan.layers, latent["layers"], strict=False)):
        v_rank = ranks[1]
        if v_rank is not None and precision.v_bits < 16 and v_rank % plan.group_size:
            raise PrecisionError(
                f"layer {i}: group_size {plan.group_size} does not divide the latent V rank "
                f"{v_rank}: values are quantized per token in groups of group_size channels"
            )


def model_precision(model: nn.Module) -> PrecisionPlan | None:
    """The precision plan a model carries, or None."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else PrecisionPlan.from_dict(data)


_GENERATION_CLASSES: dict[type, type] = {}


def _quantized_generation_class(cls: type) -> type:
    if issubclass(cls, QuantizedGenerationMixin):
        return cls
    if cls not in _GENERATION_CLASSES:
        _GENERATION_CLASSES[cls] = type(
            cls.__name__, (QuantizedGenerationMixin, cls), {"__module__": cls.__module__}
        )
    return _GENERATION_CLASSES[cls]


def apply_precision(model: nn.Module, plan: PrecisionPlan | None) -> nn.Module:
    """Give `model` (in place) the KV-cache precision `plan` and return it; None or an exact plan
    removes any precision. A stock model is first converted to its own grouping (exact), so that
    the grouped attention can simulate the quantized cache."""
    from gqa.adapters import get_adapter
    from gqa.surgery import convert, current_grouping, model_grouping

    adapter = get_adapter(model)
    if plan is not None:
        plan.check_model(adapter.num_layers, adapter.head_dim)
        check_latent_layers(plan, getattr(model.config, LATENT_KEY, None))
    if plan is None or plan.exact:
        for layer in range(adapter.num_layers):
            module = adapter.attention(layer)
            if hasattr(module, "hg_kv_quant"):
                del module.hg_kv_quant
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
        return model
    if model_grouping(model) is None:
        convert(model, current_grouping(model))
    for layer, precision in enumerate(plan.layers):
        adapter.attention(layer).hg_kv_quant = LayerQuantizer(
            precision.k_bits, precision.v_bits, plan.group_size, plan.window
        )
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    model.__class__ = _quantized_generation_class(type(model))
    return model


@contextmanager
def precision_applied(model: nn.Module, plan: PrecisionPlan | None) -> Iterator[nn.Module]:
    """`with precision_applied(model, plan) as m:` runs `m` (the model itself) with the cache
    precision `plan`; on exit the model gets back the precision and class it had."""
    previous, cls = model_precision(model), model.__class__
    apply_precision(model, plan)
    try:
        yield model
    finally:
        apply_precision(model, previous)
        model.__class__ = cls


def quantized_cache(model: nn.Module) -> QuantizedKVCache:
    """An empty real cache for `model`'s precision plan (16-bit layers when it has none)."""
    from gqa.adapters import get_adapter

    adapter = get_adapter(model)
    quantizers = [
        getattr(adapter.attention(layer), "hg_kv_quant", None) or LayerQuantizer(16, 16, 1, 0)
        for layer in range(adapter.num_layers)
    ]
    return QuantizedKVCache(quantizers)
