"""Reports from a study's storage: Pareto fronts (PNG + CSV) and ablation tables (MD, CSV, LaTeX).

Both read only the Optuna storage (`search.results`), so `results/<study>/` can always be
regenerated from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from search.results import rung_columns, stage1_frame, stage2_frame, test_columns  # noqa: E402

MARKERS = "os^Dv<>pPXh*"


@dataclasses.dataclass(frozen=True)
class ScorePanel:
    """A test score pareto.png plots against cache size when the study measured it."""

    column: str
    label: str
    title: str
    minimise: bool


SCORE_PANELS = (
    ScorePanel("long_ppl", "late-position perplexity, long test documents", "long context", True),
    ScorePanel("passkey", "passkey retrieval, test prompts (higher is better)", "retrieval", False),
    ScorePanel("mean_acc", "mean accuracy, test questions (higher is better)", "accuracy", False),
)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pareto_front(frame: pd.DataFrame, x: str, y: str, minimise: bool = True) -> pd.DataFrame:
    """Points not dominated in (smaller x, better y), sorted by x."""
    ordered = frame.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, minimise])
    front, best = [], math.inf if minimise else -math.inf
    for _, row in ordered.iterrows():
        value = row[y]
        if (value < best) if minimise else (value > best):
            front.append(row)
            best = value
    return pd.DataFrame(front)


def _source_bytes(stage2: pd.DataFrame) -> float | None:
    source = stage2[stage2["kind"] == "source"] if "kind" in stage2 else stage2.iloc[0:0]
    return float(source["kv_bytes"].iloc[0]) if len(source) else None


def _styles(*frames: pd.DataFrame) -> dict[str, dict]:
    """One colour and marker per strategy, the same in every panel."""
    names = sorted({str(s) for f in frames if "strategy" in f for s in f["strategy"].dropna()})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        n: {"marker": MARKERS[i % len(MARKERS)], "color": colours[i % len(colours)]}
        for i, n in enumerate(names)
    }


def _panel(ax, frame, y, label, source_bytes, styles, minimise=True, log=False):
    series = frame.assign(series=frame["strategy"].fillna("source"))
    for name, group in series.groupby("series"):
        if name == "source":
            continue
        ax.scatter(
            group["kv_bytes"], group[y], label=name, alpha=0.8, s=36, zorder=3, **styles[name]
        )
    front = pareto_front(series[series["series"] != "source"], "kv_bytes", y, minimise)
    if len(front):
        ax.step(
            front["kv_bytes"], front[y], where="post", color="black", lw=1.2, label="Pareto front"
        )
    if "kind" in series:
        for kind, style in (("baseline", dict(facecolors="none", edgecolors="red", s=90, lw=1.5)),):
            marked = series[series["kind"] == kind]
            if len(marked):
                ax.scatter(marked["kv_bytes"], marked[y], label="baseline", zorder=2, **style)
        source = series[series["kind"] == "source"]
        if len(source):
            ax.scatter(
                source["kv_bytes"],
                source[y],
                marker="*",
                s=220,
                color="gold",
                edgecolors="black",
                label="source model",
                zorder=5,
            )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("KV cache, bytes per token (16-bit)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if source_bytes:
        top = ax.secondary_xaxis(
            "top", functions=(lambda b: 100 * b / source_bytes, lambda p: p * source_bytes / 100)
        )
        top.set_xlabel("% of the source model's KV cache")


def pareto_report(name: str, storage, out: Path) -> dict[str, Path]:
    """pareto.png (the proxy, the validation objective after recovery and the test scores of
    SCORE_PANELS the study measured, against KV size) and pareto.csv (their fronts)."""
    stage1, stage2 = stage1_frame(name, storage), stage2_frame(name, storage)
    if stage1.empty:
        raise ValueError(f"study {name!r} has no completed trials in this storage")
    out.mkdir(parents=True, exist_ok=True)
    source_bytes = _source_bytes(stage2) if len(stage2) else None
    complete = stage2[stage2["state"] == "complete"] if len(stage2) else stage2
    tests = [t for t in SCORE_PANELS if t.column in complete and complete[t.column].notna().any()]
    panels = 1 + (len(complete) > 0) * (1 + len(tests))
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.8), squeeze=False)
    scored = stage1[stage1["duplicate_of"].isna()]
    styles = _styles(stage1, stage2)
    _panel(
        axes[0, 0], scored, "proxy", "proxy loss (lower is better)", source_bytes, styles, log=True
    )
    axes[0, 0].set_title(f"stage 1: {len(scored)} groupings scored by proxy")
    fronts = [pareto_front(scored, "kv_bytes", "proxy").assign(stage="proxy", metric="proxy")]
    if len(complete):
        # Selection reads validation data only, so the selection panel and its front do too.
        _panel(
            axes[0, 1],
            complete,
            "valid_ppl",
            "validation objective after recovery (lower is better)",
            source_bytes,
            styles,
            log=True,
        )
        axes[0, 1].set_title("stage 2: recovered (validation)")
        candidates = complete[complete["kind"] != "source"]
        fronts.append(
            pareto_front(candidates, "kv_bytes", "valid_ppl").assign(
                stage="recovered", metric="valid_ppl"
            )
        )
        for ax, test in zip(axes[0, 2:], tests, strict=True):
            _panel(ax, complete, test.column, test.label, source_bytes, styles, test.minimise)
            ax.set_title(f"stage 2: {test.title} (test)")
            fronts.append(
                pareto_front(candidates, "kv_bytes", test.column, test.minimise).assign(
                    stage="recovered", metric=test.column
                )
            )
    handles, labels = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend(
        [handles[lab] for lab in labels],
        labels,
        loc="lower center",
        ncol=min(len(labels), 6),
        frameon=False,
    )
    fig.suptitle(f"study {name}: quality against KV-cache size")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    png = out / "pareto.png"
    tmp = out / ".pareto.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    front = pd.concat(fronts, ignore_index=True)
    keep = [
        c
        for c in (
            "stage",
            "metric",
            "strategy",
            "budget",
            "kind",
            "kv_bytes",
            "kv_heads",
            "proxy",
            "rank",
            "valid_ppl",
            "ppl",
            *(t.column for t in SCORE_PANELS),
            "key",
        )
        if c in front
    ]
    front = front[keep]
    if source_bytes:
        front.insert(
            front.columns.get_loc("kv_bytes") + 1, "kv_pct", 100 * front["kv_bytes"] / source_bytes
        )
    _write_csv(front, out / "pareto.csv")
    return {"png": png, "csv": out / "pareto.csv"}


def rungs_report(name: str, storage, out: Path) -> Path:
    """rungs.png: validation perplexity against recovery effort (rung) per candidate, one panel
    per budget; pruned candidates dashed, baselines in red."""
    stage2 = stage2_frame(name, storage)
    candidates = stage2[stage2["kind"] != "source"] if len(stage2) else stage2
    if candidates.empty:
        raise ValueError(f"study {name!r} has no stage-2 candidates in this storage")
    budgets = sorted(candidates["budget"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.4), squeeze=False)
    styles = _styles(candidates)
    source = stage2[stage2["kind"] == "source"]
    for ax, budget in zip(axes[0], budgets, strict=True):
        names: list[str] = []
        for _, row in candidates[candidates["budget"] == budget].iterrows():
            rungs = json.loads(row["rungs"])
            names = max(names, [r["after"] for r in rungs], key=len)
            style = styles[row["strategy"]]
            ax.plot(
                range(len(rungs)),
                [r["valid_ppl"] for r in rungs],
                marker=style["marker"],
                color="red" if row["kind"] == "baseline" else style["color"],
                ls="--" if row["state"] == "pruned" else "-",
                alpha=0.85,
                label=f"{row['strategy']} ({row['kind']}, {row['state']})",
            )
        if len(source):
            ax.axhline(source["valid_ppl"].iloc[0], color="gold", lw=1.5, label="source model")
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_title(f"{budget:g} KV heads per layer")
        ax.set_xlabel("recovery rung")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"study {name}: validation perplexity against recovery effort")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / "rungs.png"
    tmp = out / ".rungs.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png


def _mean_std(frame: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(keys, dropna=False)[cols]
    mean, std, count = grouped.mean(), grouped.std(), grouped.size()
    table = mean.copy()
    if count.max() > 1:  # several seeds (studies): mean +- std
        for col in cols:
            table[col] = [
                f"{m:.4g} ± {s:.2g}" if n > 1 and not math.isnan(s) else f"{m:.4g}"
                for m, s, n in zip(mean[col], std[col], count, strict=True)
            ]
    table["n"] = count
    return table.reset_index()


def ablation_report(names: list[str], storage, out: Path) -> dict[str, Path]:
    """ablation.{md,csv,tex}: strategy x budget (stage 2 and stage 1), and the allocation ablation.
    Several study names are treated as seeds of one design: cells show mean +- std."""
    names = list(dict.fromkeys(names))
    stage1 = pd.concat([stage1_frame(n, storage).assign(study=n) for n in names], ignore_index=True)
    stage2 = pd.concat([stage2_frame(n, storage).assign(study=n) for n in names], ignore_index=True)
    if stage1.empty:
        raise ValueError(f"studies {names} have no completed trials in this storage")
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, pd.DataFrame]] = []
    source_bytes = _source_bytes(stage2) if len(stage2) else None
    if len(stage2):
        s2 = stage2.copy()
        s2["strategy"] = s2["strategy"].fillna("source")
        if source_bytes:
            s2["kv_pct"] = 100 * s2["kv_bytes"] / source_bytes
        # The recovery ablation: validation perplexity at each rung (merged, after each method).
        metrics = [c for c in ("proxy", "rank", "kv_pct", *rung_columns(s2)) if c in s2]
        metrics += test_columns(s2)
        done = s2[s2["state"] == "complete"]
        best = (  # per strategy the candidate best on validation data; its test numbers shown
            done.sort_values("valid_ppl", na_position="first")
            .groupby(["study", "budget", "strategy", "kind"], dropna=False)
            .head(1)
        )
        sections.append(
            (
                "Recovered candidates (stage 2): strategy x budget, best on validation "
                "(valid_ppl*: validation; ppl, acc, long tasks: test)",
                _mean_std(best, ["budget", "strategy", "kind"], metrics),
            )
        )
        pruning = (
            s2[s2["kind"] == "searched"]
            .groupby(["study", "budget", "state"])
            .size()
            .unstack(fill_value=0)
            .reset_index()
        )
        counts = [c for c in ("complete", "pruned") if c in pruning]
        sections.append(
            (
                "Stage-2 pruning: searched candidates per budget",
                _mean_std(pruning, ["budget"], counts),
            )
        )
    per_run = (
        stage1.groupby(["study", "budget", "strategy"], dropna=False)["proxy"].min().reset_index()
    )
    sections.append(
        (
            "Best proxy per strategy x budget (stage 1)",
            _mean_std(per_run, ["budget", "strategy"], ["proxy"]),
        )
    )
    if stage1["allocation"].nunique() > 1:
        scores = [c for c in ("proxy", "rank") if c in stage1]
        alloc = stage1.groupby(["study", "budget", "allocation"])[scores].min().reset_index()
        sections.append(
            (
                "Budget allocation across layers (stage 1, best score)",
                _mean_std(alloc, ["budget", "allocation"], scores),
            )
        )
    md = [f"# Ablations: {', '.join(names)}", ""]
    tex = []
    csv_parts = []
    for title, table in sections:
        md += [f"## {title}", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
        tex += [f"% {title}", table.to_latex(index=False, float_format="%.4g"), ""]
        csv_parts.append(table.assign(table=title))
    _write_text("\n".join(md), out / "ablation.md")
    _write_text("\n".join(tex), out / "ablation.tex")
    _write_csv(pd.concat(csv_parts, ignore_index=True), out / "ablation.csv")
    return {"md": out / "ablation.md", "csv": out / "ablation.csv", "tex": out / "ablation.tex"}
