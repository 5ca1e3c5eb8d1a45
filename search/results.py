"""Read a study's results back from its storage as tables (the reports need nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from search.study import STAGE2_SUFFIX, make_storage

# The test scores a complete stage-2 candidate may carry (promote.tasks decides which), in the
# order reports show them; `acc_*` (one per multiple-choice task) follow.
TEST_SCORES = ("ppl", "mean_acc", "long_ppl", "passkey", "mdqa")


def load_study(name: str, storage) -> optuna.Study | None:
    """The Optuna study `name` in `storage` (a URL or a storage object), or None when the storage
    holds no such study; a missing SQLite or journal file is an error naming it."""
    if isinstance(storage, str):
        for prefix in ("sqlite:///", "journal:"):
            if storage.startswith(prefix) and not Path(storage.removeprefix(prefix)).is_file():
                raise FileNotFoundError(f"storage {storage} does not exist")
        storage = make_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def stage1_frame(name: str, storage) -> pd.DataFrame:
    """One row per complete stage-1 trial: budget, strategy, hyper-parameters, proxy, KV size."""
    study = load_study(name, storage)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study else []:
        if "key" not in t.user_attrs:
            continue
        params = {
            k: v for k, v in t.params.items() if k not in ("budget", "strategy", "allocation")
        }
        rows.append(
            {
                "trial": t.number,
                "budget": t.params.get("budget"),
                "strategy": t.params.get("strategy"),
                "allocation": t.params.get("allocation"),
                "params": json.dumps(params, sort_keys=True),
                "proxy": t.user_attrs["proxy"],
                "kv_bytes": t.user_attrs["kv_bytes"],
                "kv_heads": t.user_attrs["kv_heads"],
                "key": t.user_attrs["key"],
                "duplicate_of": t.user_attrs.get("duplicate_of"),
                "strategy_seconds": t.user_attrs.get("strategy_seconds"),
                "proxy_seconds": t.user_attrs.get("proxy_seconds"),
                "grouping": t.user_attrs["grouping"],
            }
        )
    return pd.DataFrame(rows)


def skipped_repeats(name: str, storage) -> int:
    """Stage-1 trials pruned because they repeated a deterministic configuration."""
    study = load_study(name, storage)
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if study else []
    return sum(1 for t in pruned if "copy_of" in t.user_attrs)


def stage2_frame(name: str, storage) -> pd.DataFrame:
    """One row per stage-2 candidate, complete or pruned (`state`): kind, budget, strategy, proxy,
    validation perplexity at each rung (`valid_ppl*`, what selection reads: the study's selection
    objective, objectives.selection, by default the short-window perplexity) and, for complete
    candidates, test perplexity (`ppl`), accuracies on the test questions and the long tasks'
    scores (`long_ppl`, `passkey`, `mdqa`) when promote.tasks asks for them."""
    study = load_study(name + STAGE2_SUFFIX, storage)
    rows = []
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=finished) if study else []:
        if "duplicate_of" in t.user_attrs or "item" not in t.user_attrs:
            continue  # an item enqueued twice by racing workers, or a claim that found none
        item = json.loads(t.user_attrs["item"])
        row = {
            k: item.get(k)
            for k in ("key", "kind", "budget", "strategy", "allocation", "proxy", "rank")
        }
        row["state"] = "complete" if t.state == TrialState.COMPLETE else "pruned"
        row.update(
            {
                k: v
                for k, v in t.user_attrs.items()
                if k not in ("item", "item_key", "worker", "results", "budget")
            }
        )
        rungs = json.loads(t.user_attrs.get("rungs", "[]"))
        if rungs and row["kind"] != "source":  # pruned candidates store only their rungs
            row.setdefault("valid_ppl_merged", rungs[0]["valid_ppl"])
            for rung in rungs[1:]:
                row.setdefault(f"valid_ppl_after_{rung['after']}", rung["valid_ppl"])
        row["trial"] = t.number
        row["grouping"] = item.get("grouping")
        rows.append(row)
    return pd.DataFrame(rows)


def test_columns(stage2: pd.DataFrame) -> list[str]:
    """The test-score columns `stage2` has: TEST_SCORES, then the accuracies per task."""
    return [c for c in TEST_SCORES if c in stage2] + sorted(
        c for c in stage2 if c.startswith("acc_")
    )


def rung_columns(stage2: pd.DataFrame) -> list[str]:
    """The validation-perplexity columns in rung order: merged, after each recovery method in the
    order the candidates' `rungs` record ran them (the storage returns attributes sorted by name),
    final."""
    order = {}
    for record in stage2["rungs"].dropna() if "rungs" in stage2 else ():
        order.update({f"valid_ppl_after_{r['after']}": None for r in json.loads(record)[1:]})
    after = [*order, *(c for c in stage2 if c.startswith("valid_ppl_after_") and c not in order)]
    return [c for c in ("valid_ppl_merged", *after, "valid_ppl") if c in stage2]


def summary_table(name: str, storage) -> str:
    """The table printed at the end of a study."""
    lines = []
    s1 = stage1_frame(name, storage)
    if not s1.empty:
        distinct = s1["key"].nunique()
        copies = skipped_repeats(name, storage)
        lines += [
            f"stage 1: {len(s1)} trials, {distinct} distinct groupings "
            f"({100 * distinct / len(s1):.0f}%); {copies} repeats of deterministic "
            "configurations skipped (not counted as trials)",
        ]
        best = s1.groupby(["budget", "strategy"]).agg(
            trials=("proxy", "size"), best_proxy=("proxy", "min"), kv_heads=("kv_heads", "first")
        )
        lines += [
            "stage 1: best proxy per budget (KV heads per layer) and strategy",
            best.to_string(),
            "",
        ]
    s2 = stage2_frame(name, storage)
    if not s2.empty:
        wanted = ("kind", "budget", "strategy", "proxy", "rank", "kv_heads", "state")
        cols = [c for c in (*wanted, *rung_columns(s2)) if c in s2] + test_columns(s2)
        lines += [
            "stage 2: candidates (valid_ppl*: the selection objective on validation at each rung,"
            " what selects; ppl, acc_* and long tasks: test data, complete candidates only)",
            s2.sort_values(["budget", "valid_ppl"], na_position="first")[cols].to_string(
                index=False
            ),
        ]
    return "\n".join(lines) if lines else f"study {name}: no results yet"
