"""What making one layer's K or V latent at rank r costs (gqa.latent), in two measures.

closed   the whitened SVD's closed form: E||W x - B A x||^2 / E||W x||^2 for the layer's K (or V)
         projection W over the calibration inputs, the energy of the dropped singular values
         (gqa.latent.LowRankFactors.dropped_energy). Free once the SVD is done: every rank at once.
errors   the allocation's units (objectives.kv_quant_error): the layer's attention runs standalone
         on the calibration input sequences, exact and with only that kind latent at rank r, and
         the change of its output in the residual stream is weighted by the Fisher matrix of the
         loss gradient there. Keys pass through RoPE and the softmax, which the closed form does
         not see, so this is the one the allocation sums over layers and kinds.
A rank at the projection's full width costs 0 in both (the layer is exact).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import get_adapter
from gqa.latent import LatentLayer, check_family, convert_module, whitened_svd
from objectives.calibration import CalibrationStats
from objectives.kv_quant_error import KINDS, _grouped, _weighted


@dataclass(frozen=True)
class LatentErrorTable:
    """Per layer and kind ('k', 'v'): `errors[l][kind][rank]` (allocation units) and
    `closed[l][kind][rank]` (relative projection error) for the measured ranks, and
    `widths[l][kind]`, the values the kind caches per token at full width (errors 0 there)."""

    errors: tuple[dict[str, dict[int, float]], ...]
    closed: tuple[dict[str, dict[int, float]], ...]
    widths: tuple[dict[str, int], ...]

    def ranks(self, layer: int, kind: str) -> list[int]:
        """The ranks measured for this layer and kind, full width included, ascending."""
        return sorted(self.errors[layer][kind])


@torch.no_grad()
def latent_errors(
    model: nn.Module,
    stats: CalibrationStats,
    ranks: Sequence[int],
    progress: bool = False,
) -> LatentErrorTable:
    """The table of `model` (stock or converted, not latent) at `ranks` (those below a layer's
    width are measured; the full width is always in)."""
    model = _grouped(model)
    adapter = get_adapter(model)
    check_family(model.config.model_type)
    rotary = adapter._get(adapter.rotary_path)
    param = next(model.parameters())
    errors, closed, widths = [], [], []
    for layer in tqdm(range(adapter.num_layers), desc="latent error", disable=not progress):
        module = adapter.attention(layer)
        layer_stats = stats.layers[layer]
        x = layer_stats.inputs.to(param.device, param.dtype)
        gram = layer_stats.gram.to(param.device)
        exact = adapter.attend(module, x).double()
        row_errors: dict[str, dict[int, float]] = {}
        row_closed: dict[str, dict[int, float]] = {}
        row_widths: dict[str, int] = {}
        for kind in KINDS:
            weight = adapter.projection(layer, kind).weight
            width = weight.shape[0]
            factors = whitened_svd(weight, gram)  # once: every rank below reuses it
            energy = factors.dropped_energy()
            row_widths[kind] = width
            row_errors[kind] = {width: 0.0}
            row_closed[kind] = {width: 0.0}
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
                delta = adapter.attend(latent, x).double() - exact
                row_errors[kind][rank] = _weighted(delta, layer_stats.grad)
                row_closed[kind][rank] = float(energy[rank] / energy[0])
        errors.append(row_errors)
        closed.append(row_closed)
        widths.append(row_widths)
    return LatentErrorTable(tuple(errors), tuple(closed), tuple(widths))
