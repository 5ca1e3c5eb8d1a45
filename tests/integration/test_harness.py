"""lm-eval parity: headgroup's evaluator and lm-eval's HFLM agree on the same 50 questions."""

import copy

import pytest
import torch

import gqa
from gqa.grouping import Grouping
from gqa.models import load_model
from objectives.evaluate import evaluate
from objectives.harness import evaluate_harness

pytestmark = pytest.mark.integration
TASKS = ["arc_easy", "boolq"]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def _asymmetric(model):
    # K: groups of 6 and 3 query heads; V: the source's three groups of 3 (K != V, uneven)
    layers = gqa.get_adapter(model).num_layers
    grouping = Grouping.create(
        9, [[[0, 1, 2, 3, 4, 5], [6, 7, 8]]] * layers, [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]] * layers
    )
    return gqa.convert(copy.deepcopy(model), grouping)


@pytest.mark.parametrize("variant", ["source", "asymmetric"])
def test_lm_eval_gives_our_acc_and_acc_norm(smollm2, variant):
    model = smollm2.model if variant == "source" else _asymmetric(smollm2.model)
    with torch.no_grad():
        ours = evaluate(model, smollm2.tokenizer, TASKS, limit=50, progress=False)
        theirs = evaluate_harness(model, smollm2.tokenizer, TASKS, limit=50)
    for task in TASKS:
        assert theirs[task]["n"] == ours[task]["n"] == 50
        assert theirs[task]["acc"] == pytest.approx(ours[task]["acc"]), task
        assert theirs[task]["acc_norm"] == pytest.approx(ours[task]["acc_norm"]), task
