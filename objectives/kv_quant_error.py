"""The KV-quantization proxy: what quantizing one layer's cached K (or V) to b bits costs.

For layer l, kind K or V and bits b, the layer's attention runs standalone on the calibration
inputs x (n sequences, T tokens) twice: exact, and with only that kind's cache quantized (the
simulated cache of gqa.kv_quant: RoPE'd keys per channel over token blocks, values per token).
With Delta the difference of the two outputs (in the residual stream, after o_proj) and F the
Fisher matrix E[g g^T] of the loss gradient at that output (calibration statistics):

    error(l, kind, b) = sum over tokens of Delta_t^T F Delta_t / number of sequences

the second-order estimate of the loss increase (the `fisher` proxy's weighting). It is computed
per (layer, kind) with the other kind exact, so the model's error is approximated by the sum over
layers and kinds: the decomposition the byte allocation (search.byte_allocation) optimises
exactly. The table is computed once per model, grouping and group size: one pass per layer
computes the projections and RoPE once and attends with each setting in turn (the output
projection is linear, so Delta is W_o times the change of the attention output).
`grouping_errors` gives, in the same units, what each layer of a converted model costs against
the source's at 16 bits, so that grouping and precision can be allocated together layer by layer
(search.byte_allocation.allocate_joint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import gqa
from gqa.adapters import get_adapter
from gqa.kv_quant import LayerQuantizer
from gqa.precision import QUANTIZED_BITS, PrecisionPlan
from objectives.calibration import CalibrationStats

KINDS = ("k", "v")


@dataclass(frozen=True)
class QuantErrorTable:
    """errors[l][kind][bits]: the proxy error of quantizing only `kind` of layer l to `bits`
    (16 bits: 0). Also the cached head counts it was measured with."""

    errors: tuple[dict[str, dict[int, float]], ...]
    k_heads: tuple[int, ...]
    v_heads: tuple[int, ...]
    group_size: int
    window: int

    def plan_error(self, plan: PrecisionPlan) -> float:
        """The decomposed error of a whole plan (sum over layers and kinds)."""
        return sum(
            self.errors[layer]["k"][p.k_bits] + self.errors[layer]["v"][p.v_bits]
            for layer, p in enumerate(plan.layers)
        )

    def scaled(self, factor: float) -> QuantErrorTable:
        """The same table with every error multiplied by `factor` (other units)."""
        return dataclasses.replace(self, errors=scaled_rows(self.errors, factor))

    def to_json(self) -> dict:
        """The table as JSON values (`from_json` reads it back exactly)."""
        return {
            "errors": rows_to_json(self.errors),
            "k_heads": list(self.k_heads),
            "v_heads": list(self.v_heads),
            "group_size": self.group_size,
            "window": self.window,
        }

    @classmethod
    def from_json(cls, data: dict) -> QuantErrorTable:
        return cls(
            errors=rows_from_json(data["errors"]),
            k_heads=tuple(data["k_heads"]),
            v_heads=tuple(data["v_heads"]),
            group_size=int(data["group_size"]),
            window=int(data["window"]),
        )


def scaled_rows(rows: Sequence[dict[str, dict]], factor: float) -> tuple[dict[str, dict], ...]:
    """Per-layer error rows (row[kind][setting] -> error) with every error times `factor`."""
    return tuple(
        {kind: {key: factor * e for key, e in errors.items()} for kind, errors in row.items()}
        for row in rows
    )


def rows_to_json(rows: Sequence[dict[str, dict]]) -> list[dict[str, list]]:
    """Per-layer error rows as JSON values: each kind's settings as [setting, error] pairs, a
    tuple setting (rank, bits) as a list (JSON objects key by strings only)."""
    return [
        {
            kind: [[list(key) if isinstance(key, tuple) else key, e] for key, e in errors.items()]
            for kind, errors in row.items()
        }
        for row in rows
    ]


def rows_from_json(rows: Sequence[dict[str, list]]) -> tuple[dict[str, dict], ...]:
    """`rows_to_json` read back: list settings become tuples again."""
    return tuple(
        {
            kind: {tuple(key) if isinstance(key, list) else key: float(e) for key, e in pairs}
            for kind, pairs in row.items()
        }
        for row in rows
    )


def _weighted(delta: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """sum over tokens of delta^T F delta, per sequence (squared norm without a Fisher matrix)."""
    flat = delta.flatten(0, 1)
    if fisher is None:
        return float(flat.pow(2).sum()) / delta.shape[0]
    return float(torch.einsum("nd,de,ne->", flat, fisher.to(flat), flat)) / delta.shape[0]


def _grouped(model: nn.Module) -> nn.Module:
    """`model` itself when converted, else an exact converted copy (the grouped attention
    functions are the ones that simulate the cache)."""
    if gqa.model_grouping(model) is None:
        return gqa.converted_copy(model, gqa.current_grouping(model))
    return model


@torch.no_grad()
def grouping_errors(
    model: nn.Module, source: nn.Module, stats: CalibrationStats
) -> tuple[float, ...]:
    """Per layer, the same weighted error for `model`'s attention layer (its grouping and
    recovered weights) against the source's, both on the source's calibration inputs at 16 bits:
    what choosing this layer costs before its cache is quantized (0 where they are equal)."""
    model, source = _grouped(model), _grouped(source)
    adapter, reference = get_adapter(model), get_adapter(source)
    param = next(model.parameters())
    errors = []
    for layer in range(adapter.num_layers):
        x = stats.layers[layer].inputs.to(param.device, param.dtype)
        delta = (
            adapter.attend(adapter.attention(layer), x).double()
            - reference.attend(reference.attention(layer), x).double()
        )
        errors.append(_weighted(delta, stats.layers[layer].grad))
    return tuple(errors)


class _Sweep(LayerQuantizer):
    """Installed as a module's cache precision for one forward pass: the grouped attention
    function hands it the layer's queries and (RoPE'd) keys and values on their KV heads, and it
    attends with each (kind, bits) setting quantized in turn, keeping every output (B, S, H, D)
    and the exact one."""

    def __init__(self, settings: list[tuple[str, int]], group_size: int, window: int):
        super().__init__(2, 2, group_size, window)  # not exact: the attention function calls it
        self.settings = settings
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.exact_output: torch.Tensor | None = None

    def fake_quantize(self, key: torch.Tensor, value: torch.Tensor):
        return key, value  # each setting quantizes in `attend`

    def attend(self, query, key, value, key_q, value_q, attention_mask, scaling, heads=None):
        exact = LayerQuantizer(16, 16, self.group_size, self.window)
        self.exact_output = exact.attend(
            query, key, value, key, value, attention_mask, scaling, heads
        )
        for kind, b in self.settings:
            quant = LayerQuantizer(
                *((b, 16) if kind == "k" else (16, b)), self.group_size, self.window
            )
            k_q, v_q = quant.fake_quantize(key, value)
            self.outputs[kind, b] = quant.attend(
                query, key, value, k_q, v_q, attention_mask, scaling, heads
            )
        return self.exact_output


@torch.no_grad()
def kv_quant_errors(
    model: nn.Module,
    stats: CalibrationStats,
    bits: Sequence[int] = QUANTIZED_BITS,
    group_size: int = 32,
    window: int = 0,
    progress: bool = False,
) -> QuantErrorTable:
    """The error table of `model` (stock or converted; its own grouping and weights)."""
    model = _grouped(model)
    adapter = get_adapter(model)
    PrecisionPlan.uniform(adapter.num_layers, *(max(bits),) * 2, group_size, window).check_model(
        adapter.num_layers, adapter.head_dim
    )
    grouping = gqa.model_grouping(model)
    param = next(model.parameters())
    settings = [(kind, int(b)) for kind in KINDS for b in bits]
    errors = []
    for layer in tqdm(
        range(adapter.num_layers), desc="KV quantization error", disable=not progress
    ):
        module = adapter.attention(layer)
        x = stats.layers[layer].inputs.to(param.device, param.dtype)
        sweep = _Sweep(settings, group_size, window)
        saved = getattr(module, "hg_kv_quant", None)
        try:
            module.hg_kv_quant = sweep
            adapter.attend(module, x)  # one pass: projections and RoPE computed once
        finally:
            if saved is None:
                del module.hg_kv_quant
            else:
                module.hg_kv_quant = saved
        w_o = adapter.output_weight(layer).detach().double()  # (d, H * D); its bias cancels
        row: dict[str, dict[int, float]] = {kind: {16: 0.0} for kind in KINDS}
        for (kind, b), out in sweep.outputs.items():
            delta = (out - sweep.exact_output).flatten(
                2
            ).double() @ w_o.T  # the residual-stream change
            row[kind][b] = _weighted(delta, stats.layers[layer].grad)
        errors.append(row)
    return QuantErrorTable(
        tuple(errors),
        tuple(len(layer.k) for layer in grouping.layers),
        tuple(len(layer.v) for layer in grouping.layers),
        group_size,
        window,
    )
