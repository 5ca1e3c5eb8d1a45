"""Self-contained checkpoints: stock transformers runs an asymmetric folder without headgroup."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.remote import ATTENTION_FILE, MODELING_FILE
from tests.tiny import tiny_model

PROJECT = Path(__file__).resolve().parents[2]
ASYM_GROUPING = Grouping.create(
    6,
    [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
    [[[0, 1, 2, 3, 4, 5]], [[0, 1], [2], [3, 4, 5]]],
)

# Run in a fresh interpreter (-I: no PYTHONPATH, no current directory on sys.path) from a temp dir.
# Any import of a headgroup package fails loudly, the editable install's finder is dropped, and at
# the end no loaded module may come from the project.
LOADER = r"""
import json, sys
PROJECT, OUT, *FOLDERS = sys.argv[1:]
HEADGROUP = {"gqa", "objectives", "search", "experiments", "tests"}

class Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in HEADGROUP:
            raise ImportError(f"headgroup module {name!r} imported")
        return None

sys.meta_path[:] = [Blocker] + [f for f in sys.meta_path if "editable" not in repr(f)]
# Drop the project's own folders (the venv may live inside the checkout: keep site-packages).
sys.path[:] = [p for p in sys.path if not p.startswith(PROJECT) or "site-packages" in p]

import torch
from transformers import AutoModelForCausalLM

results = []
for folder in FOLDERS:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    logits = model(input_ids=ids).logits
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
    cache = out["cache"] if "cache" in out else out.past_key_values  # gqa.output_cache, inlined
    results.append({
        "class": type(model).__name__,
        "logits": logits,
        "sequences": out.sequences,
        "k_heads": [layer.keys.shape[1] for layer in cache.layers],
        "v_heads": [layer.values.shape[1] for layer in cache.layers],
        "cache_class": type(cache).__name__,
        "cache_bytes": cache.nbytes() if hasattr(cache, "nbytes") else None,
    })
leaked = sorted(
    name for name, module in sys.modules.items()
    if (
        str(getattr(module, "__file__", "") or "").startswith(PROJECT)
        and "site-packages" not in str(getattr(module, "__file__", ""))
    )
    or name.partition(".")[0] in HEADGROUP
)
for result in results:
    result["leaked"] = leaked
torch.save(results, OUT)
"""


def _run_stock(folder: Path, tmp_path: Path) -> dict:
    """Copy `folder` into a temp dir and load it there in an interpreter without headgroup."""
    return run_stock_folders([folder], tmp_path)[0]


def run_stock_folders(folders: list[Path], tmp_path: Path) -> list[dict]:
    """Copy `folders` into a temp dir and load each there, in one interpreter without headgroup:
    logits and greedy generation on fixed ids, the cache's head counts, leaked modules."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    copies = [str(shutil.copytree(f, work / f"model{i}")) for i, f in enumerate(folders)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(PROJECT), str(work / "out.pt"), *copies],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "out.pt")


def test_asymmetric_folder_runs_in_stock_transformers_without_headgroup(tmp_path):
    grouping = Grouping.create(
        6,
        [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]],
        [[[0, 1, 2, 3, 4, 5]], [[0, 1], [2], [3, 4, 5]]],
    )
    model = gqa.convert(tiny_model(num_kv_heads=3), grouping)
    folder = gqa.save(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_headgroup.HeadgroupForCausalLM"}
    assert (folder / MODELING_FILE).is_file() and (folder / ATTENTION_FILE).is_file()

    stock = _run_stock(folder, tmp_path)

    assert stock["leaked"] == []
    assert stock["class"] == "HeadgroupForCausalLM"
    ids = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(stock["logits"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(stock["sequences"], generated)
    # the cache holds the grouped heads: K 3 and 2 groups, V 1 and 3 (the source had 3 and 3)
    assert stock["k_heads"] == [3, 2] and stock["v_heads"] == [1, 3]
    # headgroup's own loader is unaffected by the carried code
    assert gqa.model_grouping(gqa.load(folder)) == grouping


def test_uniform_folder_carries_no_remote_code(tmp_path):
    model = gqa.convert(tiny_model(num_kv_heads=6), Grouping.neighbour(6, 2, 3))
    folder = gqa.save(model, tmp_path / "u")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["num_key_value_heads"] == 3
    assert not (folder / MODELING_FILE).exists() and not (folder / ATTENTION_FILE).exists()


@pytest.mark.parametrize("model_type", ["qwen2"])
def test_other_family_carries_its_own_base_class(tmp_path, model_type):
    grouping = Grouping.create(6, [[[0, 4, 5], [1, 2, 3]], [[5], [0, 1, 2, 3, 4]]])
    model = gqa.convert(tiny_model(model_type, num_kv_heads=3), grouping)
    folder = gqa.save(model, tmp_path / "q")
    assert 'BASE_ARCHITECTURE = "Qwen2ForCausalLM"' in (folder / MODELING_FILE).read_text()
    stock = _run_stock(folder, tmp_path)
    assert stock["leaked"] == [] and stock["k_heads"] == [2, 2] and stock["v_heads"] == [2, 2]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[5, 17, 33, 8, 61, 2, 44]])).logits
    torch.testing.assert_close(stock["logits"], expected, rtol=1e-5, atol=1e-5)


def test_carried_adapters_are_the_family_chain_with_relative_imports(tmp_path):
    from gqa.remote import ADAPTER_PREFIX

    model = gqa.convert(tiny_model("gemma3_text", num_kv_heads=3, head_dim=12), ASYM_GROUPING)
    folder = gqa.save(model, tmp_path / "g3")
    carried = sorted(p.name for p in folder.glob(f"{ADAPTER_PREFIX}*.py"))
    assert carried == [
        f"{ADAPTER_PREFIX}{n}.py" for n in ("base", "gemma", "gemma2", "gemma3", "llama")
    ]
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert "from gqa" not in text and "import gqa" not in text, path.name
    modeling = (folder / MODELING_FILE).read_text()
    assert f"from .{ADAPTER_PREFIX}gemma3 import Gemma3TextAdapter as Adapter" in modeling


def test_a_folder_that_cannot_carry_code_is_refused_in_one_line(tmp_path):
    from gqa.remote import RemoteCodeError, write_remote_code

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["MyPrivateLlamaForCausalLM"]})
    )
    with pytest.raises(RemoteCodeError, match="MyPrivateLlamaForCausalLM is not a stock"):
        write_remote_code(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # nothing written
