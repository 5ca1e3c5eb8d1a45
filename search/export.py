"""Export a stage-2 candidate of a study as a model people can use.

The candidate is rebuilt exactly as the study built it (the study's merge and calibration
statistics, its recovery chain with the recorded seed), saved with `gqa.save` (a self-contained
folder: asymmetric groupings carry their modeling code), described in a model card (README.md),
and checked: its perplexity on the study's validation windows must match the study's record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

import gqa
from gqa.grouping import Grouping
from objectives.calibration import CalibrationConfig
from objectives.data import TextSpec
from objectives.evaluate import evaluate
from objectives.long_context import LongContextConfig
from objectives.selection import SelectionObjective
from search.config import PromoteConfig, SearchConfig, StudyConfig
from search.storage import make_storage

STAGE2_SUFFIX = ":stage2"
CARD = "README.md"
PPL_RTOL = 1e-3  # CPU float32 recomputation of the same model agrees far closer than this


class ExportError(ValueError):
    """The requested candidate cannot be exported (no such trial, pruned, not finished...)."""


@dataclass
class Export:
    folder: Path
    trial: FrozenTrial
    metric: str  # "valid_ppl" (the study's validation record) or "ppl" (older studies: test)
    recorded: float
    measured: float

    @property
    def matches(self) -> bool:
        return math.isclose(self.measured, self.recorded, rel_tol=PPL_RTOL)


def study_config(name: str, storage_url: str) -> StudyConfig:
    """The config a study was run with, as stage 1 recorded it in the storage."""
    storage = make_storage(storage_url)
    try:
        stage1 = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ExportError(f"no study {name!r} in {storage_url}") from None
    if "config" not in stage1.user_attrs:
        raise ExportError(f"study {name!r} records no config (was stage 1 run?)")
    data = json.loads(stage1.user_attrs["config"])
    search = {k: tuple(v) if isinstance(v, list) else v for k, v in data["search"].items()}
    promote = {k: tuple(v) if isinstance(v, list) else v for k, v in data["promote"].items()}
    return StudyConfig(
        name=data["name"],
        storage=storage_url,
        model=data["model"],
        seed=data["seed"],
        calibration=CalibrationConfig(**data["calibration"]),
        search=SearchConfig(**{**search, "strategies": {}}),  # stage 1 only; not needed here
        promote=PromoteConfig(**promote),
        selection=_selection(data.get("selection")),
    )


def _selection(data: dict | None) -> SelectionObjective:
    """The recorded selection objective (what validation values mean); older studies recorded
    none and selected by the short perplexity."""
    if data is None:
        return SelectionObjective()
    weights = tuple((task, float(weight)) for task, weight in data["weights"])
    return SelectionObjective(weights, LongContextConfig(**data["long_context"]))


def pick_trial(
    name: str, storage_url: str, trial: int | None = None, budget: float | None = None
) -> FrozenTrial:
    """Stage-2 trial `trial`, or the best searched candidate at `budget` by validation ppl."""
    try:
        stage2 = optuna.load_study(
            study_name=name + STAGE2_SUFFIX, storage=make_storage(storage_url)
        )
    except KeyError:
        raise ExportError(f"study {name!r} has no stage 2 in {storage_url}") from None
    trials = stage2.get_trials(deepcopy=False)
    if trial is not None:
        found = [t for t in trials if t.number == trial]
        if not found:
            raise ExportError(f"study {name!r} has no stage-2 trial {trial}")
        chosen = found[0]
        if chosen.state == TrialState.PRUNED:
            raise ExportError(
                f"stage-2 trial {trial} of {name!r} was pruned (not fully recovered or evaluated)"
                "; export a complete trial"
            )
        if chosen.state != TrialState.COMPLETE:
            raise ExportError(f"stage-2 trial {trial} of {name!r} is {chosen.state.name}")
        return chosen
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and "item" in t.user_attrs
        and json.loads(t.user_attrs["item"]).get("kind") == "searched"
        and json.loads(t.user_attrs["item"]).get("budget") == budget
    ]
    if not complete:
        budgets = sorted(
            {
                json.loads(t.user_attrs["item"]).get("budget")
                for t in trials
                if "item" in t.user_attrs
            }
            - {None}
        )
        raise ExportError(
            f"study {name!r} has no complete searched candidate at budget {budget} "
            f"(budgets: {', '.join(map(str, budgets))})"
        )
    key = "valid_ppl" if all("valid_ppl" in t.user_attrs for t in complete) else "ppl"
    return min(complete, key=lambda t: t.user_attrs[key])


def _ppl(study, model, split: str) -> float:
    promote = study.config.promote
    spec = TextSpec(split, promote.seq_len, promote.ppl_windows)
    result = evaluate(model, study.loaded.tokenizer, ["ppl"], ppl_spec=spec, progress=False)
    return result["ppl"]["perplexity"]


def export(
    name: str,
    storage_url: str,
    out: Path,
    trial: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    command: str = "",
) -> Export:
    """Rebuild, save, describe and check one stage-2 candidate of study `name`."""
    from search.study import Study

    chosen = pick_trial(name, storage_url, trial, budget)
    config = study_config(name, storage_url)
    study = Study(config, progress=progress)
    item = json.loads(chosen.user_attrs["item"])
    grouping = Grouping.from_json(item["grouping"])
    seed = chosen.user_attrs.get("recovery_seed")
    if item.get("kind") == "source":
        model = study.source
    else:
        model = study.build_candidate(grouping, recovery_seed=seed, progress=progress)
    if "valid_ppl" in chosen.user_attrs:
        metric, measured = "valid_ppl", study.validation_ppl(model)
    else:  # older studies recorded only the test perplexity
        metric, measured = "ppl", _ppl(study, model, "eval")
    folder = gqa.save(model.to("cpu"), out, tokenizer=study.loaded.tokenizer)
    result = Export(folder, chosen, metric, chosen.user_attrs[metric], measured)
    source_bytes = study.kv_bytes(study.source_grouping)
    (folder / CARD).write_text(
        model_card(config, chosen, item, grouping, source_bytes, result, command)
    )
    return result


def model_card(
    config: StudyConfig,
    trial: FrozenTrial,
    item: dict,
    grouping: Grouping,
    source_bytes: int,
    result: Export,
    command: str,
) -> str:
    """README.md of an exported folder: what it is, what it saves, what the study measured."""
    attrs = trial.user_attrs
    kv = attrs.get("kv_bytes", source_bytes)
    k_groups = [layer.num_k_groups for layer in grouping.layers]
    v_groups = [layer.num_v_groups for layer in grouping.layers]
    asymmetric = not grouping.is_uniform_shared()
    load = (
        "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)"
        if asymmetric
        else "AutoModelForCausalLM.from_pretrained(folder)"
    )
    recovery = ", ".join(config.promote.recovery) or "none"
    rec_cfg = {m: config.promote.recovery_config.get(m, {}) for m in config.promote.recovery}
    evals = {
        k: v
        for k, v in attrs.items()
        if k in ("ppl", "valid_ppl", "mean_acc", "ppl_before_recovery") or k.startswith("acc_")
    }
    lines = [
        f"# {config.model}, grouped-query attention ({item.get('strategy')}, "
        f"budget {item.get('budget')} KV heads/layer)",
        "",
        f"Exported by headgroup from stage-2 trial {trial.number} of study `{config.name}`"
        + (f": `{command}`" if command else "."),
        "",
        "## Model",
        f"- Source model: `{config.model}` ({grouping.num_heads} query heads, "
        f"{len(grouping.layers)} layers)",
        f"- Grouping ({'asymmetric' if asymmetric else 'uniform'}, kind `{item.get('kind')}`): "
        f"K groups per layer {k_groups}, V groups per layer {v_groups} "
        f"({grouping.kv_heads()} K+V heads in all); full grouping in `grouping.json`",
        f"- KV cache: {kv} bytes/token at 16 bits, against {source_bytes} for the source "
        f"({100 * kv / source_bytes:.1f}%, saving {100 * (1 - kv / source_bytes):.1f}%)",
        f"- Merge: `{config.search.merge}` with the study's calibration statistics",
        f"- Recovery: {recovery} {json.dumps(rec_cfg)} "
        f"(seed {attrs.get('recovery_seed', 'as configured')})",
        "",
        "## The study's evaluation",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(evals.items())],
        "",
        f"Check after export: {result.metric} {result.measured:.4f} recomputed, "
        f"{result.recorded:.4f} recorded ({'matches' if result.matches else 'DOES NOT MATCH'}).",
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "```",
        "Stock transformers is enough"
        + (
            ": the folder carries its modeling code (`modeling_headgroup.py`), and the KV cache"
            " holds the grouped heads."
            if asymmetric
            else " (plain GQA)."
        ),
        "",
    ]
    return "\n".join(lines)
