"""Self-contained checkpoints: the modeling code an asymmetric checkpoint folder carries.

`write_remote_code(folder)` puts `modeling_headgroup.py`, `headgroup_attention.py` and
`headgroup_kv_quant.py` (copies of gqa/attention.py and gqa/kv_quant.py, which import only torch
and transformers) in a saved folder and points
`auto_map` in its config.json at them, so that stock transformers loads the folder with
`trust_remote_code=True` where headgroup is not installed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from gqa import attention, kv_quant

MODELING_FILE = "modeling_headgroup.py"
ATTENTION_FILE = "headgroup_attention.py"
KV_QUANT_FILE = "headgroup_kv_quant.py"
MODEL_CLASS = "HeadgroupForCausalLM"
_TEMPLATE = Path(__file__).with_name(MODELING_FILE)
# Families whose layers are model.layers[i].self_attn.{k,v}_proj with a head_dim attribute, as
# the carried code assumes (tested: llama, qwen2); others load through headgroup only.
FAMILIES = ("llama", "mistral", "qwen2")
log = logging.getLogger(__name__)


def write_remote_code(folder: str | Path) -> bool:
    """Add the modeling files and `auto_map` to a saved converted (non-uniform) folder; False
    (and nothing written) for a family whose layout the carried code does not know."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    architecture = (config.get("architectures") or [""])[0]
    if config.get("model_type") not in FAMILIES or not re.fullmatch(
        r"[A-Za-z0-9_]+ForCausalLM", architecture
    ):
        log.info("%s: no self-contained modeling code for %r", folder, config.get("model_type"))
        return False
    modeling = _TEMPLATE.read_text().replace(
        'BASE_ARCHITECTURE = "LlamaForCausalLM"', f'BASE_ARCHITECTURE = "{architecture}"', 1
    )
    (folder / MODELING_FILE).write_text(modeling)
    (folder / ATTENTION_FILE).write_text(Path(attention.__file__).read_text())
    (folder / KV_QUANT_FILE).write_text(Path(kv_quant.__file__).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True
