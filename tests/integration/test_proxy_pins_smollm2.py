"""SmolLM2 proxy pins (issue 10): the scoring code was made faster and leaner (factored tables,
batched and incremental scoring); the proxy values on the real model must stay those of the
code before it (commit 6ef149c). The numbers below were computed by that commit's code on the
same statistics recipe; they are not derived independently (brute-force checks of the formulas
are in tests/objectives).

Tolerances follow from the float32 computation behind each proxy (tests/float_tolerance.py):
another CPU sums in another order (issue 18). `test_pins_catch_a_changed_proxy` shows that a
change of the merge or of the statistics moves the values far past those tolerances."""

import copy
import dataclasses

import pytest
import torch

from gqa.grouping import Grouping
from gqa.models import load_model
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from tests.float_tolerance import proxy_rel_tolerance

pytestmark = pytest.mark.integration

LAYERS = 30
WIDTH = 1536  # SmolLM2's widest sum (the MLP's intermediate size)
GROUPINGS = {
    "neighbour_kv_2": Grouping.create(9, [[[0, 1, 2, 3, 4, 5], [6, 7, 8]]] * LAYERS),
    "asym_2": Grouping.create(
        9, [[[0, 4, 8], [1, 2, 3, 5, 6, 7]]] * LAYERS, [[[0, 1, 2, 6, 7, 8], [3, 4, 5]]] * LAYERS
    ),
    "free_3": Grouping.create(9, [[[0, 3], [1, 5, 7], [2, 4, 6, 8]]] * LAYERS),
}
# "proxy/merge" -> grouping -> (layer 0, layer 14, layer 29, sum over layers)
PINNED = {
    "fisher/mean": {
        "neighbour_kv_2": (
            1.2745685612315365e-05,
            4.614317911219413e-05,
            4.307661632013178e-06,
            0.0008317255932151183,
        ),
        "asym_2": (
            1.9624142283459476e-05,
            6.827467051735692e-05,
            7.69719823058736e-06,
            0.0015765009570708043,
        ),
        "free_3": (
            2.677164626830542e-05,
            6.872349878445376e-05,
            8.696454319947771e-06,
            0.001632992826761154,
        ),
    },
    "fisher/query_aware": {
        "neighbour_kv_2": (
            5.14810585284262e-06,
            1.5683597925364516e-05,
            2.1526518415170127e-06,
            0.00031747402930424793,
        ),
        "asym_2": (
            4.796458050889e-06,
            2.1125931206026587e-05,
            3.180176912508739e-06,
            0.0004860979284801969,
        ),
        "free_3": (
            9.03536323890036e-06,
            1.9196021568565517e-05,
            3.7031924158952377e-06,
            0.0005275210427732095,
        ),
    },
    "attn_out/query_aware": {
        "neighbour_kv_2": (
            1.220345265879748,
            4062.552408827356,
            15008.324917687709,
            231323.92031202465,
        ),
        "asym_2": (1.2027121708193271, 5527.545030537182, 24786.98091924889, 356969.6697468896),
        "free_3": (2.0075490042121205, 5026.271970413582, 26891.220078008213, 388324.0276506479),
    },
    "wse/mean": {
        "neighbour_kv_2": (
            18086.350365619903,
            8061.99085380332,
            10945.960603166168,
            278657.33180468925,
        ),
        "asym_2": (34997.413464370096, 12492.939119576593, 14947.062301237718, 428432.7984010754),
        "free_3": (32378.099215342037, 14418.16077003193, 20268.496638164528, 509640.9876501046),
    },
    "kv_recon/mean": {
        "neighbour_kv_2": (
            361.73895476702654,
            873.4757303904106,
            1033.912900802809,
            32071.42953004312,
        ),
        "asym_2": (639.2555101494635, 1637.039435228016, 1647.6545392170183, 57944.21872160626),
        "free_3": (593.2745967872877, 1596.34703176781, 1835.6608222988443, 58133.46009588821),
    },
    "act_cos/mean": {
        "neighbour_kv_2": (
            3.535756704462303,
            3.3507269421390924,
            3.367648200761905,
            110.2369893595595,
        ),
        "asym_2": (5.628491136224054, 5.388319017184122, 5.4120055499932835, 172.43290505858207),
        "free_3": (6.862575209101767, 6.565979872763663, 6.6329108757564965, 209.54477061319534),
    },
}


CONFIG = CalibrationConfig(seq_len=128, num_seqs=8, grad_seqs=2, sample_seqs=2, batch_size=4)


def _calibrated(config: CalibrationConfig):
    loaded = load_model("smollm2-135m")
    stats = calibrate(
        loaded.model, loaded.tokenizer, config, "smollm2-135m", progress=False, use_cache=False
    )
    return loaded.model, stats


@pytest.fixture(scope="module")
def smollm2_stats():
    return _calibrated(CONFIG)


def _pinned_values(model, stats, name: str, merge: str) -> dict[str, tuple[float, ...]]:
    proxy = make_proxy(name, model, stats, merge=merge)
    values = {}
    for grouping in GROUPINGS:
        scores = proxy.layer_scores(GROUPINGS[grouping])
        values[grouping] = (scores[0], scores[14], scores[29], sum(scores))
    return values


def _largest_rel_change(values: dict, key: str) -> float:
    return max(
        abs(a - b) / abs(b)
        for grouping, expected in PINNED[key].items()
        for a, b in zip(values[grouping], expected, strict=True)
    )


@pytest.mark.parametrize("key", sorted(PINNED))
def test_smollm2_proxy_values_are_unchanged(smollm2_stats, key):
    name, merge = key.split("/")
    rel = proxy_rel_tolerance(name, LAYERS, WIDTH)
    for grouping, got in _pinned_values(*smollm2_stats, name, merge).items():
        assert got == pytest.approx(PINNED[key][grouping], rel=rel), grouping


def test_pins_catch_a_changed_proxy(smollm2_stats):
    """A real regression fails the pins by a wide margin: another merge (the merge formula
    changed), statistics from one calibration sequence fewer of each kind (the inputs changed), or, for the
    weight-sharing error that reads weights only, K weights changed by 0.1%."""
    model, stats = smollm2_stats
    other_inputs = _calibrated(dataclasses.replace(CONFIG, num_seqs=7, grad_seqs=1, sample_seqs=1))[
        1
    ]
    other_merge = {"mean": "query_aware", "query_aware": "mean"}
    for key in PINNED:
        name, merge = key.split("/")
        rel = proxy_rel_tolerance(name, LAYERS, WIDTH)
        if name == "wse":
            changed = copy.deepcopy(model)
            with torch.no_grad():
                for layer in changed.model.layers:
                    layer.self_attn.k_proj.weight.mul_(1.001)
            changes = {"weights": _pinned_values(changed, stats, name, merge)}
        else:
            changes = {"inputs": _pinned_values(model, other_inputs, name, merge)}
            if name in ("fisher", "attn_out"):  # the others score against the mean by definition
                changes["merge"] = _pinned_values(model, stats, name, other_merge[merge])
        for what, values in changes.items():
            assert _largest_rel_change(values, key) > 10 * rel, f"{key}: {what} change not caught"
