"""The selection objective: its value against the tasks it mixes, its config, and a tiny study
whose stage 2 and byte front select by long-context perplexity and retrieval."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from objectives import long_context as lc
from objectives.evaluate import perplexity
from objectives.long_range import late_nll, nats_per_unit
from objectives.selection import SelectionObjective
from search.config import ConfigError, StudyConfig
from search.kv_front import KVFront, front_frame
from search.results import stage2_frame
from search.study import Study
from tests.search.study_fixtures import tiny_study
from tests.tiny import tiny_model

LONG = lc.LongContextConfig(
    seq_len=96, ppl_windows=1, buckets=(32,), lengths=(96,), depths=(0.5,), trials=1
)
SECTIONS = """
[selection]
objective = {long_ppl = 1.0, passkey = 0.5}

[long_context]
seq_len = 96
ppl_windows = 1
buckets = [32]
lengths = [96]
depths = [0.5]
trials = 1

[precision]
budgets = [1.0, 0.45]
bits = [4, 2]
group_sizes = [8]
valid_windows = 2
test_windows = 2
"""


def test_value_is_exp_of_the_weighted_losses(smol_tokenizer):
    model = tiny_model(num_heads=4, num_kv_heads=2, vocab_size=len(smol_tokenizer)).eval()
    windows = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    short = SelectionObjective()
    assert short.is_short_ppl and short.describe() == "ppl"
    assert short.value(model, smol_tokenizer, "valid", windows) == (
        perplexity(model, windows, progress=False).perplexity
    )
    mix = SelectionObjective.of({"ppl": 2.0, "long_ppl": 1.0, "passkey": 0.5}, LONG)
    long_ppl = lc.long_perplexity(model, smol_tokenizer, "valid", LONG, progress=False)
    passkey = lc.passkey(model, smol_tokenizer, "valid", LONG, progress=False)
    expected = math.exp(
        2 * math.log(perplexity(model, windows, progress=False).perplexity)
        + long_ppl["loss"]
        + 0.5 * passkey["answer_nll"]
    )
    assert mix.value(model, smol_tokenizer, "valid", windows) == pytest.approx(expected, rel=1e-9)
    assert mix.describe() == "long_ppl+0.5*passkey+2*ppl@96/1:96x1:0.5"


def test_bad_objectives_are_one_line_config_errors(tmp_path):
    base = "[study]\nname='x'\n[model]\nname='m'\n[search]\nbudgets=[2]\n"
    for extra, message in (
        ("[selection]\nobjective = {needle = 1.0}", "selection.objective: unknown selection task"),
        ("[selection]\nobjective = {ppl = 0}", "selection.objective: selection weight of 'ppl'"),
        ("[selection]\nobjective = {}", "selection.objective: the selection objective needs"),
        ("[long_context]\nbuckets = [4000]", "long_context: long_context buckets must increase"),
        ("[long_context]\nwindows = 3", "long_context.windows: unknown key"),
        (
            "[precision]\nbudgets = [0.5]\nlayer_costs = 'nats'",
            "precision.layer_costs: expected one of proxy, long_range, got 'nats'",
        ),
    ):
        path = tmp_path / "c.toml"
        path.write_text(base + extra)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            StudyConfig.load(path)
    path.write_text(base + SECTIONS)
    config = StudyConfig.load(path)
    assert config.selection.weights == (("long_ppl", 1.0), ("passkey", 0.5))
    assert config.long_context == LONG


@pytest.fixture()
def long_study(tmp_path, smol_tokenizer, monkeypatch):
    path, storage = tiny_study(tmp_path, smol_tokenizer, monkeypatch, SECTIONS, trials=3)
    return StudyConfig.load(path), storage


def test_stage_2_and_the_byte_front_select_by_the_long_objective(long_study):
    config, storage = long_study
    study = Study(config, progress=False)
    study.run()
    stage2 = stage2_frame("tiny", storage)
    source = stage2[stage2["kind"] == "source"].iloc[0]
    objective = config.selection
    windows = study._valid_windows
    expected = objective.value(study.source, study.loaded.tokenizer, "valid", windows)
    assert source["valid_ppl"] == pytest.approx(expected, rel=1e-6)
    # the long tasks of promote.tasks are not asked for: test reports hold ppl and piqa only
    assert "long_ppl" not in stage2

    front = KVFront(study, progress=False)
    chosen = front.run()
    assert all(objective.describe() in w for w in front.windows().values())
    for _, rows in chosen.groupby("budget_fraction"):
        assert rows.set_index("family").loc["joint", "valid_ppl"] == rows["valid_ppl"].min()
    # a 16-bit point's test value is the objective on test prompts, not stage 2's perplexity
    row = chosen[(chosen["family"] == "grouping") & (chosen["budget_fraction"] == 1.0)].iloc[0]
    point = row["point"]
    model = front.module(point.model)
    windows = front.text_windows("eval", 2)
    test_value = objective.value(model, study.loaded.tokenizer, "test", windows)
    assert row["test_ppl"] == pytest.approx(test_value, rel=1e-6)
    assert not any(math.isclose(v, row["test_ppl"], rel_tol=1e-6) for v in stage2["ppl"].dropna())
    points = front_frame("tiny", storage, front.windows())
    assert points["valid_ppl"].notna().all()


def test_a_stage_2_selected_by_another_objective_is_not_resumed(long_study):
    import dataclasses

    config, _ = long_study
    short = dataclasses.replace(config, selection=SelectionObjective())
    Study(short, progress=False).run()
    with pytest.raises(ValueError, match="selected by 'ppl', the config now by 'long_ppl"):
        Study(config, progress=False).run()


def test_protected_layers_stay_the_source_in_joint_layer_mixes(long_study):
    import dataclasses

    from search.byte_allocation import ByteBudget

    config, storage = long_study
    config = dataclasses.replace(config, precision=dataclasses.replace(config.precision, protect=1))
    study = Study(config, progress=False)
    study.run()
    front = KVFront(study, progress=False)
    models = front.base_models()
    winners = [model for name, model in models.items() if name != "source"]
    assert winners
    for model in winners:
        costs = front.long_range(model)
        assert len(costs.costs) == study.adapter.num_layers
        protected = costs.most_costly(1)[0]
        assert front._mix_errors(model)[protected] == math.inf
        assert front.long_range(model).costs == costs.costs  # stored, not measured again
    source = models["source"].grouping
    mixes = 0
    for fraction in config.precision.budgets:
        point = front._layer_mix(models, ByteBudget.of_source(fraction, front.source_bytes))
        if point is None:
            continue
        mixes += 1
        mixed = point.model.grouping
        for model in winners:
            protected = front.long_range(model).most_costly(1)[0]
            assert mixed.layers[protected] == source.layers[protected]
    assert mixes


def test_long_range_units_weigh_layers_by_their_cost_and_bits_at_a_measured_rate(
    long_study, monkeypatch
):
    from gqa.precision import PrecisionPlan
    from search import kv_front
    from search.byte_allocation import ByteBudget, allocate_joint, uniform_settings

    config, storage = long_study
    precision = dataclasses.replace(config.precision, layer_costs="long_range")
    config = dataclasses.replace(config, precision=precision)
    study = Study(config, progress=False)
    study.run()
    front = KVFront(study, progress=False)
    models = front.base_models()
    source = models["source"]
    winners = [model for name, model in models.items() if name != "source"]
    assert winners
    for model in winners:  # a layer costs its long-range cost (never below 0), compounded
        costs = front.long_range(model)
        errors = front.layer_errors(model)
        assert errors == tuple(costs.compounding() * max(c, 0.0) for c in costs.costs)
        if any(c > 0 for c in costs.costs):  # they add up to the whole model's cost
            assert sum(errors) == pytest.approx(costs.whole, rel=1e-9)
        whole = front.module(model)
        windows = lc.long_windows(study.loaded.tokenizer, "valid", LONG.seq_len, LONG.ppl_windows)
        expected = late_nll(whole, windows, LONG) - costs.base_nll
        assert costs.whole == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # the rate: the source's uniform settings, their late-NLL rises on their proxy errors
    group = precision.group_sizes[0]
    settings = uniform_settings(precision.bits, [group])
    plans = [PrecisionPlan.uniform(front.layers, k, v, g, 0) for k, v, g in settings]
    raw = front._proxy_table(source)
    rises = kv_front.precision_rises(
        front.module(source), study.loaded.tokenizer, plans, config.long_context, progress=False
    )
    rate = nats_per_unit([raw.plan_error(p) for p in plans], rises)
    assert front.nats_per_unit() == pytest.approx(rate, rel=1e-9)
    scaled = front._quant_table(source)
    assert scaled.errors[0]["k"][2] == pytest.approx(rate * raw.errors[0]["k"][2], rel=1e-12)
    # the mixes minimise nats: the joint allocation over those units
    budget = ByteBudget.of_source(min(precision.budgets), front.source_bytes)
    point = front._layer_mix(models, budget)
    expected = allocate_joint(
        {name: front._quant_table(m) for name, m in models.items()},
        {name: front.layer_errors(m) for name, m in models.items()},
        budget.bytes_per_token,
        front.head_dim,
        (*precision.bits, 16),
        context=front.context,
    )
    assert point.proxy == pytest.approx(expected.error, rel=1e-12)
    # a cost stored without the whole model's (an older storage) gets it measured once
    key = next(k for k in front.storage_study.user_attrs if k.startswith("long_range:"))
    stored = front.storage_study.user_attrs[key]
    front.storage_study.set_user_attr(key, {**stored, "whole": None})
    older = KVFront(Study(config, progress=False), progress=False)
    named = next(m for m in winners if key.startswith(f"long_range:{m.name}:"))
    assert older.long_range(named).whole == pytest.approx(stored["whole"], rel=1e-9)
    assert older.storage_study.user_attrs[key]["whole"] == pytest.approx(stored["whole"])
    # kept in the storage: a new front measures nothing again
    monkeypatch.setattr(kv_front, "precision_rises", _must_not_run)
    monkeypatch.setattr(kv_front, "long_range_costs", _must_not_run)
    again = KVFront(Study(config, progress=False), progress=False)
    assert again.nats_per_unit() == pytest.approx(rate, rel=1e-12)
    assert again.layer_errors(winners[0]) == front.layer_errors(winners[0])


def _must_not_run(*args, **kwargs):
    raise AssertionError("measured again")


def test_a_long_range_rank_proxy_reads_the_studys_long_documents(long_study):
    config, _ = long_study
    config = dataclasses.replace(
        config, search=dataclasses.replace(config.search, rank_proxy="long_range")
    )
    study = Study(config, progress=False)
    proxy = study.context().reranker
    assert proxy.name == "long_range" and proxy.long_config == config.long_context
    assert tuple(proxy.windows.shape) == (LONG.ppl_windows, LONG.seq_len)
    assert (
        proxy.windows.tolist() == lc.long_windows(study.loaded.tokenizer, "valid", 96, 1).tolist()
    )


def test_kv_allocation_divides_the_heads_between_k_and_v_by_long_range_curves(long_study):
    from search.budget import Budget, allocate_kv_together
    from search.strategies import make_strategy, with_partition

    config, _ = long_study
    config = dataclasses.replace(
        config, search=dataclasses.replace(config.search, rank_proxy="long_range")
    )
    study = Study(config, progress=False)
    rank, source = study.rank_proxy, study.source_grouping.layers
    budget = study.budget(1.5, allocation="kv")
    spread = Budget.from_average(study.adapter.num_layers, 1.5)
    assert budget.total == spread.total
    # the curves: per layer and kind, the long-range cost of merging that kind alone to G groups
    # (coarsen_source's candidates re-ranked by the proxy), the other kind kept as in the source
    ctx = study.context()
    curves = {}
    for kind in ("k", "v"):
        strategy = make_strategy("coarsen_source")
        curves[kind] = [
            [
                rank.layer_score(
                    layer,
                    with_partition(
                        source[layer], kind, strategy.layer_partition(ctx, layer, kind, g)
                    ),
                )
                for g in range(1, study.adapter.num_heads + 1)
            ]
            for layer in range(study.adapter.num_layers)
        ]
    assert budget == allocate_kv_together(curves["k"], curves["v"], spread.total)
    for kind in ("k", "v"):  # merging one kind alone changes the late loss of that layer
        assert any(curve[0] != 0 for curve in curves[kind])
    shared = study.budget(1.5, allocation=True)
    assert shared.k == shared.v and shared.total == spread.total


def test_compare_and_compare_bytes_pair_the_studys_objective_at_long_context(
    tmp_path, smol_tokenizer, monkeypatch
):
    import json

    from experiments.cli import main
    from experiments.compare import finalists
    from experiments.held_out import long_config_at
    from gqa.grouping import Grouping

    sections = SECTIONS.replace("trials = 1", "trials = 3")  # prompts to pair
    path, storage = tiny_study(tmp_path, smol_tokenizer, monkeypatch, sections, trials=12)
    config = StudyConfig.load(path)
    study = Study(config, progress=False)
    study.run()
    KVFront(study, progress=False).run()
    base = ["--config", str(tmp_path / "c.toml"), "--seeds", "0", "--windows", "2"]
    base += ["--limit", "0", "--context", "96"]
    assert main(["compare", *base, "--out", str(tmp_path / "a")]) == 0
    answer = json.loads((tmp_path / "a" / "answer.json").read_text())
    assert answer["objective"] == "long_ppl^1 * passkey^0.5"
    budget, entry = next((b, e) for b, e in answer["budgets"].items() if "candidates" in e)
    # The searched candidate's objective is the study's, on 2 test documents and the test prompts
    row = finalists(stage2_frame("tiny", storage), float(budget))["searched"]
    model = study.build_candidate(Grouping.from_json(row["grouping"]), recovery_seed=0)
    objective = dataclasses.replace(
        config.selection, long_context=long_config_at(config.long_context, 96, 2)
    )
    expected = objective.value(model, study.loaded.tokenizer, "test", None)
    assert entry["candidates"]["searched"]["objective"] == pytest.approx(expected, rel=1e-6)
    for name, diff in entry["differences"].items():
        other = entry["candidates"][name.removeprefix("searched - ")]["objective"]
        value = diff["objective"]
        assert value["difference"] == pytest.approx(expected - other, rel=1e-6, abs=1e-9)
        assert value["ci95"][0] <= value["difference"] <= value["ci95"][1]
    assert "objective" in (tmp_path / "a" / "answer.md").read_text()

    run = KVFront.run

    def contested(self):  # at 45%: the joint takes another point than the best single axis
        chosen = run(self)
        rows = chosen[chosen["budget_fraction"] == 0.45]
        best = rows[rows["family"] != "joint"].sort_values("valid_ppl").iloc[0]["point"].key
        joint = rows.index[rows["family"] == "joint"][0]
        chosen.at[joint, "point"] = next(p for p in rows["point"] if p.key != best)
        return chosen

    monkeypatch.setattr(KVFront, "run", contested)
    assert main(["compare-bytes", *base, "--out", str(tmp_path / "b")]) == 0
    entry = json.loads((tmp_path / "b" / "byte_answer.json").read_text())["budgets"]["0.45"]
    joint, single = entry["joint"]["objective"], entry["best single-axis"]["objective"]
    value = entry["joint - single"]["objective"]
    assert value["difference"] == pytest.approx(joint - single, rel=1e-6, abs=1e-9)
    assert value["ci95"][0] <= value["difference"] <= value["ci95"][1]
    assert (
        "Objective: the study's selection objective"
        in (tmp_path / "b" / "byte_answer.md").read_text()
    )


def test_export_checks_a_long_selected_candidate_by_the_studys_objective(
    long_study, tmp_path, capsys
):
    from experiments.cli import main
    from search.export import study_config

    config, storage = long_study
    Study(config, progress=False).run()
    # The recorded config carries the objective, so the check recomputes what validation read
    assert study_config("tiny", storage).selection == config.selection
    argv = ["export", "--study", "tiny", "--storage", storage, "--trial", "0"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "matches" in printed and "DOES NOT" not in printed


def test_a_stage_2_recovered_by_another_chain_is_not_resumed(long_study):
    """Its finished candidates would be ranked against new ones recovered differently; the
    error names what changed."""
    import dataclasses

    config, storage = long_study
    Study(config, progress=False).run()
    promote = config.promote
    assert "layerwise" in promote.recovery
    before = promote.recovery_config.get("layerwise", {}).get("steps", "(unset)")
    chain = {**promote.recovery_config, "layerwise": {"steps": 7}}
    changed = dataclasses.replace(
        config, promote=dataclasses.replace(promote, recovery_config=chain)
    )
    with pytest.raises(ValueError) as error:
        Study(changed, progress=False).run()
    message = str(error.value)
    assert message.startswith("stage 2 of study 'tiny' recovered its candidates by another chain")
    assert f"(promote.recovery_config.layerwise.steps: {before} -> 7)" in message
    assert "\n" not in message
    Study(config, progress=False).run()  # the recorded chain resumes (nothing left to do)
    assert len(stage2_frame("tiny", storage)) > 0
