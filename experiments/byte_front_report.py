"""Report of a study's byte front: quality per KV-cache byte, one line per family.

byte_front.csv   per budget and family: the chosen point, its bytes, validation and test ppl
byte_points.csv  every measured point (validation ppl; test ppl where chosen)
byte_front.md    the table, budget by budget, then what grouping buys in plain words
byte_front.png   test perplexity against KV bytes per token (and % of the source cache)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gqa.grouping import write_text_atomic  # noqa: E402
from search.front_points import FAMILIES  # noqa: E402

STYLES = {
    "quantization": dict(color="tab:blue", marker="o"),
    "mixed_precision": dict(color="tab:cyan", marker="v"),
    "grouping": dict(color="tab:orange", marker="s"),
    "latent": dict(color="tab:green", marker="D"),
    "joint": dict(color="tab:red", marker="*", markersize=11),
}


def markdown_table(chosen: pd.DataFrame) -> str:
    lines = [
        "| budget (% of source cache) | family | model | cache precision | KV bytes/token (%) "
        "| valid ppl | test ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget, rows in chosen.groupby("budget_fraction", sort=False):
        best = rows["valid_ppl"].min()
        for row in rows.itertuples():
            mark = "**" if row.family == "joint" else ""
            layers = getattr(row, "layers", "")
            model = f"{row.model} ({layers})" if isinstance(layers, str) and layers else row.model
            lines.append(
                f"| {100 * budget:.1f} | {mark}{row.family}{mark} | {model} | {row.precision} "
                f"| {row.kv_bytes:.0f} ({100 * row.kv_fraction:.1f}%) "
                f"| {row.valid_ppl:.2f}{' (best)' if row.valid_ppl == best else ''} "
                f"| {row.test_ppl:.2f} |"
            )
    return "\n".join(lines) + "\n"


def grouping_verdict(chosen: pd.DataFrame) -> str:
    """In plain words, at which budgets the joint choice groups layers: where a single axis also
    fits (grouping then beat it on validation) and where only stacking fits. '' when the frame
    does not say how many layers each point groups (a report of an older front)."""
    if "grouped_layers" not in chosen:
        return ""
    contested, stacked, total = [], [], 0
    for budget, rows in chosen.groupby("budget_fraction", sort=False):
        joint = rows[rows["family"] == "joint"]
        if joint.empty:
            continue
        grouped = int(joint["grouped_layers"].iloc[0])
        label = f"{100 * budget:g}% ({grouped} layers)"
        single = (rows["family"] != "joint").any()
        total += single
        if grouped:
            (contested if single else stacked).append(label)
    if contested:
        text = (
            f"Grouping pays at {len(contested)} of the {total} budgets where a single axis fits: "
            f"the joint choice groups layers at {', '.join(contested)}."
        )
    else:
        text = (
            f"Grouping pays at none of the {total} budgets where a single axis fits: there the "
            "joint choice groups no layer."
        )
    if stacked:
        text += (
            f" Where no single axis fits, only grouping stacked with the other axes does: "
            f"{', '.join(stacked)}."
        )
    return text + " (Chosen on validation data.)\n"


def byte_front_report(
    chosen: pd.DataFrame, points: pd.DataFrame, source_bytes: float, out: Path
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "byte_front.csv",
        "points": out / "byte_points.csv",
        "md": out / "byte_front.md",
        "png": out / "byte_front.png",
    }
    write_text_atomic(paths["csv"], chosen.to_csv(index=False))
    write_text_atomic(
        paths["points"], points.drop(columns=["key"], errors="ignore").to_csv(index=False)
    )
    verdict = grouping_verdict(chosen)
    write_text_atomic(paths["md"], markdown_table(chosen) + (f"\n{verdict}" if verdict else ""))

    fig, ax = plt.subplots(figsize=(8, 5))
    if "valid_ppl" in points:
        ax.scatter(
            points["kv_bytes"],
            points["valid_ppl"],
            color="lightgrey",
            s=12,
            label="every point (validation)",
            zorder=1,
        )
    for family in FAMILIES:
        rows = (
            chosen[chosen["family"] == family].drop_duplicates("kv_bytes").sort_values("kv_bytes")
        )
        if rows.empty:
            continue
        ax.plot(
            rows["kv_bytes"], rows["test_ppl"], label=f"{family} (test)", **STYLES.get(family, {})
        )
    ax.set_xlabel("KV-cache bytes per token")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis(
        "top", functions=(lambda b: 100 * b / source_bytes, lambda p: p * source_bytes / 100)
    )
    top.set_xlabel("% of the source model's 16-bit KV cache")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = paths["png"].with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(paths["png"])
    return paths
