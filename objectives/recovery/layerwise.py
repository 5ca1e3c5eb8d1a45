"""`layerwise` recovery: fit each converted attention layer alone to the source layer's output.

By default (`inputs = "source"`) layer l trains on the source model's attention inputs of layer l
(calibration statistics), not on what the converted layers below it produce, so its fit depends
only on (layer, its grouping, the merge, the statistics, the config). Fits are therefore
independent across layers, seeded per layer, and stored by `LayerFitCache`: no layer grouping is
fitted twice, whether by the `recoverable` proxy in stage 1 or by stage-2 recovery.

With `inputs = "converted"` the layers are fitted in order, each on the attention inputs that the
converted model, its lower layers already fitted, produces on the calibration sequences, and still
to the source's outputs on the source's inputs (block reconstruction as in BRECQ, arXiv
2102.05426): a layer also learns to undo what the layers below it changed, so errors compound
less. Every layer is then fitted, including those whose grouping is the source's, and a fit
depends on the groupings below it too (the cache keys it by them).

Per layer, with y the converted attention output and y_src the source's on the same inputs:
  e(W) = ||y - y_src||^2 / ||y_src||^2    (the `local_attn` proxy's error)
  - the sampled calibration sequences are split: the last `holdout` fraction measure e, the others
    are fitted (so the reported error is on sequences the fit never saw);
  - Adam on the `train` projections for `steps` random batches of fitted sequences; e is measured
    every `check_every` steps and the best weights seen are kept, so a layer never ends worse than
    it started;
  - a layer whose held-out error is already at most `exact_tol` (its grouping is the source's) is
    left exactly as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import ModelAdapter, get_adapter
from gqa.assets import cache_dir
from gqa.grouping import LayerGrouping, write_atomic
from gqa.latent_model import model_latent
from gqa.precision import model_precision
from gqa.surgery import current_grouping
from objectives.calibration import CalibrationStats
from objectives.recovery.base import (
    RecoveryResult,
    check_projections,
    diverged,
    only_trainable,
    projection_params,
    register_recovery,
    restore,
    snapshot,
)

INPUTS = ("source", "converted")


@dataclass(frozen=True)
class LayerwiseConfig:
    """Per-layer local fit of the converted attention to the source attention."""

    steps: int = 100  # Adam steps per layer
    lr: float = 1e-3
    batch_size: int = 4  # calibration sequences per step
    train: tuple[str, ...] = ("k", "v")  # projections trained, a subset of q, k, v, o
    seed: int = 0
    holdout: float = 0.25  # share of the sampled sequences that measure the error, never fitted
    check_every: int = 10  # steps between held-out checks (the best weights seen are kept)
    exact_tol: float = 1e-10  # a layer at most this far from the source is not trained
    cache: bool = True  # store and reuse per-layer fits in $HEADGROUP_CACHE/layer_fits
    # Conjugate-gradient iterations on V alone before the Adam steps (0: none). With the queries
    # and keys fixed the output is linear in V's parameters, so this is least squares for V,
    # solved on all fitted sequences at once; needs "v" in `train`.
    v_solve: int = 0
    # Whose attention inputs each layer is fitted on: "source" (the calibration statistics) or
    # "converted" (the converted model's, its lower layers fitted first; see the module docstring).
    inputs: str = "source"

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(self.train))
        check_projections(self.train, "layerwise train")
        for name in ("steps", "batch_size", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"layerwise {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"layerwise lr must be positive, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"layerwise holdout must be in [0, 1), got {self.holdout}")
        if self.exact_tol < 0:
            raise ValueError(f"layerwise exact_tol must be >= 0, got {self.exact_tol}")
        if isinstance(self.v_solve, bool) or not isinstance(self.v_solve, int) or self.v_solve < 0:
            raise ValueError(f"layerwise v_solve must be an integer >= 0, got {self.v_solve!r}")
        if self.v_solve and "v" not in self.train:
            raise ValueError("layerwise v_solve needs 'v' in train (the solved V is the fit's)")
        if self.inputs not in INPUTS:
            raise ValueError(
                f"layerwise inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}"
            )

    def fit_key(self) -> dict[str, Any]:
        """The fields that change a fit (`cache` does not; `v_solve` and `inputs` only when not
        their defaults, so fits cached before they existed stay valid)."""
        data = asdict(self)
        data.pop("cache")
        if not data["v_solve"]:
            data.pop("v_solve")
        if data["inputs"] == "source":
            data.pop("inputs")
        return data


@dataclass
class LayerFit:
    """One layer's fit: held-out errors before and after, and the trained projection weights."""

    initial: float
    final: float
    steps: int
    seconds: float
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # "k.weight" -> tensor
    history: list[float] = field(default_factory=list)  # training loss per step

    @property
    def ratio(self) -> float:
        """final / initial: the share of the merge error that recovery leaves (0 for exact)."""
        return self.final / self.initial if self.initial > 0 else 0.0


def _module_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = next(module.parameters())
    return x.to(device=param.device, dtype=param.dtype)


def holdout_split(num_seqs: int, holdout: float) -> tuple[slice, slice]:
    """(fitted, held-out) slices of the sampled sequences; with one sequence, both are it."""
    held = min(num_seqs - 1, math.ceil(num_seqs * holdout)) if holdout > 0 else 0
    if held == 0:
        return slice(0, num_seqs), slice(0, num_seqs)
    return slice(0, num_seqs - held), slice(num_seqs - held, num_seqs)


@torch.no_grad()
def source_outputs(
    adapter: ModelAdapter, layer: int, inputs: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The source attention output of `layer` on `inputs` (n, T, d), float32."""
    module = adapter.attention(layer)
    return torch.cat(
        [adapter.attend(module, _module_input(module, x)).float() for x in inputs.split(batch_size)]
    )


class _Reached(Exception):
    """Raised by `converted_inputs`' hook: the layer's inputs are captured, stop the forward."""


@torch.no_grad()
def converted_inputs(
    model: nn.Module, adapter: ModelAdapter, layer: int, token_ids: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The attention inputs of `layer` when `model`, as it is now, runs on `token_ids` (n, T):
    (n, T, d) float32 on the CPU, like the calibration statistics' inputs. Each forward stops at
    the layer, so layer l costs l / L of a forward."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        captured.append(x.detach().float().cpu())
        raise _Reached

    device = next(model.parameters()).device
    handle = adapter.attention(layer).register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in token_ids.split(batch_size):
            with contextlib.suppress(_Reached):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


@torch.no_grad()
def relative_error(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: torch.Tensor,  # (n, T, d)
    target: torch.Tensor,  # (n, T, d), float32
    batch_size: int,
) -> float:
    """||y - y_src||^2 / ||y_src||^2 over all of `inputs`."""
    err = norm = 0.0
    for x, y in zip(inputs.split(batch_size), target.split(batch_size), strict=True):
        out = adapter.attend(module, _module_input(module, x)).float()
        y = y.to(out.device)
        err += float((out - y).pow(2).sum())
        norm += float(y.pow(2).sum())
    return err / norm


def fit_layer(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: torch.Tensor,  # (n, T, d) source attention inputs of this layer
    target: torch.Tensor,  # (n, T, d) source attention outputs, float32
    config: LayerwiseConfig,
    layer: int,
) -> LayerFit:
    """Train `module`'s `config.train` projections in place (see the module docstring) and return
    the fit; the module ends with the best weights seen on the held-out sequences."""
    start = time.perf_counter()
    names = config.train
    params = [p for which in names for p in _projection(module, adapter, which).parameters()]
    fitted, held = holdout_split(inputs.shape[0], config.holdout)
    fit_x, fit_y = inputs[fitted], target[fitted]
    initial = best = relative_error(module, adapter, inputs[held], target[held], config.batch_size)
    history: list[float] = []
    steps = 0
    if not math.isfinite(initial):
        raise diverged(f"layerwise layer {layer} before training", initial, config.lr)
    if initial > config.exact_tol:
        best_weights = snapshot(params)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + layer)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        where = f"layerwise layer {layer}"
        try:
            if config.v_solve:
                values = list(_projection(module, adapter, "v").parameters())
                with only_trainable(module, values):
                    history += solve_values(module, adapter, fit_x, fit_y, values, config)
                error = relative_error(
                    module, adapter, inputs[held], target[held], config.batch_size
                )
                if error < best:
                    best, best_weights = error, snapshot(params)
            with only_trainable(module, params):
                for step in range(config.steps):
                    rows = torch.randperm(fit_x.shape[0], generator=generator)[: config.batch_size]
                    y_src = fit_y[rows].to(params[0].device)
                    y = adapter.attend(module, _module_input(module, fit_x[rows])).float()
                    loss = (y - y_src).pow(2).sum() / y_src.pow(2).sum()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise diverged(f"{where} step {step + 1}", value, config.lr)
                    history.append(value)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if steps % config.check_every == 0 or steps == config.steps:
                        error = relative_error(
                            module, adapter, inputs[held], target[held], config.batch_size
                        )
                        if error < best:
                            best, best_weights = error, snapshot(params)
        finally:
            restore(params, best_weights)  # the best seen, or the start on any failure
    weights = {
        f"{which}.{name}": p.detach().cpu().clone()
        for which in names
        for name, p in _projection(module, adapter, which).named_parameters()
    }
    return LayerFit(initial, best, steps, time.perf_counter() - start, weights, history)


def solve_values(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: torch.Tensor,  # (n, T, d) fitted sequences
    target: torch.Tensor,  # (n, T, d) source outputs, float32
    values: list[nn.Parameter],  # V's parameters (weight, bias if any)
    config: LayerwiseConfig,
) -> list[float]:
    """Least squares for V with everything else fixed, by `config.v_solve` conjugate-gradient
    steps on f(V) = sum ||y(V) - y_src||^2 / sum ||y_src||^2, which is quadratic because y is
    affine in V. Along a direction p: f(V + a p) = f(V) + a <g, p> + a^2 ||L p||^2 / Y with
    L p = y(V + p) - y(V) (probed at a step of V's own scale, then restored exactly), so the
    exact step is a = -<g, p> Y / (2 ||L p||^2); Polak-Ribiere directions, restarted along
    -g when one is no descent. Updates `values` in place; returns f before each step."""
    size = config.batch_size
    norm = float(target.pow(2).sum())
    batches = list(zip(inputs.split(size), target.split(size), strict=True))
    scale = math.sqrt(sum(float(v.detach().float().pow(2).sum()) for v in values)) or 1.0

    def dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
        return sum(float((x.float() * y.float()).sum()) for x, y in zip(xs, ys, strict=True))

    def gradient() -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        loss, outs = 0.0, []
        grads = [torch.zeros_like(v) for v in values]
        for x, y in batches:
            out = adapter.attend(module, _module_input(module, x)).float()
            part = (out - y.to(out.device)).pow(2).sum() / norm
            for total, g in zip(grads, torch.autograd.grad(part, values), strict=True):
                total += g
            loss += float(part.detach())
            outs.append(out.detach())
        return loss, grads, outs

    def curvature(direction: list[torch.Tensor], base: list[torch.Tensor]) -> float:
        """||L p||^2, probing y at V + s p with ||s p|| = ||V|| (so the probe is well above
        V's rounding in any dtype), then putting V back bit for bit."""
        length = math.sqrt(dot(direction, direction))
        s = scale / length
        start = [v.detach().clone() for v in values]
        with torch.no_grad():
            try:
                for v, p in zip(values, direction, strict=True):
                    v.add_(p, alpha=s)
                moved = [
                    adapter.attend(module, _module_input(module, x)).float() for x, _ in batches
                ]
            finally:
                for v, v0 in zip(values, start, strict=True):
                    v.copy_(v0)
        change = sum(float((a - b).pow(2).sum()) for a, b in zip(moved, base, strict=True))
        return change / (s * s)

    losses: list[float] = []
    loss, grad, base = gradient()
    direction = [-g for g in grad]
    for _ in range(config.v_solve):
        losses.append(loss)
        slope = dot(grad, direction)
        if not slope < 0:  # the conjugate direction climbs: restart along the gradient
            direction = [-g for g in grad]
            slope = dot(grad, direction)
        if not slope < 0:  # zero gradient: solved
            break
        bend = curvature(direction, base)
        if not bend > 0:
            break
        step = -slope * norm / (2.0 * bend)
        with torch.no_grad():
            for v, p in zip(values, direction, strict=True):
                v.add_(p, alpha=step)
        new_loss, new_grad, base = gradient()
        if not math.isfinite(new_loss):
            raise diverged("layerwise v_solve", new_loss, config.lr)
        beta = dot(new_grad, [n - g for n, g in zip(new_grad, grad, strict=True)]) / dot(grad, grad)
        direction = [-n + max(beta, 0.0) * p for n, p in zip(new_grad, direction, strict=True)]
        loss, grad = new_loss, new_grad
    return losses


def _projection(module: nn.Module, adapter: ModelAdapter, which: str) -> nn.Module:
    return adapter.module_projection(module, which)


@torch.no_grad()
def load_fit(module: nn.Module, adapter: ModelAdapter, fit: LayerFit) -> None:
    """Copy a fit's trained weights into `module` (a layer converted to the fit's grouping)."""
    for key, value in fit.weights.items():
        which, name = key.split(".", 1)
        param = getattr(_projection(module, adapter, which), name)
        if param.shape != value.shape:
            raise ValueError(f"cached fit {key} has shape {tuple(value.shape)}, not {param.shape}")
        param.copy_(value.to(param.device, param.dtype))


# --------------------------------------------------------------------------------------------
# The on-disk cache of per-layer fits


def stats_fingerprint(stats: CalibrationStats) -> str:
    """A cheap identity of calibration statistics: their config, model and a few of their values."""
    digest = hashlib.sha1()
    digest.update(json.dumps([stats.model, asdict(stats.config), stats.tokens]).encode())
    for layer in (stats.layers[0], stats.layers[-1]):
        digest.update(layer.mean.double().numpy().tobytes())
        digest.update(layer.inputs.reshape(-1)[:4096].double().numpy().tobytes())
    return digest.hexdigest()[:16]


class LayerFitCache:
    """Per-layer fits on disk, one safetensors file each, under a folder keyed by (statistics,
    merge, config). Written atomically, so concurrent workers at worst fit a layer twice."""

    def __init__(
        self,
        stats: CalibrationStats,
        merge: str,
        config: LayerwiseConfig,
        root: Path | None = None,
        precision: dict | None = None,
        latent: dict | None = None,
    ):
        fields = {"stats": stats_fingerprint(stats), "merge": merge, "fit": config.fit_key()}
        if precision is not None:  # fitted through a quantized cache: other fits
            fields["precision"] = precision
        if latent is not None:  # latent layers (gqa.latent): other modules, other fits
            fields["latent"] = latent
        key = json.dumps(fields, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.folder = (root or cache_dir() / "layer_fits") / digest
        self.hits = self.misses = 0

    def path(
        self, layer: int, grouping: LayerGrouping, below: list[LayerGrouping] | None = None
    ) -> Path:
        """The fit's file; `below` (the groupings of the layers under it) is part of the key
        for fits on the converted model's inputs, which depend on them."""
        text = json.dumps([grouping.k, grouping.v])
        if below is not None:
            text += json.dumps([[g.k, g.v] for g in below])
        return (
            self.folder / f"{layer:03d}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.safetensors"
        )

    def get(
        self, layer: int, grouping: LayerGrouping, below: list[LayerGrouping] | None = None
    ) -> LayerFit | None:
        path = self.path(layer, grouping, below)
        if not path.is_file():
            self.misses += 1
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            weights = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        self.hits += 1
        return LayerFit(
            float(meta["initial"]),
            float(meta["final"]),
            int(meta["steps"]),
            float(meta["seconds"]),
            weights,
        )

    def put(
        self,
        layer: int,
        grouping: LayerGrouping,
        fit: LayerFit,
        below: list[LayerGrouping] | None = None,
    ) -> None:
        meta = {
            "initial": repr(fit.initial),
            "final": repr(fit.final),
            "steps": str(fit.steps),
            "seconds": repr(fit.seconds),
        }
        weights = {k: v.contiguous() for k, v in fit.weights.items()}
        write_atomic(
            self.path(layer, grouping, below), lambda tmp: save_file(weights, tmp, metadata=meta)
        )


# --------------------------------------------------------------------------------------------
# The recovery method


def check_stats(stats: CalibrationStats | None, num_layers: int) -> CalibrationStats:
    if stats is None:
        raise ValueError("recovery 'layerwise' needs calibration statistics (stats=...)")
    if len(stats.layers) != num_layers or stats.layers[0].inputs.numel() == 0:
        raise ValueError(
            "calibration statistics must hold attention inputs for every layer "
            "(CalibrationConfig.sample_seqs >= 1)"
        )
    return stats


@register_recovery("layerwise", LayerwiseConfig)
def layerwise(
    converted: nn.Module,
    source: nn.Module,
    tokenizer: Any,
    stats: CalibrationStats | None,
    config: LayerwiseConfig,
    progress: bool = True,
    *,
    merge: str | None = None,
) -> RecoveryResult:
    """Fit every layer of `converted` (see the module docstring). The result's losses are sums
    over layers of the held-out relative errors before and after. With `merge` (the merge the
    model was converted with) and `config.cache`, fits are read from and written to
    `LayerFitCache`. On any failure every trained projection is restored."""
    a, s = get_adapter(converted), get_adapter(source)
    if (a.num_layers, a.num_heads) != (s.num_layers, s.num_heads):
        raise ValueError("the converted and source models differ in layers or heads")
    stats = check_stats(stats, a.num_layers)
    # With a precision plan the attention simulates the quantized cache (straight-through), so
    # each layer is fitted to the source's exact output through its low-bit cache.
    plan = model_precision(converted)
    key = None if plan is None else plan.to_dict()
    latent = model_latent(converted)
    cache = (
        LayerFitCache(
            stats, merge, config, precision=key, latent=None if latent is None else latent.to_dict()
        )
        if merge and config.cache
        else None
    )
    grouping = current_grouping(converted)
    start = time.perf_counter()
    all_params = [p for i in range(a.num_layers) for p in projection_params(a, i, config.train)]
    saved = snapshot(all_params)
    layer_losses: list[tuple[float, float]] = []
    history: list[float] = []
    steps = 0
    bar = tqdm(range(a.num_layers), desc="layerwise recovery", disable=not progress)
    try:
        for layer in bar:
            module, lg = a.attention(layer), grouping.layers[layer]
            below = grouping.layers[:layer] if config.inputs == "converted" else None
            fit = cache.get(layer, lg, below) if cache else None
            if fit is not None:
                load_fit(module, a, fit)
            else:
                source_inputs = stats.layers[layer].inputs
                target = source_outputs(s, layer, source_inputs, config.batch_size)
                inputs = (
                    converted_inputs(converted, a, layer, stats.token_ids, config.batch_size)
                    if config.inputs == "converted"
                    else source_inputs
                )
                with only_trainable(converted, []):  # fit_layer enables only its own params
                    fit = fit_layer(module, a, inputs, target, config, layer)
                if cache:
                    cache.put(layer, lg, fit, below)
            layer_losses.append((fit.initial, fit.final))
            history += fit.history
            steps += fit.steps
            bar.set_postfix(layer=layer, initial=f"{fit.initial:.3g}", final=f"{fit.final:.3g}")
    except BaseException:
        restore(all_params, saved)
        raise
    return RecoveryResult(
        method="layerwise",
        seconds=time.perf_counter() - start,
        steps=steps,
        initial_loss=sum(i for i, _ in layer_losses),
        final_loss=sum(f for _, f in layer_losses),
        trainable_parameters=sum(p.numel() for p in all_params),
        layer_losses=layer_losses,
        history=history,
    )
