"""Save/load round trips; uniform groupings load in stock transformers."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqa
from gqa.assets import MissingAssetError, package_dir
from gqa.grouping import Grouping
from gqa.models import load_model
from tests.tiny import batch, logits, tiny_model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_round_trip_asymmetric(tmp_path, model_type):
    grouping = Grouping.create(
        6, [[[0, 4, 5], [1], [2, 3]], [[5], [0, 1, 2, 3, 4]]], [[[0, 1, 2, 3, 4, 5]]] * 2
    )
    model = gqa.convert(tiny_model(model_type, num_kv_heads=3), grouping)
    gqa.save(model, tmp_path / "m")
    assert (
        json.loads((tmp_path / "m" / "config.json").read_text())["headgroup"] == grouping.to_dict()
    )
    assert Grouping.load(tmp_path / "m" / "grouping.json") == grouping
    loaded = gqa.load(tmp_path / "m")
    assert gqa.model_grouping(loaded) == grouping
    inputs = batch()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # not silently wrong in stock HF


@pytest.mark.parametrize(
    "groups",
    [[[0, 1, 2], [3, 4, 5]], [[0, 3, 5], [1, 2, 4]]],  # contiguous, and uniform but reordered
)
def test_uniform_grouping_saves_as_plain_gqa(tmp_path, groups):
    model = gqa.convert(tiny_model(num_kv_heads=6), Grouping.create(6, [groups] * 2))
    gqa.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "headgroup" not in config and config["num_key_value_heads"] == 2
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    inputs = batch()
    torch.testing.assert_close(logits(stock, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    assert gqa.model_grouping(model) is not None  # saving did not change the live model
    assert torch.equal(logits(gqa.load(tmp_path / "m"), inputs), logits(stock, inputs))


def test_save_is_atomic_and_overwrites(tmp_path):
    model = gqa.convert(tiny_model(), Grouping.neighbour(6, 2, 3))
    gqa.save(model, tmp_path / "m")
    gqa.save(copy.deepcopy(model), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_missing_asset_package_says_how_to_fix():
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps nope-pkg==1.0"):
        package_dir(("no_such_module_xyz", "nope-pkg==1.0"))


def test_missing_local_model_folder():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model("./does/not/exist")
