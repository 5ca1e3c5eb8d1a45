"""Recovery after conversion: train a converted model's projections back towards the source model.

layerwise  per layer, fit the chosen attention projections so the converted attention layer's
           output matches the source layer's output on the calibration inputs (no end-to-end pass)
finetune   end-to-end causal-LM training on the train split with transformers' `Trainer`,
           optionally distilling the source model's logits, optionally through merged LoRA
Both train the converted model in place and keep its grouping. A method is a function registered
by name with `@register_recovery(name, ConfigClass)`; `recover` selects it.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import ModelAdapter, get_adapter
from gqa.surgery import model_grouping
from objectives.calibration import CalibrationStats
from objectives.data import TextSpec, token_windows

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


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class RecoveryMethod:
    name: str
    run: Callable[..., RecoveryResult]
    config_class: type


RECOVERIES: dict[str, RecoveryMethod] = {}


def register_recovery(name: str, config_class: type) -> Callable:
    """Decorator: register `fn(converted, source, tokenizer, stats, config, progress)` as `name`."""

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


def recover(
    method: str,
    converted_model: nn.Module,
    source_model: nn.Module,
    tokenizer: Any = None,
    stats: CalibrationStats | None = None,
    config: object | Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
) -> RecoveryResult:
    """Train `converted_model` in place with `method`; `config` is the method's config dataclass,
    a mapping of its fields (e.g. from a TOML file), or None for the defaults."""
    entry = get_recovery(method)
    if config is None:
        config = entry.config_class()
    elif isinstance(config, Mapping):
        config = entry.config_class(**config)
    elif not isinstance(config, entry.config_class):
        raise TypeError(
            f"recovery {method!r} takes a {entry.config_class.__name__}, "
            f"got {type(config).__name__}"
        )
    if converted_model is source_model:
        raise ValueError("recovery needs the source model and the converted model as two objects")
    return entry.run(converted_model, source_model, tokenizer, stats, config, progress)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_projections(names: tuple[str, ...], what: str) -> None:
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        raise ValueError(
            f"{what} must be a non-empty subset of {PROJECTIONS}, got {tuple(names)!r}"
        )


def _projection_params(adapter: ModelAdapter, layer: int, names: tuple[str, ...]) -> list:
    return [p for which in names for p in adapter.projection(layer, which).parameters()]


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
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


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: list[nn.Parameter], snapshot: list[torch.Tensor]) -> None:
    for p, saved in zip(params, snapshot, strict=True):
        p.copy_(saved)


def _diverged(where: str, value: float, lr: float) -> RecoveryDivergedError:
    return RecoveryDivergedError(
        f"{where}: the loss became {value}; try a lower learning rate than {lr:g} "
        "(the model's weights were restored)"
    )


# --------------------------------------------------------------------------------------------
# layerwise


@dataclass(frozen=True)
class LayerwiseConfig:
    """Per-layer local fit of the converted attention to the source attention."""

    steps: int = 100  # Adam steps per layer
    lr: float = 1e-3
    batch_size: int = 4  # calibration sequences per step
    train: tuple[str, ...] = ("k", "v")  # projections trained, a subset of q, k, v, o
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(self.train))
        _check_projections(self.train, "layerwise train")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"layerwise {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"layerwise lr must be positive, got {self.lr}")


def _module_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = next(module.parameters())
    return x.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def _relative_error(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: torch.Tensor,  # (n, T, d)
    target: torch.Tensor,  # (n, T, d), float32
    batch_size: int,
) -> float:
    """||y - y_src||^2 / ||y_src||^2 over all of `inputs` (the `local_attn` proxy's error)."""
    err = norm = 0.0
    for x, y in zip(inputs.split(batch_size), target.split(batch_size), strict=True):
        out = adapter.attend(module, _module_input(module, x)).float()
        err += float((out - y).pow(2).sum())
        norm += float(y.pow(2).sum())
    return err / norm


def _fit_layer(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: torch.Tensor,  # (n, T, d) source attention inputs, on the CPU
    target: torch.Tensor,  # (n, T, d) source attention outputs, float32, on the module's device
    params: list[nn.Parameter],
    config: LayerwiseConfig,
    generator: torch.Generator,
    where: str,
) -> list[float]:
    """Adam on `params` for `config.steps` random batches; returns the loss of each step."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    history = []
    for step in range(config.steps):
        rows = torch.randperm(inputs.shape[0], generator=generator)[: config.batch_size]
        y_src = target[rows.to(target.device)]
        y = adapter.attend(module, _module_input(module, inputs[rows])).float()
        loss = (y - y_src).pow(2).sum() / y_src.pow(2).sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _diverged(f"{where} step {step + 1}", value, config.lr)
        history.append(value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return history


@register_recovery("layerwise", LayerwiseConfig)
def layerwise(
    converted: nn.Module,
    source: nn.Module,
    tokenizer: Any,
    stats: CalibrationStats | None,
    config: LayerwiseConfig,
    progress: bool = True,
) -> RecoveryResult:
    """Fit each layer independently: minimise ||y - y_src||^2 / ||y_src||^2 over the chosen
    projections of that layer, y the converted attention output and y_src the source attention
    output on the calibration inputs `stats.layers[l].inputs` (so layer l trains on the source's
    inputs, not on what the converted layers below produce). The result's losses are sums over
    layers, i.e. the `local_attn` proxy's score before and after. On any failure the trained
    projections are restored."""
    if stats is None:
        raise ValueError("recovery 'layerwise' needs calibration statistics (stats=...)")
    a, s = get_adapter(converted), get_adapter(source)
    if (a.num_layers, a.num_heads) != (s.num_layers, s.num_heads):
        raise ValueError("the converted and source models differ in layers or heads")
    if len(stats.layers) != a.num_layers or stats.layers[0].inputs.numel() == 0:
        raise ValueError(
            "calibration statistics must hold attention inputs for every layer "
            "(CalibrationConfig.sample_seqs >= 1)"
        )
    start = time.perf_counter()
    all_params = [p for i in range(a.num_layers) for p in _projection_params(a, i, config.train)]
    snapshot = _snapshot(all_params)
    generator = torch.Generator().manual_seed(config.seed)
    layer_losses: list[tuple[float, float]] = []
    history: list[float] = []
    bar = tqdm(range(a.num_layers), desc="layerwise recovery", disable=not progress)
    try:
        for layer in bar:
            inputs = stats.layers[layer].inputs
            src_module, module = s.attention(layer), a.attention(layer)
            with torch.no_grad():
                target = torch.cat(
                    [
                        s.attend(src_module, _module_input(src_module, x)).float()
                        for x in inputs.split(config.batch_size)
                    ]
                ).to(next(module.parameters()).device)
            initial = _relative_error(module, a, inputs, target, config.batch_size)
            params = _projection_params(a, layer, config.train)
            where = f"layerwise layer {layer}"
            with _only_trainable(converted, params):
                history += _fit_layer(module, a, inputs, target, params, config, generator, where)
            final = _relative_error(module, a, inputs, target, config.batch_size)
            if not math.isfinite(final):
                raise _diverged(f"{where} after training", final, config.lr)
            layer_losses.append((initial, final))
            bar.set_postfix(layer=layer, initial=f"{initial:.3g}", final=f"{final:.3g}")
    except BaseException:
        _restore(all_params, snapshot)
        raise
    return RecoveryResult(
        method="layerwise",
        seconds=time.perf_counter() - start,
        steps=config.steps * a.num_layers,
        initial_loss=sum(i for i, _ in layer_losses),
        final_loss=sum(f for _, f in layer_losses),
        trainable_parameters=sum(p.numel() for p in all_params),
        layer_losses=layer_losses,
        history=history,
    )


# --------------------------------------------------------------------------------------------
# finetune


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end causal-LM training (optionally distilled from the source) on the train split."""

    max_steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 256
    num_train_windows: int = 512  # the train split holds about 600 windows of 256 tokens
    distill: bool = False  # add distill_weight * KL(source || converted) of next-token logits
    distill_weight: float = 1.0
    trainable: tuple[str, ...] | str = ("k", "v")  # attention projections, or "all"
    lora: bool = False  # LoRA adapters on the trainable projections, merged back at the end
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    logging_steps: int = 10
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable != "all":
            if isinstance(self.trainable, str):
                raise ValueError(
                    f"finetune trainable must be 'all' or projection names, got {self.trainable!r}"
                )
            object.__setattr__(self, "trainable", tuple(self.trainable))
            _check_projections(self.trainable, "finetune trainable")
        for name in ("max_steps", "batch_size", "num_train_windows", "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune {name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"finetune seq_len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"finetune lr must be positive, got {self.lr}")
        if self.distill_weight < 0:
            raise ValueError(f"finetune distill_weight must be >= 0, got {self.distill_weight}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"finetune device must be auto, cpu or cuda, got {self.device!r}")


class _Windows(torch.utils.data.Dataset):
    """Fixed-length token windows as causal-LM examples (the model shifts the labels)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def _kl_to_source(student_logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_source || p_student), temperature 1."""
    source_logp = F.log_softmax(source_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    kl = F.kl_div(student_logp, source_logp, log_target=True, reduction="none").sum(-1)
    return kl.mean()


def _make_trainer_class():
    """Trainer subclass (built lazily: importing transformers' Trainer is slow)."""
    from transformers import Trainer

    class RecoveryTrainer(Trainer):
        """Adds optional distillation to the LM loss and stops on a non-finite loss."""

        def __init__(self, *args, source=None, distill_weight=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.source = source
            self.distill_weight = distill_weight
            self.loss_history: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if self.source is not None:
                with torch.no_grad():
                    source_logits = self.source(input_ids=inputs["input_ids"]).logits
                loss = loss + self.distill_weight * _kl_to_source(outputs.logits, source_logits)
            if model.training:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise _diverged(
                        f"finetune step {self.state.global_step + 1}",
                        value,
                        self.args.learning_rate,
                    )
                self.loss_history.append(value)
            return (loss, outputs) if return_outputs else loss

    return RecoveryTrainer


def _trainable_modules(
    model: nn.Module, adapter: ModelAdapter, trainable: tuple[str, ...]
) -> list[str]:
    """Full names of the chosen projections in every layer (LoRA targets)."""
    wanted = {
        id(adapter.projection(i, which)) for i in range(adapter.num_layers) for which in trainable
    }
    return [name for name, module in model.named_modules() if id(module) in wanted]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("finetune device 'cuda' was asked for but CUDA is not available")
    return torch.device(device)


@register_recovery("finetune", FinetuneConfig)
def finetune(
    converted: nn.Module,
    source: nn.Module,
    tokenizer: Any,
    stats: CalibrationStats | None,
    config: FinetuneConfig,
    progress: bool = True,
) -> RecoveryResult:
    """Causal-LM training of `converted` on `token_windows(train, seq_len, num_train_windows)`,
    loss = cross-entropy (+ distill_weight * KL(source || converted)). The model stays on the
    training device and is returned in eval mode. Losses in the result are per-step training
    losses (first and last step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainingArguments, default_data_collator

    if tokenizer is None:
        raise ValueError("recovery 'finetune' needs the tokenizer")
    grouping = model_grouping(converted)
    adapter = get_adapter(converted)
    device = _resolve_device(config.device)
    windows = token_windows(tokenizer, TextSpec("train", config.seq_len, config.num_train_windows))

    names = PROJECTIONS if config.trainable == "all" else config.trainable
    if config.lora:
        targets: list[str] | str = (
            "all-linear"
            if config.trainable == "all"
            else _trainable_modules(converted, adapter, names)
        )
        params: list[nn.Parameter] = []  # the base weights change only at the merge
    elif config.trainable == "all":
        params = list(converted.parameters())
    else:
        params = [
            p for i in range(adapter.num_layers) for p in _projection_params(adapter, i, names)
        ]
    snapshot = _snapshot(params)

    source_device = next(source.parameters()).device
    source_was_training = source.training
    use_cache = getattr(converted.config, "use_cache", None)
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="headgroup-finetune-") as out,
        _only_trainable(converted, params),
    ):
        model: nn.Module = converted
        try:
            if config.lora:
                lora = LoraConfig(
                    r=config.lora_r,
                    lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    target_modules=targets,
                    bias="none",
                    task_type="CAUSAL_LM",
                )
                model = get_peft_model(converted, lora)  # injects adapters into `converted`
            args = TrainingArguments(
                output_dir=out,
                max_steps=config.max_steps,
                per_device_train_batch_size=config.batch_size,
                learning_rate=config.lr,
                warmup_steps=config.warmup_steps,
                weight_decay=config.weight_decay,
                logging_steps=config.logging_steps,
                logging_nan_inf_filter=False,
                save_strategy="no",
                eval_strategy="no",
                report_to=[],
                use_cpu=device.type == "cpu",
                disable_tqdm=not progress,
                remove_unused_columns=False,
                seed=config.seed,
                data_seed=config.seed,
            )
            trainer = _make_trainer_class()(
                model=model,
                args=args,
                train_dataset=_Windows(windows),
                data_collator=default_data_collator,
                source=source.to(device).eval() if config.distill else None,
                distill_weight=config.distill_weight,
            )
            if not progress:
                trainer.remove_callback(PrinterCallback)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            trainer.train()
        except BaseException:  # leave the model as it was: no adapters, weights restored
            if model is not converted:
                model.unload()  # drop the adapters unmerged: the base weights never changed
            _restore(params, snapshot)
            raise
        else:
            if model is not converted:
                model.merge_and_unload()  # back into `converted`'s own projections
        finally:
            source.to(source_device).train(source_was_training)
            if use_cache is not None:
                converted.config.use_cache = use_cache
            converted.eval()
    if model_grouping(converted) != grouping:
        raise RuntimeError("finetune changed the model's grouping")
    history = trainer.loss_history
    return RecoveryResult(
        method="finetune",
        seconds=time.perf_counter() - start,
        steps=trainer.state.global_step,
        initial_loss=history[0],
        final_loss=history[-1],
        trainable_parameters=trainable,
        history=history,
    )
