"""Save and load converted models as Hugging Face folders.

A converted model saves as a normal HF folder whose config.json also holds the grouping (key
`headgroup`); `load` restores it. A uniform grouping with shared K/V partitions is saved as
plain HF GQA instead, which stock `AutoModelForCausalLM.from_pretrained` loads unaided, unless the
model has a KV-cache precision plan (config key `headgroup_kv_precision`) or latent layers
(`headgroup_latent`); any other grouping
carries its own modeling code (gqa.remote), which stock transformers runs with
`trust_remote_code=True`.
A copy of the grouping is written to grouping.json for people and scripts.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from gqa import attention
from gqa.adapters import get_adapter
from gqa.grouping import Grouping
from gqa.latent import CONFIG_KEY as LATENT_KEY
from gqa.latent import LatentPlan, latent_modules
from gqa.latent_model import layout_latent, model_latent
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
    latent = model_latent(model)  # nor are latent layers
    plain = (
        grouping is not None
        and grouping.is_uniform_shared()
        and precision is None
        and latent is None
    )
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
                _add_sentinels(model, tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


SENTINEL_FILE = "headgroup-stock-guard.safetensors"


def _add_sentinels(model: nn.Module, folder: Path) -> None:
    """Make stock transformers *without* the carried code fail loudly on this folder.

    A stock model of the source's class has parameters the converted one lacks where a family's
    attention changes layout (a fused qkv split in K/V groups, as in Phi-3 or GPT-2); stock
    loading would initialise them at random and give a different model without an error. Each
    such key gets an empty tensor in the checkpoint, so stock loading stops on a size mismatch;
    the carried code and headgroup's loader never read them."""
    config = copy.deepcopy(model.config)
    for key in (CONFIG_KEY, PRECISION_KEY, LATENT_KEY):
        if hasattr(config, key):
            delattr(config, key)
    config._attn_implementation = attention.base_implementation(config._attn_implementation)
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(config)
    missing = sorted(set(stock.state_dict()) - set(model.state_dict()))
    if not missing:
        return
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:  # a single file is read alone: shard it in two, the weights and the guard
        single = folder / "model.safetensors"
        shard = single.rename(folder / "model-00001-of-00001.safetensors")
        with safe_open(shard, framework="pt") as fh:
            keys = list(fh.keys())
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard.name)}
    save_file({k: torch.empty(0) for k in missing}, folder / SENTINEL_FILE, {"format": "pt"})
    index["weight_map"].update(dict.fromkeys(missing, SENTINEL_FILE))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    latent = getattr(config, LATENT_KEY, None)
    if latent is not None:
        latent = LatentPlan.from_dict(latent)
        delattr(config, LATENT_KEY)
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
    if latent is not None:
        layout_latent(model, latent)
    _load_grouped_projections(model, path)
    return apply_precision(model, precision)


@torch.no_grad()
def _load_grouped_projections(model: nn.Module, path: Path) -> None:
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    wanted: dict[str, torch.Tensor] = {}
    for layer in range(adapter.num_layers):
        attention_module = adapter.attention(layer)
        for module in adapter.regrouped_modules(layer) + latent_modules(attention_module):
            for pname, param in module.named_parameters():
                wanted[f"{names[id(module)]}.{pname}"] = param
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  (safe_open is not a dict)
                if key in wanted:
                    wanted.pop(key).copy_(fh.get_tensor(key))
    if wanted:
        raise ValueError(f"{path}: checkpoint lacks grouped projections {sorted(wanted)[:3]}...")
