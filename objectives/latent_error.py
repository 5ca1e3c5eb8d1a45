"""What making one layer's K or V latent at rank r costs (gqa.latent), in two measures.

closed   the whitened SVD's closed form: E||W x - B A x||^2 / E||W x||^2 for the layer's K (or V)
         projection W over the calibration inputs, the energy of the dropped singular values
         (gqa.latent.LowRankFactors.dropped_energy). Free once the SVD is done: every rank at once.
errors   the allocation's units (objectives.kv_quant_error): the layer's attention runs standalone
         on the calibration input sequences, exact and with only that kind latent at rank r, and
         the change of its output in the residual stream is weighted by the Fisher matrix of the
         loss gradient there. Keys pass through RoPE and the softmax, which the closed form does
         not see, so this is the one the allocation sums over layers and kinds.
quantized  with `bits`, the `errors` measure with the latent also quantized (gqa.kv_quant: a latent
         K per channel over blocks of tokens, a latent V per token in groups of channels), so
         that the allocation can trade rank against bits (Palu's low rank with quantization).
A rank at the projection's full width costs 0 in both (the layer is exact).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import get_adapter
from gqa.kv_quant import LayerQuantizer
from gqa.latent import LatentLayer, check_family, convert_module, whitened_svd
from objectives.calibration import CalibrationStats
from objectives.kv_quant_error import (
    KINDS,
    _grouped,
    _weighted,
    rows_from_json,
    rows_to_json,
    scaled_rows,
)


@dataclass(frozen=True)
class LatentErrorTable:
    """Per layer and kind ('k', 'v'): `errors[l][kind][rank]` (allocation units) and
    `closed[l][kind][rank]` (relative projection error) for the measured ranks, and
    `widths[l][kind]`, the values the kind caches per token at full width (errors 0 there).
    `quantized[l][kind][(rank, bits)]` is the error with the latent also quantized to `bits`
    (gqa.kv_quant, groups of `group_size`, `window` recent tokens exact), for the ranks below the
    width that the layout allows (a latent V's rank must be a multiple of the group size)."""

    errors: tuple[dict[str, dict[int, float]], ...]
    closed: tuple[dict[str, dict[int, float]], ...]
    widths: tuple[dict[str, int], ...]
    quantized: tuple[dict[str, dict[tuple[int, int], float]], ...] = ()
    group_size: int = 64
    window: int = 0

    def ranks(self, layer: int, kind: str) -> list[int]:
        """The ranks measured for this layer and kind, full width included, ascending."""
        return sorted(self.errors[layer][kind])

    def options(self, layer: int, kind: str) -> list[tuple[int, int, float]]:
        """(rank, bits, error) of every measured latent setting of this layer and kind: each rank
        at 16 bits (the full width keeps the kind on its heads), then the quantized latents."""
        out = [(rank, 16, self.errors[layer][kind][rank]) for rank in self.ranks(layer, kind)]
        if self.quantized:
            out += [(r, b, e) for (r, b), e in sorted(self.quantized[layer][kind].items())]
        return out

    def scaled(self, factor: float) -> LatentErrorTable:
        """The same table with every allocation error multiplied by `factor` (other units);
        the relative projection errors (`closed`) stay."""
        return dataclasses.replace(
            self,
            errors=scaled_rows(self.errors, factor),
            quantized=scaled_rows(self.quantized, factor),
        )

    def to_json(self) -> dict:
        """The table as JSON values (`from_json` reads it back exactly)."""
        return {
            "errors": rows_to_json(self.errors),
            "closed": rows_to_json(self.closed),
            "widths": [dict(row) for row in self.widths],
            "quantized": rows_to_json(self.quantized),
            "group_size": self.group_size,
            "window": self.window,
        }

    @classmethod
    def from_json(cls, data: dict) -> LatentErrorTable:
        return cls(
            errors=rows_from_json(data["errors"]),
            closed=rows_from_json(data["closed"]),
            widths=tuple({kind: int(w) for kind, w in row.items()} for row in data["widths"]),
            quantized=rows_from_json(data["quantized"]),
            group_size=int(data["group_size"]),
            window=int(data["window"]),
        )


def quantizable(kind: str, rank: int, group_size: int) -> bool:
    """Whether a latent of `rank` can be quantized in groups of `group_size` (values are grouped
    by channel per token; keys by token per channel, any rank)."""
    return kind == "k" or rank % group_size == 0


def _output_error(adapter, module: nn.Module, x, exact: torch.Tensor, fisher) -> float:
    """The Fisher-weighted change of the attention output (objectives.kv_quant_error units)."""
    return _weighted(adapter.attend(module, x).double() - exact, fisher)


@torch.no_grad()
def latent_errors(
    model: nn.Module,
    stats: CalibrationStats,
    ranks: Sequence[int],
    progress: bool = False,
    bits: Sequence[int] = (),
    group_size: int = 64,
    window: int = 0,
) -> LatentErrorTable:
    """The table of `model` (stock or converted, not latent) at `ranks` (those below a layer's
    width are measured; the full width is always in), and with `bits` (< 16) each latent also
    quantized at those bits."""
    model = _grouped(model)
    adapter = get_adapter(model)
    check_family(model.config.model_type)
    rotary = adapter._get(adapter.rotary_path)
    param = next(model.parameters())
    bits = sorted({int(b) for b in bits if b < 16})
    errors, closed, widths, quantized = [], [], [], []
    for layer in tqdm(range(adapter.num_layers), desc="latent error", disable=not progress):
        module = adapter.attention(layer)
        layer_stats = stats.layers[layer]
        x = layer_stats.inputs.to(param.device, param.dtype)
        gram = layer_stats.gram.to(param.device)
        exact = adapter.attend(module, x).double()
        row_errors: dict[str, dict[int, float]] = {}
        row_closed: dict[str, dict[int, float]] = {}
        row_widths: dict[str, int] = {}
        row_quantized: dict[str, dict[tuple[int, int], float]] = {}
        for kind in KINDS:
            weight = adapter.projection(layer, kind).weight
            width = weight.shape[0]
            factors = whitened_svd(weight, gram)  # once: every rank below reuses it
            energy = factors.dropped_energy()
            row_widths[kind] = width
            row_errors[kind] = {width: 0.0}
            row_closed[kind] = {width: 0.0}
            row_quantized[kind] = {}
            for rank in sorted({int(r) for r in ranks if 0 < r < width}):
                ranks_of = {"k_rank": rank} if kind == "k" else {"v_rank": rank}
                latent = convert_module(
                    copy.deepcopy(module),
                    LatentLayer(**ranks_of),
                    adapter.num_heads,
                    rotary,
                    gram,
                    {kind: factors},
                )
                measure = (adapter, latent, x, exact, layer_stats.grad)
                row_errors[kind][rank] = _output_error(*measure)
                row_closed[kind][rank] = float(energy[rank] / energy[0])
                if not quantizable(kind, rank, group_size):
                    continue
                for b in bits:
                    latent.hg_kv_quant = LayerQuantizer(
                        *((b, 16) if kind == "k" else (16, b)), group_size, window
                    )
                    row_quantized[kind][rank, b] = _output_error(*measure)
        errors.append(row_errors)
        closed.append(row_closed)
        widths.append(row_widths)
        quantized.append(row_quantized)
    return LatentErrorTable(
        tuple(errors),
        tuple(closed),
        tuple(widths),
        tuple(quantized) if bits else (),
        group_size,
        window,
    )
