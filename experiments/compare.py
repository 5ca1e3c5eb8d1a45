"""The answer to "does the searched grouping beat the baselines after recovery?" for a finished study.

Per budget, the searched winner (the complete stage-2 candidate with the least *validation*
perplexity), `neighbour_kv` and `neighbour` are rebuilt with the study's merge and recovery chain
under several recovery seeds, and measured on test data only: perplexity on `windows` test windows
(per-window NLLs kept, so each difference gets a paired bootstrap 95% interval, resampling
windows), and accuracy on `limit` test questions per multiple-choice task (first seed only;
0: none).
Every (candidate, seed) result is written to `<out>/compare/` as it finishes, so a stopped run
resumes; `answer.json` and `answer.md` are rewritten at the end.

With `context` > 0 the comparison is at long context (experiments.held_out): perplexity of
the late position bucket of `windows` held-out long test documents of `context` tokens, and
passkey retrieval on the test prompts (first seed) with a paired interval over prompts; when the
study selects by those two, its objective (late ppl x key ppl) gets a paired interval too.

    headgroup compare --config F [--budgets 2,1.5] [--seeds 0,1] [--windows 48] [--limit 300]
        [--context 2048]
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments.held_out import HeldOutScoring
from gqa.grouping import Grouping, write_text_atomic
from objectives.evaluate import evaluate
from objectives.significance import paired_accuracy, paired_bootstrap, paired_objective
from search.config import StudyConfig
from search.results import rung_columns, stage2_frame
from search.study import Study

BASELINES = ("neighbour_kv", "neighbour")


@dataclass(frozen=True)
class CompareConfig:
    budgets: tuple[float, ...] | None = None  # None: every budget of the study
    seeds: tuple[int, ...] = (0, 1)
    windows: int = 48
    limit: int = 300
    resamples: int = 2000
    context: int = 0  # 0: the study's short windows; else long documents of this many tokens


def finalists(stage2: pd.DataFrame, budget: float) -> dict[str, dict]:
    """The best searched candidate on validation data and the baselines, at one budget. A
    candidate that completed the recovery chain comes first; when every searched candidate was
    pruned, the best one at its last rung is compared (so a loss to the baseline is shown too)."""
    rows = stage2[stage2["budget"] == budget]
    searched = rows[rows["kind"] == "searched"].copy()
    if searched.empty:
        raise ValueError(f"budget {budget:g}: the study has no searched candidate")
    rungs = searched[rung_columns(searched)[:-1]]  # merged, then after each recovery method
    searched["depth"] = rungs.notna().sum(axis=1)  # the rungs a pruned candidate got through
    searched["selection"] = searched["valid_ppl"].fillna(rungs.ffill(axis=1).iloc[:, -1])
    searched["pruned"] = searched["state"] != "complete"
    order = ["pruned", "depth", "selection"]
    best = searched.sort_values(order, ascending=[True, False, True]).iloc[0].to_dict()
    best["valid_ppl"] = best["selection"]
    out = {"searched": best}
    rows = rows[rows["state"] == "complete"]
    for name in BASELINES:
        base = rows[(rows["kind"] == "baseline") & (rows["strategy"] == name)]
        if len(base):
            out[name] = base.iloc[0].to_dict()
    return out


def cached_json(path: Path, compute) -> dict:
    """The JSON at `path`, or `compute()` written there atomically first: a stopped comparison
    resumes without measuring anything twice."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_text_atomic(path, json.dumps(value) + "\n")
    return value


def run_compare(config_path: Path, options: CompareConfig, out: Path | None = None) -> Path:
    """Two passes, each result cached as it finishes: first test perplexity of every finalist
    under every recovery seed (the answer with intervals), then accuracy (first seed)."""
    config = StudyConfig.load(config_path)
    out = out or Path("results") / config.name
    stage2 = stage2_frame(config.name, config.storage)
    if stage2.empty:
        raise ValueError(
            f"study {config.name!r} has no stage-2 results: run "
            f"`headgroup study --config {config_path}` first"
        )
    budgets = options.budgets or tuple(sorted(b for b in stage2["budget"].dropna().unique()))
    study = Study(config, progress=False)
    scoring = HeldOutScoring.of(config, study.loaded.tokenizer, options.windows, options.context)
    tasks = [t for t in config.promote.tasks if t != "ppl"] if options.limit > 0 else []
    folder = out / "compare"
    start = time.time()
    report: dict = {
        "study": config.name,
        "options": options.__dict__,
        "scored": scoring.describe(options.windows),
        "objective": scoring.objective_name,
        "budgets": {},
    }
    chosen: dict[float, dict[str, dict]] = {}
    for budget in budgets:
        try:
            chosen[budget] = finalists(stage2, budget)
        except ValueError as exc:  # no searched candidate at this budget
            report["budgets"][f"{budget:g}"] = {"skipped": str(exc)}
    if not chosen:
        raise ValueError(f"study {config.name!r}: no budget has a searched candidate")

    # First-seed models kept for the accuracy pass (a candidate shares all but its K/V with the
    # source, so keeping them is cheap and saves recovering them twice).
    kept: dict[tuple[float, str, int], torch.nn.Module] = {}

    def build(row: dict, seed: int, key: tuple[float, str], last: bool = True):
        """The candidate's model; a kept one is released on its `last` use."""
        if (*key, seed) in kept:
            return kept.pop((*key, seed)) if last else kept[(*key, seed)]
        grouping = Grouping.from_json(row["grouping"])
        model = study.build_candidate(grouping, recovery_seed=seed, progress=False)
        if seed == options.seeds[0] and (tasks or options.context):
            kept[(*key, seed)] = model
        return model

    per_window: dict[float, dict[str, np.ndarray]] = {}  # seed-averaged NLL per test window
    for budget, rows in chosen.items():  # pass 1: perplexity, every seed
        entry: dict = {"candidates": {}, "differences": {}}
        nlls: dict[str, np.ndarray] = per_window.setdefault(budget, {})
        for label, row in rows.items():
            per_seed = []
            for seed in options.seeds:

                def measure(row=row, seed=seed, label=label, budget=budget) -> dict:
                    t0 = time.time()
                    nll = scoring.nlls(build(row, seed, (budget, label)))
                    ppl = float(np.exp(nll.mean()))
                    print(f"{budget:g} KV heads, {label}, seed {seed}: test ppl {ppl:.2f}")
                    return {"nll": nll.tolist(), "ppl": ppl, "seconds": round(time.time() - t0, 1)}

                digest = study.candidate_digest(Grouping.from_json(row["grouping"]), seed)
                path = folder / f"{budget:g}kv_{label}_{digest}{scoring.suffix}_seed{seed}.json"
                per_seed.append(cached_json(path, measure))
            ppls = [r["ppl"] for r in per_seed]
            nlls[label] = np.mean([r["nll"] for r in per_seed], axis=0)  # seed-averaged windows
            entry["candidates"][label] = {
                "strategy": row["strategy"],
                "valid_ppl": row["valid_ppl"],
                "pruned_in_study": bool(row.get("pruned", False)),
                "test_ppl": ppls,
                "test_ppl_mean": statistics.fmean(ppls),
                "test_ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                "acc": {},
                "mean_acc": None,
                "questions": {},
                "kv_heads": Grouping.from_json(row["grouping"]).kv_heads(),  # pruned: not stored
            }
        for base in BASELINES:
            if base in nlls:
                diff = paired_bootstrap(nlls["searched"], nlls[base], options.resamples)
                entry["differences"][f"searched - {base}"] = {
                    "ppl": diff.difference,
                    "ci95": [diff.low, diff.high],
                    "excludes_zero": diff.excludes_zero,
                }
        report["budgets"][f"{budget:g}"] = entry
        _write_report(report, out, start)  # after each budget: a stopped run keeps what it has
    if options.context:  # pass 2: passkey retrieval, first seed, paired over prompts
        weights = scoring.objective_weights
        for budget, rows in chosen.items():
            found: dict[str, dict] = {}
            for label, row in rows.items():

                def retrieval(row=row, key=(budget, label)) -> dict:
                    model = build(row, options.seeds[0], key, last=not tasks)
                    return scoring.retrieval(model)

                grouping = Grouping.from_json(row["grouping"])
                digest = study.candidate_digest(grouping, options.seeds[0])
                name = f"{budget:g}kv_{label}_{digest}_retrieval{scoring.suffix}.json"
                found[label] = cached_json(folder / name, retrieval)
            entry = report["budgets"][f"{budget:g}"]
            terms = {}
            for label, hits in found.items():
                candidate = entry["candidates"][label]
                candidate["passkey"] = statistics.fmean(hits["passkey"])
                if weights:  # the study's objective on these documents and prompts
                    terms[label] = scoring.objective_terms(per_window[budget][label], hits)
                    candidate["objective"] = scoring.objective_value(terms[label])
            for base in BASELINES:
                if base in found:
                    difference = entry["differences"][f"searched - {base}"]
                    difference["passkey"] = paired_accuracy(
                        {"passkey": found["searched"]["passkey"]},
                        {"passkey": found[base]["passkey"]},
                        options.resamples,
                    ).as_dict()
                    if weights:
                        difference["objective"] = paired_objective(
                            terms["searched"], terms[base], weights, options.resamples
                        ).as_dict()
            _write_report(report, out, start)
    for budget, rows in chosen.items() if tasks else ():  # pass 3: accuracy, first seed
        for label, row in rows.items():

            def accuracy(row=row, key=(budget, label)) -> dict:
                results = evaluate(
                    build(row, options.seeds[0], key),
                    study.loaded.tokenizer,
                    tasks,
                    limit=options.limit,
                    progress=False,
                    subset="test",
                )
                return {t: {"acc": results[t]["acc"], "n": results[t]["n"]} for t in tasks}

            digest = study.candidate_digest(Grouping.from_json(row["grouping"]), options.seeds[0])
            name = f"{budget:g}kv_{label}_{digest}_acc{options.limit}.json"
            accs = cached_json(folder / name, accuracy)
            candidate = report["budgets"][f"{budget:g}"]["candidates"][label]
            candidate["acc"] = {t: v["acc"] for t, v in accs.items()}
            candidate["questions"] = {t: v["n"] for t, v in accs.items()}
            candidate["mean_acc"] = statistics.fmean(candidate["acc"].values())
            _write_report(report, out, start)
    return _write_report(report, out, start)


def _write_report(report: dict, out: Path, start: float) -> Path:
    report["seconds"] = round(time.time() - start, 1)
    write_text_atomic(out / "answer.json", json.dumps(report, indent=2) + "\n")
    path = out / "answer.md"
    write_text_atomic(path, answer_markdown(report))
    return path


def answer_markdown(report: dict) -> str:
    opts = report["options"]
    seeds = ", ".join(map(str, opts["seeds"]))
    lines = [
        f"# After recovery: searched winner vs baselines (study `{report['study']}`)",
        "",
        f"Test {report['scored']}; perplexity under recovery seeds {seeds} "
        f"(mean ± std); differences use seed-averaged per-window NLLs with a paired bootstrap "
        f"95% interval ({opts['resamples']} resamples of windows); passkey retrieval (first seed) "
        "with a paired interval over prompts. Accuracy: first seed, up to "
        f"{opts['limit']} test questions per task (- : not measured; --limit 0 measures none). "
        "The searched candidate "
        "was chosen on validation data.",
        "",
    ]
    for budget, entry in report["budgets"].items():
        lines += [f"## {budget} KV heads per layer", ""]
        if "skipped" in entry:
            lines += [f"Skipped: {entry['skipped']}.", ""]
            continue
        lines += [
            "| candidate | strategy | validation | test ppl | passkey | mean acc | accuracies |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, c in entry["candidates"].items():
            accs = ", ".join(f"{t} {a:.3f} (n={c['questions'][t]})" for t, a in c["acc"].items())
            mean_acc = f"{c['mean_acc']:.3f}" if c["mean_acc"] is not None else "-"
            retrieval = f"{c['passkey']:.3f}" if "passkey" in c else "-"
            pruned = " (pruned in the study)" if c.get("pruned_in_study") else ""
            lines.append(
                f"| {label} | {c['strategy']}{pruned} | {c['valid_ppl']:.2f} | "
                f"{c['test_ppl_mean']:.2f} ± {c['test_ppl_std']:.2f} | {retrieval} | "
                f"{mean_acc} | {accs} |"
            )
        lines.append("")
        objectives = {
            label: c["objective"] for label, c in entry["candidates"].items() if "objective" in c
        }
        if objectives:
            lines += [
                "Objective (the study's selection objective, "
                f"{report['objective']}, on these test documents and prompts): "
                + ", ".join(f"{label} {v:.2f}" for label, v in objectives.items()),
                "",
            ]
        for name, d in entry["differences"].items():
            verdict = "excludes 0" if d["excludes_zero"] else "includes 0"
            line = (
                f"- {name}: {d['ppl']:+.2f} perplexity, 95% CI [{d['ci95'][0]:+.2f}, "
                f"{d['ci95'][1]:+.2f}] ({verdict})"
            )
            for key, digits in (("passkey", 3), ("objective", 2)):
                if key in d:
                    p = d[key]
                    verdict = "excludes 0" if p["excludes_zero"] else "includes 0"
                    line += (
                        f"; {key} {p['difference']:+.{digits}f}, 95% CI "
                        f"[{p['ci95'][0]:+.{digits}f}, {p['ci95'][1]:+.{digits}f}] ({verdict})"
                    )
            lines.append(line)
        lines.append("")
    return "\n".join(lines)
