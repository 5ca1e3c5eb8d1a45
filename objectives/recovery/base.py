"""The recovery registry and what every method shares: results, errors, parameter bookkeeping.

A recovery method trains a converted model's projections back towards the source model, in place,
keeping its grouping. It is a function registered by name with `@register_recovery(name,
ConfigClass)`; `recover` selects it and builds its config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gqa.adapters import ModelAdapter
from objectives.calibration import CalibrationStats

PROJECTIONS = ("q", "k", "v", "o")


class RecoveryDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the model's weights are restored."""


@dataclass
class RecoveryResult:
    """What a recovery run did. Losses are the method's own objective (see each method)."""

    method: str
    seconds: float
    steps: int
    initial_loss: float
    final_loss: float
    trainable_parameters: int
    layer_losses: list[tuple[float, float]] = field(default_factory=list)  # (initial, final)
    history: list[float] = field(default_factory=list)  # the training loss at each step


@dataclass(frozen=True)
class RecoveryMethod:
    name: str
    run: Callable[..., RecoveryResult]
    config_class: type


RECOVERIES: dict[str, RecoveryMethod] = {}


def register_recovery(name: str, config_class: type) -> Callable:
    """Decorator: register `fn(converted, source, tokenizer, stats, config, progress, *, merge)`
    as `name`."""

    def decorate(fn: Callable[..., RecoveryResult]) -> Callable[..., RecoveryResult]:
        RECOVERIES[name] = RecoveryMethod(name, fn, config_class)
        return fn

    return decorate


def get_recovery(name: str) -> RecoveryMethod:
    if name not in RECOVERIES:
        raise ValueError(
            f"unknown recovery method {name!r} (available: {', '.join(sorted(RECOVERIES))})"
        )
    return RECOVERIES[name]


def recovery_config(method: str, config: object | Mapping[str, Any] | None = None) -> object:
    """`method`'s config dataclass from a config object, a mapping of its fields, or None."""
    entry = get_recovery(method)
    if config is None:
        return entry.config_class()
    if isinstance(config, Mapping):
        return entry.config_class(**config)
    if not isinstance(config, entry.config_class):
        raise TypeError(
            f"recovery {method!r} takes a {entry.config_class.__name__}, "
            f"got {type(config).__name__}"
        )
    return config


def recover(
    method: str,
    converted_model: nn.Module,
    source_model: nn.Module,
    tokenizer: Any = None,
    stats: CalibrationStats | None = None,
    config: object | Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
    merge: str | None = None,
) -> RecoveryResult:
    """Train `converted_model` in place with `method`; `config` is the method's config dataclass,
    a mapping of its fields (e.g. from a TOML file), or None for the defaults. `merge`, the merge
    the model was converted with, lets a method reuse work cached for that starting point."""
    entry = get_recovery(method)
    config = recovery_config(method, config)
    if converted_model is source_model:
        raise ValueError("recovery needs the source model and the converted model as two objects")
    return entry.run(converted_model, source_model, tokenizer, stats, config, progress, merge=merge)


# --------------------------------------------------------------------------------------------
# Shared helpers


def check_projections(names: tuple[str, ...], what: str) -> None:
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        raise ValueError(
            f"{what} must be a non-empty subset of {PROJECTIONS}, got {tuple(names)!r}"
        )


def projection_params(adapter: ModelAdapter, layer: int, names: tuple[str, ...]) -> list:
    return [p for which in names for p in adapter.projection(layer, which).parameters()]


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` only; every parameter's requires_grad is restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, value in zip(params, saved, strict=True):
        p.copy_(value)


def diverged(where: str, value: float, lr: float) -> RecoveryDivergedError:
    return RecoveryDivergedError(
        f"{where}: the loss became {value}; try a lower learning rate than {lr:g} "
        "(the model's weights were restored)"
    )
