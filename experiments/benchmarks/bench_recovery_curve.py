"""How much recovery costs: test quality against fine-tuning tokens, per converted model.

For the default study's searched 2-KV and 1.5-KV groupings and `neighbour_kv` at 2 KV (saved in
`results/default/groupings/`), each point is: the `--merge` (default `aligned`, which recovers
best: results/bench/recovery.json) and the study's layer-wise recovery, then a
token-budgeted fine-tune (objectives.recovery.finetune) on the `reading` text (no evaluation
reads it), distilled from the source (KL + LM loss), K/V/Q/O trained, cosine decay after a 5%
warm-up; 0 tokens is layer-wise recovery alone. Test perplexity on `--windows` x 256 tokens and
mean accuracy on `--limit` test questions each of ARC-Easy, HellaSwag and PIQA; the source's row
is the target line.

Rows go to `results/bench/recovery_curve.csv` as each point finishes, and each fine-tune
checkpoints under $HEADGROUP_CACHE/recovery_curve/, so a stopped run resumes where it stopped;
`recovery_curve.png` is redrawn after every point. Sized to run in the background for hours:

    python experiments/benchmarks/bench_recovery_curve.py [--tokens 0,25000,100000,300000]
        [--models 2kv_coarsen_source,1.5kv_coarsen_source,2kv_neighbour_kv] [--windows 48]
        [--limit 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.benchmarks import common
from gqa.assets import cache_dir  # noqa: E402
from objectives.evaluate import evaluate, perplexity  # noqa: E402
from objectives.recovery import FinetuneConfig, recover  # noqa: E402
from search.config import StudyConfig  # noqa: E402

TASKS = ("arc_easy", "hellaswag", "piqa")


def recipe(tokens: int, name: str, merge: str) -> FinetuneConfig:
    """The fine-tuning recipe of every point (its checkpoints keyed by model and tokens)."""
    return common.distill_recipe(
        tokens,
        batch_size=8,
        seq_len=256,
        checkpoint_dir=str(cache_dir() / "recovery_curve" / f"{name}-{merge}-{tokens}"),
        save_steps=25,
        logging_steps=5,
    )


def plot(frame: pd.DataFrame, path: Path) -> None:
    fig, (ppl, acc) = plt.subplots(1, 2, figsize=(10, 4))
    source = frame[frame["model"] == "source"]
    if "merge" not in frame:
        frame = frame.assign(merge="query_aware")
    for (model, merge), rows in frame[frame["model"] != "source"].groupby(["model", "merge"]):
        rows = rows.sort_values("tokens")
        label = f"{model} ({merge})"
        ppl.plot(rows["tokens"], rows["test_ppl"], marker="o", label=label)
        acc.plot(rows["tokens"], rows["mean_acc"], marker="o", label=label)
    if not source.empty:
        ppl.axhline(source["test_ppl"].iloc[0], color="k", ls="--", label="source")
        acc.axhline(source["mean_acc"].iloc[0], color="k", ls="--", label="source")
    ppl.set(xlabel="fine-tuning tokens", ylabel="test perplexity")
    acc.set(xlabel="fine-tuning tokens", ylabel="mean accuracy (ARC-E, HellaSwag, PIQA)")
    ppl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="0,25000,100000,300000")
    parser.add_argument(
        "--models", default="2kv_coarsen_source,1.5kv_coarsen_source,2kv_neighbour_kv"
    )
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--merge", default="aligned", help="merge before recovery")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    table = common.CsvRows(args.out / "recovery_curve.csv")
    rows = table.rows
    for row in rows:  # rows written before the merge was recorded started from query_aware
        if not isinstance(row.get("merge"), str) or not row["merge"]:
            row["merge"] = "-" if row["model"] == "source" else "query_aware"
    done = {(r["model"], r.get("merge", "-"), int(r["tokens"])) for r in rows}
    config = StudyConfig.load(common.DEFAULT_CONFIG)
    search = dataclasses.replace(config.search, merge=args.merge)
    with common.throwaway_study(config, search=search) as study:
        tokenizer = study.loaded.tokenizer
        windows = common.split_windows(tokenizer, args.windows)

        def measure(model, name: str, tokens: int, start: float) -> None:
            ppl = perplexity(model, windows, progress=False).perplexity
            accs = evaluate(model, tokenizer, TASKS, limit=args.limit, subset="test")
            table.append(
                {
                    "model": name,
                    "merge": "-" if name == "source" else args.merge,
                    "tokens": tokens,
                    "test_ppl": ppl,
                    "mean_acc": statistics.fmean(accs[t]["acc"] for t in TASKS),
                    **{f"acc_{t}": accs[t]["acc"] for t in TASKS},
                    "seconds": time.time() - start,
                    "test_tokens": args.windows * 256,
                    "questions": args.limit,
                }
            )
            plot(table.frame(), table.path.with_suffix(".png"))
            print(rows[-1], flush=True)

        if ("source", "-", 0) not in done:
            measure(study.source, "source", 0, time.time())
        for name in args.models.split(","):
            grouping = common.saved_grouping(f"{common.DEFAULT_GROUPINGS}/{name}_*.json")
            for tokens in (int(t) for t in args.tokens.split(",")):
                if (name, args.merge, tokens) in done:
                    continue
                start = time.time()
                model = study.build_candidate(grouping, progress=True)  # merge + layer-wise
                if tokens:
                    result = recover(
                        "finetune",
                        model,
                        study.source,
                        tokenizer,
                        study.stats,
                        recipe(tokens, name, args.merge),
                        progress=True,
                    )
                    print(f"{name}: {tokens} tokens, {result.steps} steps", flush=True)
                measure(model, name, tokens, start)


if __name__ == "__main__":
    main()
