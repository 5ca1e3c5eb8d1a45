"""A tiny saved model and a tiny study config for study tests (seconds per study)."""

from __future__ import annotations

from pathlib import Path

import gqa
from tests.tiny import tiny_model

TINY_STUDY = """
[study]
name = "tiny"
storage = "{storage}"
seed = 0

[model]
name = "{model}"

[calibration]
seq_len = 16
num_seqs = 4
grad_seqs = 2
sample_seqs = 4
batch_size = 4

[search]
budgets = [2.0, 1.5]
proxy = "fisher"
merge = "{merge}"
trials = {trials}
allocation = [false, true]

[search.strategies.neighbour]
[search.strategies.neighbour_kv]
[search.strategies.random]
[search.strategies.greedy]
improvement = ["best", "first"]
[search.strategies.kmeans]
n_init = [2, 3]

[promote]
top_k = 1
recovery = "layerwise"
recovery_config = {{layerwise = {{steps = 2}}}}
tasks = ["ppl", "piqa"]
limit = 2
ppl_windows = 2
seq_len = 16
pruner = "{pruner}"
"""


def save_tiny_model(path: Path, tokenizer) -> Path:
    model = tiny_model(num_heads=6, num_kv_heads=3, vocab_size=49152)
    return gqa.save(model, path, tokenizer=tokenizer)


def write_config(
    path: Path,
    model: Path,
    storage: str,
    trials: int = 12,
    pruner: str = "successive_halving",
    merge: str = "query_aware",
) -> Path:
    path.write_text(
        TINY_STUDY.format(model=model, storage=storage, trials=trials, pruner=pruner, merge=merge)
    )
    return path


def tiny_study(tmp_path: Path, tokenizer, monkeypatch, extra: str = "", trials: int = 4):
    """A saved tiny model, its study config (with `extra` TOML appended) and storage, and a fresh
    $HEADGROUP_CACHE: (config path, storage URL)."""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", tokenizer)
    storage = f"sqlite:///{tmp_path}/s.db"
    path = write_config(tmp_path / "c.toml", model, storage, trials=trials)
    path.write_text(path.read_text() + extra)
    return path, storage
