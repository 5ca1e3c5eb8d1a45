"""The main job (`make demo`, `headgroup demo`): run a study config end to end, then write every
report into one results folder with a README that states the command, the wall time and what the
numbers say.

    results/<study>/  pareto.png  pareto.csv  ablation.{md,csv,tex}  trials.csv
                      groupings/*.json  README.md
                      byte_front.{png,csv,md}  byte_points.csv   (when [precision] has budgets)
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pandas as pd

from experiments.byte_front_report import byte_front_report
from experiments.reports import ablation_report, pareto_report, rungs_report
from gqa.grouping import Grouping
from objectives.evaluate import TASKS
from search.config import StudyConfig
from search.kv_front import KVFront, front_frame
from search.results import stage1_frame, stage2_frame, summary_table
from search.study import Study


def write_groupings(stage2: pd.DataFrame, folder: Path) -> list[Path]:
    """One file per evaluated grouping; files of groupings no longer in the storage (an older
    study in the same folder) are removed, so the folder is what the storage holds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, row in stage2.iterrows():
        budget = "source" if row["kind"] == "source" else f"{row['budget']:g}kv"
        path = folder / f"{budget}_{row['strategy'] or 'source'}_{row['key']}.json"
        Grouping.from_json(row["grouping"]).save(path)
        paths.append(path)
    for stale in set(folder.glob("*.json")) - set(paths):
        stale.unlink()
    return paths


_ALLOCATION_TEXT = {  # a winner's [search] allocation, as findings name it
    True: ", budget allocated across layers)",
    "kv": ", budget allocated across layers and between K and V)",
}
LONG_TASKS = {"long_ppl": "late-position perplexity {:.1f}", "passkey": "passkey {:.2f}"}


def _long_text(row: pd.Series) -> str:
    """The long-context test numbers of a stage-2 row, if it has any: ", long_ppl ..."."""
    parts = [text.format(row[task]) for task, text in LONG_TASKS.items() if pd.notna(row.get(task))]
    return f" ({', '.join(parts)})" if parts else ""


def findings(stage2: pd.DataFrame) -> list[str]:
    """Plain statements, per budget, of how the best searched candidate compares with baselines."""
    if stage2.empty:
        return ["Stage 2 evaluated nothing."]
    lines = []
    source = stage2[stage2["kind"] == "source"]
    src_ppl = float(source["ppl"].iloc[0]) if len(source) and "ppl" in source else None
    src_acc = float(source["mean_acc"].iloc[0]) if len(source) and "mean_acc" in source else None
    if src_ppl is not None:
        lines.append(
            f"Source model: perplexity {src_ppl:.2f}"
            + (f", mean accuracy {src_acc:.3f}" if src_acc is not None else "")
            + _long_text(source.iloc[0])
            + "."
        )
    complete = stage2[stage2["state"] == "complete"]
    for budget, group in complete[complete["kind"] != "source"].groupby("budget"):
        searched = group[group["kind"] == "searched"].sort_values("valid_ppl")
        pruned = stage2[(stage2["budget"] == budget) & (stage2["state"] == "pruned")]
        if searched.empty:
            best_base = group.sort_values("valid_ppl").iloc[0]
            text = (
                f"At {budget:g} KV heads per layer every searched candidate was pruned on "
                f"validation ({len(pruned)} of them; the best baseline's validation value "
                f"{best_base['valid_ppl']:.1f}); {best_base['strategy']} reached test perplexity "
                f"{best_base['ppl']:.1f}{_long_text(best_base)}."
            )
            lines.append(text)
            continue
        best = searched.iloc[0]  # chosen on validation perplexity; test numbers reported
        text = f"At {budget:g} KV heads per layer the searched winner on validation ({best['strategy']}"
        text += _ALLOCATION_TEXT.get(best.get("allocation"), ")")
        text += f" reached test perplexity {best['ppl']:.1f}{_long_text(best)}"
        if pd.notna(best.get("valid_ppl_merged")):
            text += f" (validation {best['valid_ppl_merged']:.0f} merged, {best['valid_ppl']:.1f} recovered)"
        if "mean_acc" in best:
            text += f" and mean accuracy {best['mean_acc']:.3f}"
        for _, base in group[group["kind"] == "baseline"].iterrows():
            text += f"; {base['strategy']}: {base['ppl']:.1f}{_long_text(base)}"
            if pd.notna(base.get("valid_ppl_merged")):
                text += f" (validation {base['valid_ppl_merged']:.0f} / {base['valid_ppl']:.1f})"
            if "mean_acc" in base:
                text += f" / {base['mean_acc']:.3f}"
        if len(pruned):
            text += f"; {len(pruned)} searched candidate(s) pruned"
        if src_ppl is not None:
            text += f" (source {src_ppl:.1f}"
            text += f" / {src_acc:.3f})." if src_acc is not None else ")."
        lines.append(text)
    return lines


def write_readme(
    config: StudyConfig,
    out: Path,
    command: str,
    seconds: float,
    table: str,
    stage2: pd.DataFrame,
    byte_front: bool = False,
) -> Path:
    lines = [
        f"# Study `{config.name}`",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} min (wall time on this machine, summed over the runs "
        "that did the study's work).",
        f"Config: `{config.path}`; storage: `{config.storage}` (rerunning the command resumes from it).",
        f"Model `{config.model}`, proxy `{config.search.proxy}`, merge `{config.search.merge}`, "
        f"{config.search.trials} stage-1 trials, budgets {list(config.search.budgets)} KV heads per layer "
        f"(K and V each), recovery `{' then '.join(config.promote.recovery) or 'none'}`, "
        f"{_tasks_text(config)}, {config.promote.ppl_windows} x {config.promote.seq_len} test tokens; "
        + _selection_text(config),
        "",
        "## What the numbers say",
        "",
        *[f"- {line}" for line in findings(stage2)],
        "",
        "![Pareto fronts](pareto.png)",
        "",
        "![Validation perplexity against recovery effort](rungs.png)",
        "",
        *(_byte_front_section(config, out) if byte_front else []),
        "## Summary",
        "",
        "```",
        table,
        "```",
        "",
        "Files: `pareto.png`/`pareto.csv` (fronts), `ablation.md`/`.csv`/`.tex` (tables), `trials.csv` "
        "(every stage-1 and stage-2 trial), `groupings/` (the evaluated groupings, loadable with "
        "`headgroup convert --grouping`).",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _selection_text(config: StudyConfig) -> str:
    selection = config.selection
    if selection.is_short_ppl:
        return (
            f"selection and pruning read {config.promote.valid_windows} x "
            f"{config.promote.seq_len} validation tokens."
        )
    return (
        f"selection and pruning read the objective `{selection.describe()}` on validation "
        "(held-out long documents and retrieval prompts; objectives.selection): the `valid_ppl` "
        "columns hold its value."
    )


def _tasks_text(config: StudyConfig) -> str:
    tasks = list(config.promote.tasks)
    if tasks == ["ppl"]:
        return "tasks ['ppl'] (perplexity only)"
    if not any(t in TASKS for t in tasks):  # no multiple-choice task: no question limit
        return f"tasks {tasks}"
    return f"tasks {tasks} (limit {config.promote.limit} test questions)"


def _byte_front_section(config: StudyConfig, out: Path) -> list[str]:
    precision = config.precision
    measured = (
        f"{precision.valid_windows} x {config.promote.seq_len} validation tokens; test perplexity "
        f"on {precision.test_windows} x {config.promote.seq_len} test tokens"
        if config.selection.is_short_ppl
        else f"validation by the objective `{config.selection.describe()}`, which the 'valid ppl' "
        "and 'test ppl' columns hold (on validation and test prompts)"
    )
    return [
        "## Quality per KV byte (byte front)",
        "",
        f"Byte budgets {[f'{100 * b:g}%' for b in precision.budgets]} of the source's 16-bit cache; "
        f"cache bits {list(precision.bits)} (and 16), group sizes {list(precision.group_sizes)}, "
        f"full-precision window {' or '.join(map(str, precision.windows))} tokens, bytes counted "
        f"at {config.byte_context} tokens. Each family's point per budget is chosen on "
        f"{measured} (search.kv_front).",
        "",
        (out / "byte_front.md").read_text(),
        "![Byte front](byte_front.png)",
        "",
    ]


def run_main_job(config_path: Path, out: Path | None = None, progress: bool = True) -> Path:
    config = StudyConfig.load(config_path)
    out = out or Path("results") / config.name
    study = Study(config, progress=progress)
    study.run()
    front = None
    if config.precision.budgets:  # the byte front: grouping and cache precision together
        with study.timed():
            front = KVFront(study, progress=progress)
            chosen = front.run().drop(columns=["point"])
        points = front_frame(config.name, config.storage, front.windows())
        byte_front_report(chosen, points, front.source_bytes, out)
    # The study's wall time is kept in its storage, summed over the runs that did its work
    # (`headgroup study` runs and workers included), so a resumed study reports what it cost.
    seconds = study.wall_seconds()
    out.mkdir(parents=True, exist_ok=True)
    pareto_report(config.name, config.storage, out)
    ablation_report([config.name], config.storage, out)
    rungs_report(config.name, config.storage, out)
    stage1, stage2 = (
        stage1_frame(config.name, config.storage),
        stage2_frame(config.name, config.storage),
    )
    trials = pd.concat([stage1.assign(stage=1), stage2.assign(stage=2)], ignore_index=True)
    trials.drop(columns=["grouping"], errors="ignore").to_csv(out / "trials.csv", index=False)
    write_groupings(stage2, out / "groupings")
    table = summary_table(config.name, config.storage)
    command = (
        "headgroup " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:]
        else "headgroup demo"
    )
    readme = write_readme(config, out, command, seconds, table, stage2, front is not None)
    (out / "timing.json").write_text(json.dumps({"study_seconds": round(seconds, 1)}) + "\n")
    print(table)
    return readme
