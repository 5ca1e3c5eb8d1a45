"""Quality at long context of a study's byte-front points: perplexity by position at 2048 tokens,
passkey and multi-document QA retrieval, on test data.

Every point the study's byte front chose (per budget and family) is rebuilt through `KVFront`
(the same model and simulated quantized cache the front measured), plus the stage-2 winners at
16 bits, and scored with objectives.long_context's tasks on the test subset. One row per
(study, selection objective, point, task) goes to `results/bench/long_context.csv` as it
finishes (a stopped run resumes); `long_context.md` tabulates them and `long_context.png` draws
perplexity by position bucket and passkey retrieval by length.

    python experiments/benchmarks/bench_long_context.py [--config experiments/configs/demo.toml]
        [--budgets 1.0,0.2,0.17,0.14] [--seq-len 2048] [--windows 4] [--trials 2] [--protect K]
        [--layer-costs proxy|long_range]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import pandas as pd

from experiments.benchmarks import common
from gqa.grouping import write_text_atomic
from objectives.long_context import LongContextConfig
from search.config import LAYER_COSTS, StudyConfig
from search.kv_front import KVFront
from search.study import Study

matplotlib.use("Agg")
TASKS = ("long_ppl", "passkey", "mdqa")


def chosen_points(front: KVFront, budgets: set[float]) -> dict[str, tuple[object, list[str]]]:
    """label -> (Point, the families and budgets that chose it): the front's choices at
    `budgets` and every model at 16 bits."""
    points: dict[str, tuple[object, list[str]]] = {}
    for row in front.run().to_dict("records"):
        if round(row["budget_fraction"], 4) not in budgets:
            continue
        point = row["point"]
        label = f"{point.model.name} {point.label()} ({100 * row['kv_fraction']:.1f}%)"
        points.setdefault(label, (point, []))[1].append(
            f"{row['family']}@{row['budget_fraction']:g}"
        )
    for point in front.points(front.base_models()):
        if point.plan is None:
            label = f"{point.model.name} 16-bit ({100 * point.kv_bytes / front.source_bytes:.1f}%)"
            points.setdefault(label, (point, ["16-bit"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument("--budgets", default="1.0,0.2,0.17,0.14")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument(
        "--protect", type=int, default=None, help="replace the config's precision.protect"
    )
    parser.add_argument(
        "--layer-costs",
        choices=LAYER_COSTS,
        default=None,
        help="replace the config's precision.layer_costs",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    long_config = LongContextConfig(
        seq_len=args.seq_len,
        ppl_windows=args.windows,
        lengths=tuple(int(n) for n in args.lengths.split(",")),
        depths=tuple(float(d) for d in args.depths.split(",")),
        trials=args.trials,
    )
    table = common.CsvRows(args.out / "long_context.csv")
    config = StudyConfig.load(args.config)
    for name in ("protect", "layer_costs"):
        if getattr(args, name) is not None:
            precision = dataclasses.replace(config.precision, **{name: getattr(args, name)})
            config = dataclasses.replace(config, precision=precision)
    study = Study(config, progress=False)
    selection = study.config.selection.describe()
    if study.config.precision.protect:
        selection += f", protect {study.config.precision.protect}"
    if study.config.precision.layer_costs != "proxy":
        selection += f", {study.config.precision.layer_costs} layer costs"
    done = {(r["study"], r["selection"], r["point"], r["task"]) for r in table.rows}
    which = (study.config.name, selection)
    front = KVFront(study, progress=False)
    budgets = {round(float(b), 4) for b in args.budgets.split(",")}
    for label, (point, families) in chosen_points(front, budgets).items():
        for task in TASKS:
            if (*which, label, task) in done:
                continue
            # A point on the source model is the same model whatever chose it: copy its rows.
            same = [
                r
                for r in table.rows
                if point.model.is_source and (r.get("key"), r["task"]) == (point.key, task)
            ]
            if same:
                table.append({**same[0], "selection": selection, "families": " ".join(families)})
                continue
            start = time.perf_counter()
            fields = common.long_task_fields(
                front.module(point.model), point.plan, study.loaded.tokenizer, task, long_config
            )
            table.append(
                {
                    "study": study.config.name,
                    "selection": selection,
                    "point": label,
                    "key": point.key,
                    "families": " ".join(families),
                    "kv_fraction": point.kv_bytes / front.source_bytes,
                    "task": task,
                    **fields,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(f"{label:60s} {task:9s} {fields['score']:.3f}", flush=True)
    if study.config.precision.protect:
        write_layer_costs(front, args.out / "long_range_vs_proxy.csv")
    if front.long_units:
        print(f"layer costs in nats: {front.nats_per_unit():.4g} nats per proxy unit")
    frame = table.frame()
    plot(
        frame[(frame["study"] == which[0]) & (frame["selection"] == which[1])],
        args.out / "long_context.png",
    )
    write_text_atomic(args.out / "long_context.md", markdown(frame))


def write_layer_costs(front: KVFront, path: Path) -> None:
    """Per stage-2 winner and layer: the short-window grouping error the joint allocation uses
    and the long-range cost `protect` reads, with their Spearman rank correlation."""
    rows = []
    for name, model in front.base_models().items():
        if model.is_source:
            continue
        short, costs = front.short_layer_errors(model), front.long_range(model).costs
        rho = pd.Series(short).corr(pd.Series(costs), method="spearman")
        protected = set(front.long_range(model).most_costly(front.config.protect))
        for layer, (error, cost) in enumerate(zip(short, costs, strict=True)):
            rows.append(
                {
                    "model": name,
                    "layer": layer,
                    "short_error": error,
                    "long_cost": cost,
                    "protected": layer in protected,
                    "spearman": rho,
                }
            )
        print(f"{name}: Spearman(short error, long-range cost) over layers = {rho:.2f}")
    write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def markdown(frame: pd.DataFrame) -> str:
    """One table per (study, selection objective): a row per point, test numbers."""
    lines = []
    for (name, selection), rows in frame.groupby(["study", "selection"], sort=False):
        lines += [
            f"## Study `{name}`, points chosen by `{selection}`",
            "",
            "| point | KV cache | chosen by | ppl by position | passkey by length | mdqa answer NLL |",
            "|---|---|---|---|---|---|",
        ]
        for label, point in rows.groupby("point", sort=False):
            by = point.set_index("task")
            cells = []
            for task, key in (("long_ppl", "buckets"), ("passkey", "by_length")):
                if task not in by.index:
                    cells.append("-")
                    continue
                detail = json.loads(by.loc[task, "detail"])[key]
                cells.append(", ".join(f"{k}: {v:.2f}" for k, v in detail.items()))
            mdqa = f"{by.loc['mdqa', 'loss']:.2f}" if "mdqa" in by.index else "-"
            first = point.iloc[0]
            lines.append(
                f"| {label} | {100 * first['kv_fraction']:.1f}% | {first['families']} | "
                f"{cells[0]} | {cells[1]} | {mdqa} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_ret) = plt.subplots(1, 2, figsize=(13, 5))
    for label, rows in frame.groupby("point", sort=False):
        by = rows.set_index("task")
        if "long_ppl" in by.index:
            buckets = json.loads(by.loc["long_ppl", "detail"])["buckets"]
            ax_ppl.plot(list(buckets), list(buckets.values()), marker="o", label=label)
        if "passkey" in by.index:
            lengths = json.loads(by.loc["passkey", "detail"])["by_length"]
            ax_ret.plot(list(lengths), list(lengths.values()), marker="o", label=label)
    ax_ppl.set(xlabel="positions", ylabel="test perplexity", title="perplexity by position")
    ax_ret.set(xlabel="prompt length (tokens)", ylabel="passkey accuracy", title="passkey")
    ax_ppl.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
