"""The answer on the byte front: per byte budget, the joint winner against the best single-axis point.

For each budget of a study's byte front (search.kv_front, resumed from the storage, so nothing
already measured is measured again), the joint family's choice and the best single-axis choice
(quantization, mixed precision or grouping, whichever has the least validation perplexity) are
measured on `windows` test windows under every recovery seed (points on the source model need no
recovery and are measured once). The difference gets a paired bootstrap 95% interval over
windows, from seed-averaged per-window NLLs. Accuracy on `limit` test questions per task (first
seed) when `limit` > 0, at the budgets where the two choices differ (elsewhere the difference is
exactly 0, or there is no single-axis point to compare with), with a paired bootstrap interval
over questions from the per-question outcomes. Every (point, seed) result is cached in `<out>/compare_bytes/`.

With `context` > 0 the comparison is at long context: the per-window NLL is that of the late
position bucket of `windows` held-out long test documents of `context` tokens
(objectives.long_context), and where the two choices differ, passkey retrieval on the test prompts
(the study's [long_context] lengths up to `context`) gets a paired interval over prompts.

With `control`, where the two differ and the single-axis point is on the source (quantization,
mixed precision, latent), the joint point is also compared with that point rebuilt on the control:
the source recovered by the study's chain, under each seed, with the recipe and text every
candidate gets. A joint mix's recovery trains its source layers too; the control separates that
training from where the mix puts its heads and bits.

    headgroup compare-bytes --config F [--budgets 0.2,0.17] [--seeds 0,1] [--windows 48]
        [--limit 300] [--context 2048] [--control]
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gqa
from experiments.compare import cached_json
from experiments.held_out import HeldOutScoring
from gqa.grouping import write_text_atomic
from objectives.evaluate import question_outcomes
from objectives.significance import paired_accuracy, paired_bootstrap, paired_objective
from search.config import StudyConfig
from search.kv_front import KVFront
from search.study import Study

# per window, question and prompt: used for intervals, not reported
PER_ITEM = ("nll", "correct", "retrieved", "terms")


@dataclass(frozen=True)
class ByteCompareConfig:
    budgets: tuple[float, ...] | None = None  # byte fractions of the study's; None: every one
    seeds: tuple[int, ...] = (0, 1)
    windows: int = 48
    limit: int = 300
    resamples: int = 2000
    context: int = 0  # 0: the study's short windows; else long documents of this many tokens
    control: bool = False  # also the single-axis point on the source recovered like candidates


def _study_budgets(asked: tuple[float, ...] | None, budgets) -> list[float] | None:
    """The study's byte budgets that `asked` names (None: all of them, unfiltered); a fraction
    that is none of them is an error, raised before any work."""
    if asked is None:
        return None
    unknown = [b for b in asked if not any(math.isclose(b, k) for k in budgets)]
    if unknown:
        raise ValueError(
            f"--budgets {','.join(f'{b:g}' for b in unknown)} not among the study's byte "
            f"budgets {','.join(f'{b:g}' for b in budgets)} (fractions of the source's cache)"
        )
    return [k for k in budgets if any(math.isclose(b, k) for b in asked)]


def run_compare_bytes(config_path: Path, options: ByteCompareConfig, out: Path | None = None):
    config = StudyConfig.load(config_path)
    asked = _study_budgets(options.budgets, config.precision.budgets)
    out = out or Path("results") / config.name
    study = Study(config, progress=False)
    front = KVFront(study, progress=False)
    chosen = front.run()
    if asked is not None:
        chosen = chosen[chosen["budget_fraction"].isin(asked)]
    scoring = HeldOutScoring.of(config, study.loaded.tokenizer, options.windows, options.context)
    context = scoring.suffix
    tasks = [t for t in config.promote.tasks if t != "ppl"] if options.limit > 0 else []
    # At long context, the study's selection objective where it reads what is scored here
    weights = scoring.objective_weights if options.context else None
    folder = out / "compare_bytes"
    start = time.time()
    report: dict = {
        "study": config.name,
        "options": options.__dict__,
        "seq_len": config.promote.seq_len,
        "scored": scoring.describe(options.windows),
        "objective": scoring.objective_name,
        "budgets": {},
    }

    def model_of(point, seed, control=False):
        model = front.module(point.model, seed, control)
        return gqa.apply_precision(model, point.plan)

    def measure(point, with_accuracy: bool, control: bool = False) -> dict:
        recovered = control or not point.model.is_source
        seeds = options.seeds if recovered else options.seeds[:1]

        def digest(seed: int) -> str:  # the point and how its model is built
            model = point.model
            recipe = study.candidate_digest(model.grouping, seed) if recovered else ""
            name = ("control:" if control else "") + point.key + recipe
            return hashlib.sha1(name.encode()).hexdigest()[:12]

        per_seed = []
        for seed in seeds:

            def nlls(seed=seed) -> dict:
                nll = scoring.nlls(model_of(point, seed, control))
                return {"nll": nll.tolist(), "ppl": math.exp(float(nll.mean()))}

            path = folder / f"{digest(seed)}_w{options.windows}{context}_seed{seed}.json"
            per_seed.append(cached_json(path, nlls))
        result = {
            "model": point.model.name,
            "layers": point.model.layers,
            "precision": point.label(),
            "kv_fraction": point.kv_bytes / front.source_bytes,
            "test_ppl": [r["ppl"] for r in per_seed],
            "nll": np.mean([r["nll"] for r in per_seed], axis=0),
        }
        if tasks and with_accuracy:

            def outcomes() -> dict:  # per task, whether each question was answered right
                model = model_of(point, options.seeds[0], control)
                return {
                    task: question_outcomes(
                        model,
                        study.loaded.tokenizer,
                        task,
                        options.limit,
                        progress=False,
                        subset="test",
                    )[0]
                    for task in tasks
                }

            path = folder / f"{digest(options.seeds[0])}_questions{options.limit}.json"
            result["correct"] = cached_json(path, outcomes)
            result["accuracy"] = {t: statistics.fmean(v) for t, v in result["correct"].items()}
            result["mean_acc"] = statistics.fmean(result["accuracy"].values())
        if options.context and with_accuracy:

            def retrieval() -> dict:  # per test prompt: whether the key was retrieved, its NLL
                return scoring.retrieval(model_of(point, options.seeds[0], control))

            path = folder / f"{digest(options.seeds[0])}_retrieval{context}.json"
            found = cached_json(path, retrieval)
            result["retrieved"] = {"passkey": found["passkey"]}
            result["passkey"] = statistics.fmean(found["passkey"])
            if weights:  # the study's objective, on test documents and prompts
                result["terms"] = scoring.objective_terms(result["nll"], found)
                result["objective"] = scoring.objective_value(result["terms"])
        return result

    for fraction, rows in chosen.groupby("budget_fraction", sort=False):
        joint = rows[rows["family"] == "joint"].iloc[0]
        singles = rows[rows["family"] != "joint"].sort_values("valid_ppl")
        single = singles.iloc[0] if len(singles) else None
        same = single is not None and joint["point"].key == single["point"].key
        # Accuracy where it compares two points: a budget whose joint choice is the single-axis
        # one has a difference of exactly 0; one no single axis reaches has nothing to compare.
        contested = single is not None and not same
        a = measure(joint["point"], contested)
        if single is None:  # below every single axis's floor: only stacking reaches this budget
            report["budgets"][f"{fraction:g}"] = {
                "joint": _summary(a, "joint"),
                "best single-axis": None,
            }
            _write(report, out, start)
            continue
        b = measure(single["point"], contested)
        entry = {
            "joint": _summary(a, "joint"),
            "best single-axis": _summary(b, single["family"]),
            "joint - single": _difference(a, b, same, options.resamples, weights),
        }
        # The control: the single-axis point on the source recovered like every candidate, so
        # that the joint mix's recovery is not what puts it ahead.
        if options.control and contested and single["point"].model.is_source:
            c = measure(single["point"], contested, control=True)
            entry["control"] = _summary(c, single["family"])
            entry["joint - control"] = _difference(a, c, False, options.resamples, weights)
        report["budgets"][f"{fraction:g}"] = entry
        _write(report, out, start)
    return _write(report, out, start)


def _summary(result: dict, family: str) -> dict:
    """What the report keeps of a measured point (not the per-item outcomes)."""
    return {
        "family": family,
        **{k: v for k, v in result.items() if k not in PER_ITEM},
        "test_ppl_mean": statistics.fmean(result["test_ppl"]),
    }


def _difference(
    a: dict, b: dict, same: bool, resamples: int, weights: dict[str, float] | None = None
) -> dict:
    """A - B with paired bootstrap intervals: perplexity over windows, and accuracy over
    questions and retrieval over prompts where both were measured, and the selection objective
    of `weights` (each term's items resampled apart); exactly 0 for one point."""
    if same:
        return {"ppl": 0.0, "ci95": [0.0, 0.0], "excludes_zero": False, "same_point": True}
    diff = paired_bootstrap(a["nll"], b["nll"], resamples)
    out = {
        "ppl": diff.difference,
        "ci95": [diff.low, diff.high],
        "excludes_zero": diff.excludes_zero,
    }
    for key, outcomes in (("mean_acc", "correct"), ("passkey", "retrieved")):
        if outcomes in a and outcomes in b:
            out[key] = paired_accuracy(a[outcomes], b[outcomes], resamples).as_dict()
    if weights and "terms" in a and "terms" in b:
        out["objective"] = paired_objective(a["terms"], b["terms"], weights, resamples).as_dict()
    return out


def _named(entry: dict) -> str:
    """A point's model, with the layers each model gives when it is a layer mix."""
    layers = entry.get("layers")
    return f"{entry['model']} ({layers})" if layers else entry["model"]


def _difference_text(d: dict, a: dict, b: dict) -> str:
    """A - B in a report cell: perplexity, then accuracy and retrieval where measured."""
    if d.get("same_point"):
        return "same point"
    text = f"{d['ppl']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" + (
        " **excludes 0**" if d["excludes_zero"] else ""
    )
    for key, name, digits in (
        ("objective", "objective", 2),
        ("mean_acc", "mean acc", 3),
        ("passkey", "passkey", 3),
    ):
        if key in d:
            x = d[key]
            text += (
                f" ({name} {a[key]:.{digits}f} vs {b[key]:.{digits}f}: {x['difference']:+.{digits}f} "
                f"[{x['ci95'][0]:+.{digits}f}, {x['ci95'][1]:+.{digits}f}]"
                + (" **excludes 0**)" if x["excludes_zero"] else ")")
            )
    return text


def _write(report: dict, out: Path, start: float) -> Path:
    report["seconds"] = round(time.time() - start, 1)
    write_text_atomic(out / "byte_answer.json", json.dumps(report, indent=2) + "\n")
    opts, text = report["options"], report["scored"]
    lines = [
        f"# Quality per KV byte: joint winner vs best single axis (study `{report['study']}`)",
        "",
        f"Test {text}; converted models under recovery "
        f"seeds {', '.join(map(str, opts['seeds']))} (mean), source points once. Both points were "
        "chosen on validation data. Differences: paired bootstrap 95% interval over windows "
        f"({opts['resamples']} resamples); where the two points differ, mean accuracy on "
        f"{opts['limit']} test questions per task (first seed) with a paired bootstrap interval "
        "over questions"
        + (", and passkey retrieval paired over test prompts." if opts["context"] else ".")
        + (
            f" Objective: the study's selection objective ({report['objective']}: perplexity "
            "of the late positions times that of the keys' tokens) on these test documents and "
            "prompts, each resampled apart (first seed for the keys)."
            if report.get("objective")
            else ""
        ),
        "",
        "| budget | joint (model, cache) | test ppl | best single axis | test ppl | joint - single, 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for budget, e in report["budgets"].items():
        j, s = e["joint"], e["best single-axis"]
        if s is None:
            lines.append(
                f"| {100 * float(budget):.1f}% | {_named(j)}, {j['precision']} "
                f"({100 * j['kv_fraction']:.1f}%) | {j['test_ppl_mean']:.2f} | no single-axis "
                "point fits | - | - |"
            )
            continue
        lines.append(
            f"| {100 * float(budget):.1f}% | {_named(j)}, {j['precision']} "
            f"({100 * j['kv_fraction']:.1f}%) | {j['test_ppl_mean']:.2f} | {s['family']}: "
            f"{_named(s)}, {s['precision']} ({100 * s['kv_fraction']:.1f}%) | "
            f"{s['test_ppl_mean']:.2f} | {_difference_text(e['joint - single'], j, s)} |"
        )
    controls = {b: e for b, e in report["budgets"].items() if "control" in e}
    if controls:
        lines += [
            "",
            "## Against the control",
            "",
            "The joint points are recovered (fine-tuned) after conversion; the single-axis points "
            "on the source are not. The control rebuilds each of them on the source recovered by "
            "the study's chain, with the same recipe and text, so that what puts the joint point "
            "ahead is where its heads and bits go, not the training its mix received.",
            "",
            "| budget | joint test ppl | control (single-axis point on the recovered source) "
            "| test ppl | joint - control, 95% CI |",
            "|---|---|---|---|---|",
        ]
        for budget, e in controls.items():
            j, c = e["joint"], e["control"]
            lines.append(
                f"| {100 * float(budget):.1f}% | {j['test_ppl_mean']:.2f} | {c['family']}: "
                f"{c['precision']} | {c['test_ppl_mean']:.2f} | "
                f"{_difference_text(e['joint - control'], j, c)} |"
            )
    path = out / "byte_answer.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
