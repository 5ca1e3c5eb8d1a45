"""`finetune` recovery: end-to-end causal-LM training of a converted model on the train split with
transformers' `Trainer`, optionally distilling the source model's logits, optionally through
merged LoRA (peft). The model keeps its grouping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gqa.adapters import ModelAdapter, get_adapter
from gqa.grouping import write_text_atomic
from gqa.surgery import model_grouping
from objectives.calibration import CalibrationStats
from objectives.data import READING_SPLIT, TextSpec, all_windows, token_windows
from objectives.recovery.base import (
    PROJECTIONS,
    RecoveryResult,
    check_projections,
    diverged,
    only_trainable,
    projection_params,
    register_recovery,
    restore,
    snapshot,
)

log = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "constant")
TEXTS = ("train", READING_SPLIT)
RUN_FILE = "headgroup_run.json"  # what a checkpoint folder was started for


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end causal-LM training (optionally distilled from the source) on the train split."""

    max_steps: int = 200
    tokens: int = 0  # > 0: train on this many tokens instead (steps = tokens / (batch x seq_len))
    lr: float = 1e-4
    lr_scheduler: str = "linear"  # decay after warm-up: "linear", "cosine" or "constant"
    batch_size: int = 8
    seq_len: int = 256
    text: str = "train"  # "train" (LAMBADA, ~600 windows of 256) or "reading" (~2M tokens)
    num_train_windows: int = 512  # windows drawn from `text` (with `tokens`: as many as needed)
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
    checkpoint_dir: str = ""  # non-empty: save every `save_steps`, and resume from there
    save_steps: int = 50

    @property
    def steps(self) -> int:
        """Optimizer steps: from the token budget when one is set, else max_steps."""
        if self.tokens > 0:
            return math.ceil(self.tokens / (self.batch_size * self.seq_len))
        return self.max_steps

    def __post_init__(self) -> None:
        if self.trainable != "all":
            if isinstance(self.trainable, str):
                raise ValueError(
                    f"finetune trainable must be 'all' or projection names, got {self.trainable!r}"
                )
            object.__setattr__(self, "trainable", tuple(self.trainable))
            check_projections(self.trainable, "finetune trainable")
        if self.tokens < 0:
            raise ValueError(f"finetune tokens must be >= 0, got {self.tokens}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(
                f"finetune lr_scheduler must be one of {', '.join(SCHEDULERS)}, "
                f"got {self.lr_scheduler!r}"
            )
        if self.text not in TEXTS:
            raise ValueError(f"finetune text must be one of {', '.join(TEXTS)}, got {self.text!r}")
        for name in (
            "max_steps",
            "batch_size",
            "num_train_windows",
            "logging_steps",
            "lora_r",
            "save_steps",
        ):
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
                    raise diverged(
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


def _training_windows(tokenizer, config: FinetuneConfig) -> torch.Tensor:
    """The training windows: `num_train_windows` of the text, or with a token budget one pass
    of it where the text holds that many windows (else all of them, trained in epochs)."""
    if not config.tokens:
        return token_windows(
            tokenizer, TextSpec(config.text, config.seq_len, config.num_train_windows)
        )
    needed = config.steps * config.batch_size
    try:
        return token_windows(tokenizer, TextSpec(config.text, config.seq_len, needed))
    except ValueError:  # shorter than one pass
        return all_windows(tokenizer, config.text, config.seq_len)


def _run_fingerprint(config: FinetuneConfig, model: nn.Module) -> dict:
    settings = {
        k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "save_steps")
    }
    settings["trainable"] = list(settings["trainable"]) if config.trainable != "all" else "all"
    grouping = model_grouping(model)
    weights = hashlib.sha1()
    for name, param in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(param.detach().float().sum().cpu().numpy().tobytes())
    return {
        "config": settings,
        "grouping": None if grouping is None else grouping.to_dict(),
        "start_weights": weights.hexdigest(),
    }


def _prepare_checkpoints(config: FinetuneConfig, model: nn.Module) -> str | None:
    """The checkpoint to resume from (None: start afresh). A folder started for another run
    (settings, grouping or starting weights) is refused rather than resumed."""
    if not config.checkpoint_dir:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / RUN_FILE
    fingerprint = _run_fingerprint(config, model)
    if record.is_file():
        if json.loads(record.read_text()) != fingerprint:
            raise ValueError(
                f"finetune checkpoint_dir {folder} holds checkpoints of another run (settings, "
                "grouping or starting weights differ): use a new folder"
            )
    else:
        write_text_atomic(record, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    return get_last_checkpoint(str(folder))


@register_recovery("finetune", FinetuneConfig)
def finetune(
    converted: nn.Module,
    source: nn.Module,
    tokenizer: Any,
    stats: CalibrationStats | None,
    config: FinetuneConfig,
    progress: bool = True,
    *,
    merge: str | None = None,  # unused: fine-tuning caches nothing per starting point
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
    windows = _training_windows(tokenizer, config)
    resume = _prepare_checkpoints(config, converted)

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
            p for i in range(adapter.num_layers) for p in projection_params(adapter, i, names)
        ]
    saved = snapshot(params)

    source_device = next(source.parameters()).device
    source_was_training = source.training
    use_cache = getattr(converted.config, "use_cache", None)
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="headgroup-finetune-") as out,
        only_trainable(converted, params),
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
                output_dir=config.checkpoint_dir or out,
                max_steps=config.steps,
                per_device_train_batch_size=config.batch_size,
                learning_rate=config.lr,
                lr_scheduler_type=config.lr_scheduler,
                warmup_steps=config.warmup_steps,
                weight_decay=config.weight_decay,
                logging_steps=config.logging_steps,
                logging_nan_inf_filter=False,
                save_strategy="steps" if config.checkpoint_dir else "no",
                save_steps=config.save_steps,
                save_total_limit=2,
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
            trainer.train(resume_from_checkpoint=resume)
        except BaseException:  # leave the model as it was: no adapters, weights restored
            if model is not converted:
                model.unload()  # drop the adapters unmerged: the base weights never changed
            restore(params, saved)
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
    history = trainer.loss_history  # this run's steps (a resumed run: those after the checkpoint)
    seconds = time.perf_counter() - start
    tokens = len(history) * config.batch_size * config.seq_len
    log.info("finetune: %d tokens in %.0f s (%.0f tokens/s)", tokens, seconds, tokens / seconds)
    return RecoveryResult(
        method="finetune",
        seconds=seconds,
        steps=trainer.state.global_step,
        initial_loss=history[0] if history else math.nan,
        final_loss=history[-1] if history else math.nan,
        trainable_parameters=trainable,
        history=history,
    )
