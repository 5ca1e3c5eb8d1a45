"""Save and load converted models as Hugging Face folders.

A converted model saves as a normal HF folder whose config.json also holds the grouping (key
`headgroup`); `load` restores it. A uniform grouping with shared K/V partitions is saved as
plain HF GQA instead, which stock `AutoModelForCausalLM.from_pretrained` loads unaided, unless the
model has a KV-cache precision plan (config key `headgroup_kv_precision`); any other grouping
carries its own modeling code (gqa.remote), which stock transformers runs with
`trust_remote_code=True`.
A copy of the grouping is written to grouping.json for people and scripts.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from gqa.adapters import get_adapter
from gqa.grouping import Grouping
from gqa.precision import CONFIG_KEY as PRECISION_KEY
from gqa.precision import PrecisionPlan, apply_precision, model_precision
from gqa.remote import write_remote_code
from gqa.surgery import CONFIG_KEY, apply_layout, model_grouping, to_plain_gqa

GROUPING_FILE = "grouping.json"


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` (and `tokenizer`) to `path` atomically; returns the path."""
    path = Path(path)
    grouping = model_grouping(model)
    precision = model_precision(model)  # a quantized cache is never plain HF: stock would drop it
    plain = grouping is not None and grouping.is_uniform_shared() and precision is None
    if plain and get_adapter(model).stock_gqa:
        model = to_plain_gqa(copy.deepcopy(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if grouping is not None:
            grouping.save(tmp / GROUPING_FILE)
            if not plain:  # stock transformers + trust_remote_code=True
                write_remote_code(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_headgroup_folder(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and f'"{CONFIG_KEY}"' in config.read_text()


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model saved by `save` (converted or plain) from a local folder."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    grouping = Grouping.from_dict(data)
    delattr(config, CONFIG_KEY)
    precision = getattr(config, PRECISION_KEY, None)
    if precision is not None:
        precision = PrecisionPlan.from_dict(precision)
        delattr(config, PRECISION_KEY)
    # The saved K/V projections do not match the config's head count; let transformers build and
    # load everything else, then put the grouped projections in place from the same files.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    apply_layout(model, grouping)
    _load_grouped_projections(model, path)
    return apply_precision(model, precision)


@torch.no_grad()
def _load_grouped_projections(model: nn.Module, path: Path) -> None:
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    wanted: dict[str, torch.Tensor] = {}
    for layer in range(adapter.num_layers):
        for module in adapter.regrouped_modules(layer):
            for pname, param in module.named_parameters():
                wanted[f"{names[id(module)]}.{pname}"] = param
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  (safe_open is not a dict)
                if key in wanted:
                    wanted.pop(key).copy_(fh.get_tensor(key))
    if wanted:
        raise ValueError(f"{path}: checkpoint lacks grouped projections {sorted(wanted)[:3]}...")
