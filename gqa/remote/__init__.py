"""Self-contained checkpoints: the modeling code an asymmetric checkpoint folder carries.

`write_remote_code(folder)` puts in a saved folder `modeling_headgroup.py`,
`headgroup_attention.py`, `headgroup_kv_quant.py` and `headgroup_latent.py` (copies of
gqa/attention.py, gqa/kv_quant.py and gqa/latent.py, which import only torch and transformers) and the family's adapter modules
(`hg_adapter_<name>.py`: copies of gqa/adapters/<name>.py and the adapters it builds on, their
`gqa.adapters` imports made relative), and points `auto_map` in its config.json at the model
class, so that stock transformers loads the folder with `trust_remote_code=True` where headgroup
is not installed. The adapter lays out each layer exactly as headgroup's own loader does
(`ModelAdapter.layout_layer`), so every supported family is served.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gqa import attention, kv_quant, latent
from gqa.adapters import ADAPTERS

MODELING_FILE = "modeling_headgroup.py"
ATTENTION_FILE = "headgroup_attention.py"
KV_QUANT_FILE = "headgroup_kv_quant.py"
LATENT_FILE = "headgroup_latent.py"
ADAPTER_PREFIX = "hg_adapter_"
MODEL_CLASS = "HeadgroupForCausalLM"
_TEMPLATE = Path(__file__).with_name(MODELING_FILE)
_ADAPTERS = Path(attention.__file__).with_name("adapters")
_IMPORT = re.compile(r"^from gqa\.adapters\.(\w+) import", re.MULTILINE)


class RemoteCodeError(ValueError):
    """A converted model whose folder cannot carry self-contained modeling code."""


def _adapter_sources(module: str) -> dict[str, str]:
    """The adapter module `module` (a name in gqa/adapters) and every adapter module it imports,
    their `gqa.adapters.X` imports rewritten to the carried `.hg_adapter_X` files."""
    out: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        text = (_ADAPTERS / f"{name}.py").read_text()
        todo += _IMPORT.findall(text)
        text = _IMPORT.sub(lambda m: f"from .{ADAPTER_PREFIX}{m.group(1)} import", text)
        if re.search(r"^\s*(from|import) (gqa|objectives|search|experiments)\b", text, re.M):
            raise RemoteCodeError(f"gqa/adapters/{name}.py imports headgroup beyond its adapters")
        out[name] = text
    return out


def write_remote_code(folder: str | Path) -> None:
    """Add the modeling files and `auto_map` to a saved converted (non-uniform) folder; raises
    RemoteCodeError (nothing written) where the model class is not a stock transformers one."""
    import transformers

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    architecture = (config.get("architectures") or [""])[0]
    adapter = ADAPTERS.get(config.get("model_type"))
    if adapter is None or not re.fullmatch(r"[A-Za-z0-9_]+", architecture):
        raise RemoteCodeError(f"{folder}: no adapter for model_type {config.get('model_type')!r}")
    if not hasattr(transformers, architecture):
        raise RemoteCodeError(
            f"{folder}: {architecture} is not a stock transformers class, so the folder cannot "
            "carry self-contained modeling code"
        )
    module = adapter.__module__.rpartition(".")[2]
    modeling = _TEMPLATE.read_text()
    for old, new in (
        ('BASE_ARCHITECTURE = "LlamaForCausalLM"', f'BASE_ARCHITECTURE = "{architecture}"'),
        (
            "from .hg_adapter_llama import LlamaAdapter as Adapter",
            f"from .{ADAPTER_PREFIX}{module} import {adapter.__name__} as Adapter",
        ),
    ):
        if old not in modeling:
            raise AssertionError(f"{_TEMPLATE} lacks the line {old!r}")
        modeling = modeling.replace(old, new, 1)
    for name, text in _adapter_sources(module).items():
        (folder / f"{ADAPTER_PREFIX}{name}.py").write_text(text)
    (folder / MODELING_FILE).write_text(modeling)
    (folder / ATTENTION_FILE).write_text(Path(attention.__file__).read_text())
    (folder / KV_QUANT_FILE).write_text(Path(kv_quant.__file__).read_text())
    (folder / LATENT_FILE).write_text(Path(latent.__file__).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
