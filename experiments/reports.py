"""Reports from a study's storage: Pareto fronts (PNG + CSV) and ablation tables (MD, CSV, LaTeX).

Both read only the Optuna storage (`search.results`), so `results/<study>/` can always be
regenerated from it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from search.results import stage1_frame, stage2_frame  # noqa: E402

MARKERS = "os^Dv<>pPXh*"


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
    """pareto.png (proxy stage, perplexity, mean accuracy vs KV size) and pareto.csv."""
    stage1, stage2 = stage1_frame(name, storage), stage2_frame(name, storage)
    if stage1.empty:
        raise ValueError(f"study {name!r} has no completed trials in this storage")
    out.mkdir(parents=True, exist_ok=True)
    source_bytes = _source_bytes(stage2) if len(stage2) else None
    panels = 1 + (len(stage2) > 0) * (1 + ("mean_acc" in stage2))
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.8), squeeze=False)
    scored = stage1[stage1["duplicate_of"].isna()]
    styles = _styles(stage1, stage2)
    _panel(
        axes[0, 0], scored, "proxy", "proxy loss (lower is better)", source_bytes, styles, log=True
    )
    axes[0, 0].set_title(f"stage 1: {len(scored)} groupings scored by proxy")
    fronts = [pareto_front(scored, "kv_bytes", "proxy").assign(stage="proxy", metric="proxy")]
    if len(stage2):
        _panel(
            axes[0, 1],
            stage2,
            "ppl",
            "held-out perplexity (lower is better)",
            source_bytes,
            styles,
            log=True,
        )
        axes[0, 1].set_title("stage 2: recovered and evaluated")
        fronts.append(
            pareto_front(stage2[stage2["kind"] != "source"], "kv_bytes", "ppl").assign(
                stage="evaluated", metric="ppl"
            )
        )
        if "mean_acc" in stage2:
            _panel(
                axes[0, 2],
                stage2,
                "mean_acc",
                "mean accuracy (higher is better)",
                source_bytes,
                styles,
                minimise=False,
            )
            axes[0, 2].set_title("stage 2: accuracy")
            fronts.append(
                pareto_front(
                    stage2[stage2["kind"] != "source"], "kv_bytes", "mean_acc", minimise=False
                ).assign(stage="evaluated", metric="mean_acc")
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
    fig.suptitle(f"study {name}: accuracy against KV-cache size")
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
            "ppl",
            "mean_acc",
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
        # The recovery ablation: perplexity before recovery and after each recovery step.
        recovery = ["ppl_before_recovery"] + sorted(c for c in s2 if c.startswith("ppl_after_"))
        metrics = [c for c in ("proxy", "kv_pct", *recovery, "ppl", "mean_acc") if c in s2]
        metrics += sorted(c for c in s2 if c.startswith("acc_"))
        best = (
            s2.sort_values("proxy", na_position="first")
            .groupby(["study", "budget", "strategy", "kind"], dropna=False)
            .head(1)
        )
        sections.append(
            (
                "Evaluated candidates (stage 2): strategy x budget",
                _mean_std(best, ["budget", "strategy", "kind"], metrics),
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
        alloc = stage1.groupby(["study", "budget", "allocation"])["proxy"].min().reset_index()
        sections.append(
            (
                "Budget allocation across layers (stage 1, best proxy)",
                _mean_std(alloc, ["budget", "allocation"], ["proxy"]),
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
