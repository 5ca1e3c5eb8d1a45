"""Study configs: every bad config fails before any work, naming the key."""

import pytest

from search.config import ConfigError, StudyConfig

BASE = {
    "study": {"name": "s", "storage": "sqlite:///x.db"},
    "model": {"name": "smollm2-135m"},
    "search": {"budgets": [2, 1.5], "strategies": {"kmeans": {"n_init": [2, 4]}, "neighbour": {}}},
}


def with_(path: str, value):
    data = {k: dict(v) for k, v in BASE.items()}
    data["search"]["strategies"] = dict(BASE["search"]["strategies"])
    section, _, key = path.partition(".")
    data.setdefault(section, {})[key] = value
    return data


def test_valid_config_parses_ranges():
    config = StudyConfig.from_dict(
        with_(
            "search.strategies",
            {"greedy": {"restarts": {"low": 0, "high": 3}, "improvement": ["best"]}},
        )
    )
    spaces = {space.name: space for space in config.search.strategies["greedy"]}
    restarts, improvement = spaces["restarts"], spaces["improvement"]
    assert restarts.integer and (restarts.low, restarts.high) == (0, 3)
    assert improvement.choices == ("best",)
    assert config.search.budgets == (2.0, 1.5)
    assert config.calibration.num_seqs == 32


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("search.budgets", [], "search.budgets: expected a non-empty list"),
        ("search.budgets", [0.5], "search.budgets: expected a non-empty list of numbers >= 1"),
        ("search.proxy", "magic", "search.proxy: unknown proxy 'magic'"),
        ("search.merge", "median", "search.merge: unknown merge 'median'"),
        ("search.trials", 0, "search.trials: must be at least 1"),
        ("search.table_budget_gb", 0, "search.table_budget_gb: must be positive"),
        ("search.table_budget_gb", "2GB", "search.table_budget_gb: expected int or float"),
        ("search.trials", "ten", "search.trials: expected int"),
        ("search.objective", "max", "search.objective: expected 'constrained' or 'pareto'"),
        ("search.strategies", {"annealing": {}}, "search.strategies.annealing: unknown strategy"),
        (
            "search.strategies",
            {"kmeans": {"clusters": 3}},
            "search.strategies.kmeans.clusters: unknown hyper-parameter",
        ),
        (
            "search.strategies",
            {"kmeans": {"n_init": {"low": 5, "high": 1}}},
            "search.strategies.kmeans.n_init: range needs numbers with low <= high",
        ),
        ("search.colour", "red", "search.colour: unknown key"),
        ("search.allocation", "layers", "search.allocation: expected true, false or 'kv'"),
        ("search.allocation", [False, 2], "search.allocation: expected true, false or 'kv'"),
        ("promote.recovery", "prayer", "promote.recovery: unknown method 'prayer'"),
        (
            "promote.recovery_config",
            {"layerwise": {"stepz": 3}},
            "promote.recovery_config.layerwise.stepz: unknown key",
        ),
        (
            "promote.recovery_config",
            {"finetune": {}},
            "promote.recovery_config.finetune: 'finetune' is not in promote.recovery",
        ),
        ("promote.tasks", ["ppl", "trivia"], "promote.tasks: unknown task 'trivia'"),
        ("promote.limit", 0, "promote.limit: expected a positive integer"),
        ("promote.baselines", ["nearest"], "promote.baselines: unknown strategy 'nearest'"),
        ("calibration.num_seqs", 0, "calibration: calibration num_seqs must be at least 1"),
        ("calibration.tokens", 5, "calibration.tokens: unknown key"),
        ("study.nme", "x", "study.nme: unknown key"),
    ],
)
def test_bad_configs_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StudyConfig.from_dict(with_(path, value))


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"search: missing section \[search\]"):
        StudyConfig.from_dict({"study": {"name": "s"}, "model": {"name": "m"}})
    with pytest.raises(ConfigError, match="does not exist"):
        StudyConfig.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        StudyConfig.load(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "experiments" / "configs").glob("*.toml"))
    assert {p.stem for p in configs} >= {"demo", "default", "llama2_7b_mha", "llama3_8b_gqa"}
    for path in configs:
        StudyConfig.load(path)


def test_table_budget_needs_a_table_proxy():
    data = with_("search.table_budget_gb", 2)
    assert StudyConfig.from_dict(data).search.table_budget_gb == 2
    data["search"]["proxy"] = "local_attn"
    with pytest.raises(ConfigError, match="proxy 'local_attn' keeps no group tables"):
        StudyConfig.from_dict(data)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr_scheduler": "warm"}, "finetune lr_scheduler must be one of linear, cosine, constant"),
        ({"text": "eval"}, "finetune text must be one of train, reading"),
        ({"tokens": -1}, "finetune tokens must be >= 0"),
        ({"tokenz": 300000}, "finetune.tokenz: unknown key"),
    ],
)
def test_bad_finetune_recipes_are_one_line_errors_and_exit_2(setting, message, tmp_path, capsys):
    from experiments.cli import main
    from tests.search.study_fixtures import write_config

    data = with_("promote.recovery", ["layerwise", "finetune"])
    data["promote"]["recovery_config"] = {"finetune": setting}
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict(data)
    path = write_config(tmp_path / "bad.toml", tmp_path / "model", "sqlite:///unused.db")
    ((key, value),) = setting.items()
    value = f'"{value}"' if isinstance(value, str) else value
    path.write_text(
        path.read_text().replace(
            'recovery = "layerwise"\nrecovery_config = {layerwise = {steps = 2}}',
            'recovery = ["layerwise", "finetune"]\n'
            f"recovery_config = {{finetune = {{{key} = {value}}}}}",
        )
    )
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize(
    "value, parsed", [(True, (True,)), ("kv", ("kv",)), ([False, True, "kv"], (False, True, "kv"))]
)
def test_allocation_takes_booleans_and_kv(value, parsed):
    assert StudyConfig.from_dict(with_("search.allocation", value)).search.allocation == parsed
