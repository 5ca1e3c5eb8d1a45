"""The byte front on a tiny study: families, selection on validation, resumption, bad input."""

import dataclasses
import json
import math

import optuna
import pandas as pd
import pytest
import torch

import gqa
from experiments.byte_front_report import byte_front_report, grouping_verdict
from experiments.cli import main
from gqa.adapters import get_adapter
from gqa.grouping import Grouping
from gqa.precision import PrecisionPlan
from objectives.data import VALID_SPLIT
from search.budget import Budget
from search.byte_allocation import ByteBudget
from search.config import ConfigError, StudyConfig
from search.front_points import FAMILIES, family_members
from search.kv_front import FRONT_SUFFIX, KVFront, front_frame
from search.study import Study, make_storage
from tests.search.study_fixtures import save_tiny_model, tiny_study

PRECISION = """
[precision]
budgets = [1.0, 0.6, 0.45, 0.3]
bits = [8, 4, 2]
group_sizes = [8, 4]
valid_windows = 2
test_windows = 2
latent_ranks = [4, 8, 16]
"""


@pytest.fixture()
def front_config(tmp_path, smol_tokenizer, monkeypatch):
    return tiny_study(tmp_path, smol_tokenizer, monkeypatch, PRECISION)


def _count(storage: str) -> int:
    study = optuna.load_study(study_name="tiny" + FRONT_SUFFIX, storage=make_storage(storage))
    return len(study.get_trials())


def test_byte_front_chooses_on_validation_and_resumes(front_config, tmp_path, monkeypatch):
    path, storage = front_config
    config = StudyConfig.load(path)
    study = Study(config, progress=False)
    study.run()
    chosen = KVFront(study, progress=False).run().drop(columns=["point"])
    source_bytes = study.source_grouping.kv_bytes_per_token(study.adapter.head_dim)
    assert set(chosen["family"]) == set(FAMILIES)
    for fraction, rows in chosen.groupby("budget_fraction"):
        assert (rows["kv_bytes"] <= fraction * source_bytes * (1 + 1e-9)).all()
        by_family = rows.set_index("family")
        # the joint search space holds every single-axis point: never worse on validation
        assert by_family.loc["joint", "valid_ppl"] == rows["valid_ppl"].min()
        assert rows["test_ppl"].notna().all()
    # at 100% the source at 16 bits is in every family; below it, only precision can serve the
    # quantization family, and at 30% no 16-bit grouping of 2 KV heads (of 3) fits
    assert "grouping" not in set(chosen[chosen["budget_fraction"] == 0.3]["family"])
    # the latent family: the source with latent layers allocated per budget, 16-bit
    latent = chosen[chosen["family"] == "latent"]
    assert set(latent["budget_fraction"]) == {1.0, 0.6, 0.45, 0.3}  # a smaller one fits 100%
    assert latent["model"].str.startswith("latent:").all()
    assert (latent["precision"] == "16-bit").all()
    points = front_frame("tiny", storage)
    assert {"uniform", "allocated", "16-bit"} <= set(points["cache"])
    assert points["valid_ppl"].notna().all()
    measured = _count(storage)

    # resumes, measures nothing: no point, and no error table (they are kept in the storage)
    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed front measured an error table again")

    with monkeypatch.context() as patched:
        patched.setattr("search.kv_front.kv_quant_errors", measured_again)
        patched.setattr("search.kv_front.latent_errors", measured_again)
        resumed = KVFront(Study(config, progress=False), progress=False)
        again = resumed.run()
        kept = resumed.latent_table()
    assert kept == KVFront(study, progress=False).latent_table()
    assert _count(storage) == measured
    assert again[["family", "model", "precision", "test_ppl"]].equals(
        chosen[["family", "model", "precision", "test_ppl"]]
    )
    # other validation windows (a changed config): nothing measured on the old ones is reused
    fewer = dataclasses.replace(config.precision, valid_windows=1)
    changed = dataclasses.replace(config, precision=fewer)
    front = KVFront(Study(changed, progress=False), progress=False)
    front.run()
    assert _count(storage) >= measured + len(points)
    assert front_frame("tiny", storage, front.windows())["valid_ppl"].notna().all()
    paths = byte_front_report(chosen, points, source_bytes, tmp_path / "report")
    assert paths["png"].stat().st_size > 0
    assert "| **joint** |" in paths["md"].read_text()
    # how many layers each chosen point groups further than the source: none for the source's
    # own points, every layer for a 16-bit grouping of fewer KV heads
    assert (chosen.loc[chosen["model"] == "source", "grouped_layers"] == 0).all()
    assert (chosen.loc[chosen["family"] == "latent", "grouped_layers"] == 0).all()
    grouped = chosen[chosen["family"] == "grouping"]
    assert (grouped.loc[grouped["model"] != "source", "grouped_layers"] == 2).all()
    assert "budgets where a single axis fits" in paths["md"].read_text()


def test_screening_measures_the_least_proxy_points_and_joint_stays_best(front_config):
    """With `screen = 1`, each budget and family measures only its fitting point of least proxy
    error; the joint family still chooses over every measured point, so it is never worse on
    validation, and fewer points are measured than without screening."""
    path, storage = front_config
    config = StudyConfig.load(path)
    study = Study(config, progress=False)
    study.run()
    one = dataclasses.replace(config, precision=dataclasses.replace(config.precision, screen=1))
    front = KVFront(Study(one, progress=False), progress=False)
    every = front.points(front.base_models())
    assert all(p.proxy >= 0 for p in every) and len({p.proxy for p in every}) > 1
    chosen = front.run()
    measured = front_frame("tiny", storage)
    assert 0 < len(measured) < len(every)
    expected = set()
    for fraction in config.precision.budgets:
        fits = [p for p in every if p.kv_bytes <= fraction * front.source_bytes * (1 + 1e-9)]
        for members in family_members(fits).values():
            if members:
                expected.add(min(members, key=lambda p: p.proxy).key)
    assert set(measured["key"]) == expected
    for _, rows in chosen.groupby("budget_fraction"):
        joint = rows.set_index("family").loc["joint", "valid_ppl"]
        assert joint == rows["valid_ppl"].min()


def test_full_precision_windows_are_tried_and_their_bytes_counted(front_config):
    """With `window = [0, 4]` and bytes counted at 24 tokens, the uniform baselines and the
    allocations run once per window; every point's bytes are its cache's exact size at 24 tokens
    (the window's tokens and the last partial block at 16 bits) per token, so a windowed point
    costs more than the same bits without the window, and every allocated point fits its budget
    counted so."""
    path, _ = front_config
    path.write_text(
        path.read_text().replace(
            "test_windows = 2", "test_windows = 2\nwindow = [0, 4]\ncontext = 24"
        )
    )
    config = StudyConfig.load(path)
    assert config.precision.windows == (0, 4) and config.byte_context == 24
    study = Study(config, progress=False)
    study.run()
    front = KVFront(study, progress=False)
    points = front.points(front.base_models())
    head_dim = study.adapter.head_dim
    for point in points:
        if point.model.latent is not None:
            continue
        counts = Budget.of(point.model.grouping)
        plan = point.plan or PrecisionPlan.uniform(front.layers, 16)
        exact = plan.cache_bytes(counts.k, counts.v, head_dim, 24) / 24
        assert point.kv_bytes == pytest.approx(exact, rel=1e-12)
    uniform = {(p.plan.label(), p.plan.window): p.kv_bytes for p in points if p.cache == "uniform"}
    assert {w for _, w in uniform} == {0, 4}
    # 8 bits in groups of 4 cost 2 bytes a value, as 16 bits do: there the window is free
    for (label, window), kv_bytes in uniform.items():
        if window:
            without = uniform[label.removesuffix(f" w{window}"), 0]
            assert kv_bytes > without or (label.startswith("K8/V8 g4") and kv_bytes == without)
    allocated = [p for p in points if p.cache == "allocated"]
    assert {p.plan.window for p in allocated} == {0, 4}
    for point in allocated:  # each was allocated under some budget and fits it as counted
        assert any(
            point.kv_bytes <= f * front.source_bytes * (1 + 1e-9) for f in config.precision.budgets
        )
    # counted in the steady state the window would be free: here it is not
    windowed = [p for p in allocated if p.plan.window == 4 and p.model.latent is None]
    assert windowed
    for point in windowed:
        counts = Budget.of(point.model.grouping)
        assert point.kv_bytes > point.plan.bytes_per_token(counts.k, counts.v, head_dim)


def test_a_layer_mix_takes_each_layer_from_the_model_the_allocation_picks(front_config):
    """With the source's layer 0 and the 2-KV winner's layer 1 made prohibitively bad, the joint
    allocation must mix: layer 0 from the winner, layer 1 from the source. The mixed model is
    built from those layers, measured, recorded with its grouping, and found again by name."""
    path, storage = front_config
    study = Study(StudyConfig.load(path), progress=False)
    study.run()
    front = KVFront(study, progress=False)
    models = front.base_models()
    winner = next(n for n in models if n.startswith("2kv:"))
    models = {"source": models["source"], winner: models[winner]}
    bad = {"source": (1e12, 0.0), winner: (0.0, 1e12)}
    front.layer_errors = lambda model: bad[model.name]
    budget = ByteBudget.of_source(0.9, front.source_bytes)  # the source does not fit at 16 bits
    point = front._layer_mix(models, budget)
    assert point.model.is_mix and point.kv_bytes <= budget.bytes_per_token
    mixed = point.model.grouping
    assert mixed.layers == (models[winner].grouping.layers[0], models["source"].grouping.layers[1])
    assert point.model.layers in (f"1 {winner}, 1 source", f"1 source, 1 {winner}")
    value = front._measure(point, VALID_SPLIT)
    assert math.isfinite(value)
    row = front_frame("tiny", storage).set_index("model").loc[point.model.name]
    assert Grouping.from_json(row["grouping"]) == mixed and row["valid_ppl"] == value
    # the layer-wise fit of the winner's layer 0 is the one its stage-2 model got (LayerFitCache)
    model, own = front.module(point.model), front.module(models[winner])
    ours = get_adapter(model).attention(0).state_dict()
    theirs = get_adapter(own).attention(0).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_layer_mix_may_make_source_layers_latent(front_config):
    """With latent layers made free (a zero error table) and the winner's layers prohibitively
    bad, the joint allocation takes latent layers of the source; the mix is built with them
    (16-bit there, the plan's bits elsewhere), its bytes are the latent widths' and it runs;
    with quantized latents free too, it quantizes them under a budget 16-bit latents miss."""
    path, _ = front_config
    study = Study(StudyConfig.load(path), progress=False)
    study.run()
    front = KVFront(study, progress=False)
    table = front.latent_table()
    free = dataclasses.replace(
        table,
        errors=tuple({k: dict.fromkeys(e, 0.0) for k, e in row.items()} for row in table.errors),
    )
    front.latent_table = lambda window=None: free
    models = front.base_models()
    winner = next(n for n in models if n.startswith("2kv:"))
    models = {"source": models["source"], winner: models[winner]}
    front.layer_errors = lambda model: {"source": (0.0, 0.0), winner: (1e12, 1e12)}[model.name]
    budget = ByteBudget.of_source(0.3, front.source_bytes)
    point = front._layer_mix(models, budget)
    latent = point.model.latent
    assert latent is not None and point.kv_bytes <= budget.bytes_per_token
    assert "of the source's latent" in point.model.layers
    widths = 0
    for ranks, precision in zip(latent.layers, point.plan.layers, strict=True):
        assert ranks.is_latent and (precision.k_bits, precision.v_bits) == (16, 16)
        widths += ranks.k_rank + ranks.v_rank
    assert point.kv_bytes == 2 * widths
    module = front.module(point.model)
    assert gqa.model_latent(module) == latent
    assert math.isfinite(front._measure(point, VALID_SPLIT))

    # Quantized latents free too, and a budget below every 16-bit latent: the mix quantizes
    # latents (the table measured them at the config's bits), counts their bytes and runs.
    free = dataclasses.replace(
        free,
        quantized=tuple(
            {k: dict.fromkeys(e, 0.0) for k, e in row.items()} for row in table.quantized
        ),
    )
    cheapest = sum(2 * min(free.ranks(i, k)) for i in range(2) for k in "kv")
    point = front._layer_mix(models, ByteBudget(0.9 * cheapest, 0.9 * cheapest / 1000))
    plan, latent = point.plan, point.model.latent
    quantized = [
        (ranks.k_rank, precision.k_bits)
        for ranks, precision in zip(latent.layers, plan.layers, strict=True)
        if ranks.k_rank and precision.k_bits < 16
    ]
    assert quantized and point.kv_bytes <= 0.9 * cheapest
    assert point.kv_bytes == front._bytes(plan, point.model)
    assert math.isfinite(front._measure(point, VALID_SPLIT))


def test_bad_precision_settings_are_one_line_errors(front_config, tmp_path, capsys):
    path, _ = front_config
    text = path.read_text()
    for old, new, message in [
        ("bits = [8, 4, 2]", "bits = [8, 5]", "precision.bits: expected a non-empty list from"),
        ("budgets = [1.0", "budgets = [1.5", "precision.budgets: expected fractions"),
        ("test_windows = 2", "test_windows = 2\nscreen = -1", "precision.screen: must be >= 0"),
        ("test_windows = 2", "test_windows = 2\nwindow = [8, -1]", "precision.window: expected"),
        ("test_windows = 2", "test_windows = 2\nwindow = []", "precision.window: expected"),
        ("test_windows = 2", "test_windows = 2\ncontext = -5", "precision.context: must be >= 0"),
        ("latent_ranks = [4, 8, 16]", "latent_ranks = [4, 0]", "precision.latent_ranks: expected"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=message):
            StudyConfig.load(bad)
        assert main(["study", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
    bad.write_text(text.replace("group_sizes = [8, 4]", "group_sizes = [8, 3]"))
    with pytest.raises(ValueError, match="group_sizes: 3 does not divide head_dim 8"):
        Study(StudyConfig.load(bad), progress=False)  # before any work
    assert main(["study", "--config", str(bad)]) == 2
    assert "does not divide head_dim 8" in capsys.readouterr().err


def test_convert_with_bad_kv_bits_exits_2(tmp_path, smol_tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", smol_tokenizer)
    for flags, message in [
        (["--kv-bits", "5"], "k_bits = 5 is not supported"),
        (["--kv-bits", "4,3", "--kv-group", "3"], "group_size 3 does not divide head_dim 8"),
    ]:
        code = main(["convert", "--model", str(model), *flags, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "o").exists()
    code = main(
        [
            "convert",
            "--model",
            str(model),
            "--kv-bits",
            "4,2",
            "--kv-group",
            "4",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["headgroup_kv_precision"]["layers"] == [[4, 2], [4, 2]]


def test_16_bit_points_take_stage_2_measurements_on_the_same_windows(front_config, monkeypatch):
    """The source and each stage-2 winner at 16 bits are the models stage 2 measured: on the same
    windows the front records stage 2's perplexities instead of measuring them again; on other
    windows it measures."""
    import objectives.selection as module
    from search.results import stage2_frame

    path, storage = front_config
    path.write_text(path.read_text().replace("valid_windows = 2", "valid_windows = 3"))
    path.write_text(
        path.read_text().replace("seq_len = 16\npruner", "seq_len = 16\nvalid_windows = 3\npruner")
    )
    config = StudyConfig.load(path)
    assert config.promote.valid_windows == config.precision.valid_windows == 3
    assert config.promote.ppl_windows == config.precision.test_windows == 2
    study = Study(config, progress=False)
    study.run()
    measured = []
    perplexity = module.perplexity
    monkeypatch.setattr(
        module,
        "perplexity",
        lambda model, *a, **k: measured.append(model) or perplexity(model, *a, **k),
    )
    front = KVFront(study, progress=False)
    front.run()
    points = front_frame("tiny", storage).set_index("key")
    stage2 = stage2_frame("tiny", storage)
    shared = 0
    for name, base in front.base_models().items():
        row = base.stage2
        key = json.dumps([name, None], sort_keys=True)
        if key not in points.index:
            continue  # screened out
        shared += 1
        s2 = stage2[stage2["trial"] == row["trial"]].iloc[0]
        assert points.loc[key, "valid_ppl"] == s2["valid_ppl"]
        if not math.isnan(points.loc[key, "test_ppl"]):
            assert points.loc[key, "test_ppl"] == s2["ppl"]
    assert shared >= 1  # the source at 16 bits is in every family at 100%
    measured_by_front = sum(points[c].notna().sum() for c in ("valid_ppl", "test_ppl"))
    assert len(measured) < measured_by_front

    # Other windows: the front measures the 16-bit source itself.
    more = dataclasses.replace(config.precision, valid_windows=1)
    front = KVFront(
        Study(dataclasses.replace(config, precision=more), progress=False), progress=False
    )
    source = next(
        p for p in front.points(front.base_models()) if p.key == json.dumps(["source", None])
    )
    assert front._from_stage2(source, "valid_ppl") is None
    assert (
        front._from_stage2(source, "test_ppl") == stage2[stage2["kind"] == "source"]["ppl"].iloc[0]
    )


def test_compare_commands_on_a_study_that_has_not_run_say_what_to_run(front_config, capsys):
    path, _ = front_config
    for command in ("compare-bytes", "compare"):
        assert main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "headgroup study --config" in err, err


def test_the_front_says_plainly_where_grouping_pays():
    """The report's last line: grouping at budgets where a single axis fits (it beat them on
    validation), apart from budgets where only stacking fits."""
    rows = [  # budget, family, grouped layers of the chosen point
        (0.25, "mixed_precision", 0),
        (0.25, "joint", 0),
        (0.17, "mixed_precision", 0),
        (0.17, "joint", 0),
        (0.12, "joint", 18),
    ]
    frame = pd.DataFrame(rows, columns=["budget_fraction", "family", "grouped_layers"])
    assert grouping_verdict(frame) == (
        "Grouping pays at none of the 2 budgets where a single axis fits: there the joint choice "
        "groups no layer. Where no single axis fits, only grouping stacked with the other axes "
        "does: 12% (18 layers). (Chosen on validation data.)\n"
    )
    frame.loc[3, "grouped_layers"] = 10
    assert grouping_verdict(frame).startswith(
        "Grouping pays at 1 of the 2 budgets where a single axis fits: the joint choice groups "
        "layers at 17% (10 layers)."
    )
    assert grouping_verdict(frame.drop(columns="grouped_layers")) == ""  # an older front's frame
