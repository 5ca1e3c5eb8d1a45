"""Model registry: names for the offline models, and loading of any model spec.

`load_model(spec)` accepts a registered name (`smollm2-135m`, `smollm2-135m-mha`), a folder
written by `gqa.save` (converted or not), or any Hugging Face hub id or local path.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa import checkpoint
from gqa.assets import SMOLLM2_PACKAGE, cache_dir, package_dir
from gqa.surgery import expand_to_mha

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str


ModelLoader = Callable[[torch.dtype], tuple[nn.Module, object]]
MODELS: dict[str, ModelLoader] = {}


def register_model(name: str) -> Callable[[ModelLoader], ModelLoader]:
    def decorate(fn: ModelLoader) -> ModelLoader:
        MODELS[name] = fn
        return fn

    return decorate


def _smollm2_cached() -> Path:
    """Dequantise the shipped GGUF once and cache it as safetensors (about 15 s the first time)."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    source = package_dir(SMOLLM2_PACKAGE)
    log.info("dequantising %s into %s (once)", SMOLLM2_GGUF, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF refuses save_pretrained; rebuild it as a plain float32 model.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-135m."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


@register_model("smollm2-135m")
def _smollm2(dtype: torch.dtype) -> tuple[nn.Module, object]:
    path = _smollm2_cached()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(
        path
    )


@register_model("smollm2-135m-mha")
def _smollm2_mha(dtype: torch.dtype) -> tuple[nn.Module, object]:
    model, tokenizer = _smollm2(dtype)
    return expand_to_mha(model), tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a registered name, a saved (converted) folder, or a hub id / local path."""
    if spec in MODELS:
        model, tokenizer = MODELS[spec](dtype)
    elif Path(spec).is_dir():
        model, tokenizer = checkpoint.load(spec, dtype=dtype), AutoTokenizer.from_pretrained(spec)
    elif spec.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"model {spec!r}: no such folder (registered names: {', '.join(sorted(MODELS))})"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    model.eval()
    return LoadedModel(model, tokenizer, spec)
