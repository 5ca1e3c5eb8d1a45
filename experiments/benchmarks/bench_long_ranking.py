"""Do the proxies rank recovered candidates by their quality at long context?

The candidates of bench_recoverability.py at one head budget (their groupings and scores read
from `recoverability.csv`: `fisher`, `local_attn`, `recoverable` and its weightings, and the
256-token validation perplexity after recovery) are rebuilt the same way (`query_aware` merge,
layer-wise recovery with the recorded steps and learning rate; fits cached, so a rerun is quick)
and measured at long context on test data: the perplexity of the last position bucket of long
documents (objectives.long_context: 1024-2047 at 2048 tokens) and teacher-forced passkey
retrieval (its accuracy, and the key's NLL, which is smooth where a few prompts make accuracy
coarse). Spearman's rho of each score, and of the short validation perplexity, against the
long-bucket log-perplexity and the key NLL: whether what the search ranks by, and what selection
on 256-token windows chooses by, predicts quality where the KV cache matters. No choice is made
here, so test data are read. Rows are written as they finish and a stopped run resumes.

Two scores that see long context may join them, each on *validation* documents of `--seq-len`
tokens (what a selection could read): with `--long-range-windows N`, `long_range`, the sum over
layers of each recovered layer's long-range cost (objectives.long_range: the rise of the
source's late-bucket NLL with that one layer swapped in; L + 1 forwards per candidate); with
`--valid-long-windows N`, `valid_long_ppl`, the recovered model's own late-bucket perplexity
(N forwards: the `long_ppl` selection objective). A later run with either adds its column to
the rows already measured.

    python experiments/benchmarks/bench_long_ranking.py [--budget 2] [--seq-len 2048]
        [--windows 4] [--trials 1] [--long-range-windows 0] [--valid-long-windows 0]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import gqa
from experiments.benchmarks import common
from gqa.grouping import Grouping, write_text_atomic
from objectives.long_context import LongContextConfig, long_windows
from objectives.long_range import late_nll, long_range_costs
from objectives.recovery import LayerwiseConfig, recover

SOURCE = "source"
SHORT = "valid_ppl"  # the 256-token validation perplexity after recovery (recoverability.csv)
LONG_RANGE = "long_range"  # summed per-layer long-range cost on validation documents
VALID_LONG = "valid_long_ppl"  # late-bucket perplexity on validation documents
TARGETS = ("long_ppl", "key_nll")  # what the scores should predict (both: lower is better)


def rho_table(frame: pd.DataFrame, scores: list[str]) -> dict[str, dict[str, float]]:
    """Spearman's rho of each score against each target (log of the long perplexity)."""
    targets = {"long_ppl": np.log(frame["long_ppl"]), "key_nll": frame["key_nll"]}
    return {
        target: {s: round(float(spearmanr(frame[s], values).statistic), 3) for s in scores}
        for target, values in targets.items()
    }


def measure(model, tokenizer, long_config: LongContextConfig) -> dict:
    """Long-bucket perplexity, per-bucket perplexities and passkey retrieval on test data."""
    ppl = common.long_task_fields(model, None, tokenizer, "long_ppl", long_config)
    key = common.long_task_fields(model, None, tokenizer, "passkey", long_config)
    return {
        "long_ppl": ppl["score"],
        "buckets": json.dumps(json.loads(ppl["detail"])["buckets"]),
        "passkey": key["score"],
        "key_nll": key["loss"],
    }


def valid_long_ppl(model, tokenizer, config: LongContextConfig) -> float:
    """Late-bucket perplexity of `config.ppl_windows` validation documents."""
    windows = long_windows(tokenizer, "valid", config.seq_len, config.ppl_windows)
    return math.exp(late_nll(model, windows, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=2.0, help="KV heads per layer")
    parser.add_argument("--seq-len", type=int, default=2048, help="long documents (tokens)")
    parser.add_argument("--windows", type=int, default=4, help="long test documents")
    parser.add_argument("--trials", type=int, default=1, help="passkey prompts per length/depth")
    parser.add_argument(
        "--long-range-windows",
        type=int,
        default=0,
        help="validation documents for the long_range score (0: no such score)",
    )
    parser.add_argument(
        "--valid-long-windows",
        type=int,
        default=0,
        help="validation documents for the valid_long_ppl score (0: no such score)",
    )
    parser.add_argument("--candidates", type=Path, default=common.RESULTS / "recoverability.csv")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "long_ranking.csv")
    args = parser.parse_args()
    if (
        min(args.windows, args.trials) < 1
        or min(args.long_range_windows, args.valid_long_windows) < 0
    ):
        parser.error("--windows and --trials must be >= 1, --*-long*-windows >= 0")
    if args.seq_len < 256:
        parser.error("--seq-len must be >= 256")
    if not args.candidates.is_file():
        parser.error(f"{args.candidates} not found: run bench_recoverability.py first")
    pool = pd.read_csv(args.candidates)
    pool = pool[pool["budget"] == args.budget]
    if pool.empty:
        parser.error(f"{args.candidates} has no candidate at {args.budget:g} KV heads per layer")
    summary_path = args.candidates.with_name("recoverability_summary.json")
    if not summary_path.is_file():
        parser.error(f"{summary_path} not found: it records the candidates' recovery")
    recovery = json.loads(summary_path.read_text())["recovery"]
    fit = LayerwiseConfig(steps=recovery["steps"], lr=recovery["lr"])
    scores = [c for c in pool.columns if c.startswith(("fisher", "local_attn", "recoverable"))]
    long_config = LongContextConfig(
        seq_len=args.seq_len,
        ppl_windows=args.windows,
        buckets=(256, args.seq_len // 2),
        lengths=(args.seq_len // 2, args.seq_len),
        trials=args.trials,
    )
    start = time.time()
    loaded, stats = common.calibrated(sample_seqs=8)  # bench_recoverability's statistics
    source, tokenizer = loaded.model, loaded.tokenizer
    table = common.CsvRows(args.out)
    setting = f"{args.seq_len}x{args.windows}/t{args.trials}"
    done = {(r["candidate"], r["setting"]): r for r in table.rows}
    if (SOURCE, setting) not in done:
        table.append(
            {"candidate": SOURCE, "setting": setting, **measure(source, tokenizer, long_config)}
        )
    extra = {}  # column -> its score of a recovered model, on validation documents
    if args.long_range_windows:
        config = dataclasses.replace(long_config, ppl_windows=args.long_range_windows)
        base = gqa.converted_copy(source, gqa.current_grouping(source))  # exact, grouped
        extra[LONG_RANGE] = lambda model: sum(
            long_range_costs(base, model, tokenizer, config, progress=False).costs
        )
    if args.valid_long_windows:
        config_v = dataclasses.replace(long_config, ppl_windows=args.valid_long_windows)
        extra[VALID_LONG] = lambda model: valid_long_ppl(model, tokenizer, config_v)
    for _, row in tqdm(list(pool.iterrows()), desc=f"{args.budget:g} KV heads: recover, measure"):
        out = done.get((row["candidate"], setting))
        missing = [c for c in extra if out is None or pd.isna(out.get(c))]
        if out is not None and not missing:
            continue
        grouping = Grouping.from_json(row["grouping"])
        model = gqa.convert(copy.deepcopy(source), grouping, merge="query_aware", stats=stats)
        t0 = time.time()
        recover("layerwise", model, source, None, stats, fit, progress=False, merge="query_aware")
        if out is None:
            out = {"candidate": row["candidate"], "setting": setting, "key": row["key"]}
            out["recovery_seconds"] = round(time.time() - t0, 1)
            out.update(measure(model, tokenizer, long_config))
            out.update({s: row[s] for s in [*scores, SHORT]})
            table.rows.append(out)
        for column in missing:
            out[column] = extra[column](model)
        table.write()
    frame = table.frame()
    frame = frame[frame["setting"] == setting]
    grouped = frame[frame["candidate"] != SOURCE].dropna(subset=[SHORT])
    source_row = frame[frame["candidate"] == SOURCE].iloc[0]
    ranged = [c for c in (LONG_RANGE, VALID_LONG) if c in grouped and grouped[c].notna().all()]
    by_long = grouped.sort_values("long_ppl")
    summary = {
        "command": "python experiments/benchmarks/bench_long_ranking.py "
        f"--budget {args.budget:g} --seq-len {args.seq_len} --windows {args.windows} "
        f"--trials {args.trials} --long-range-windows {args.long_range_windows} "
        f"--valid-long-windows {args.valid_long_windows}",
        "model": "smollm2-135m",
        "recovery": {"method": "layerwise", "merge": "query_aware", **recovery},
        "long": f"test: last bucket of {args.windows} x {args.seq_len} tokens; passkey at "
        f"{list(long_config.lengths)} x {len(long_config.depths)} depths x {args.trials}",
        "candidates": len(grouped),
        "source": {k: float(source_row[k]) for k in ("long_ppl", "passkey", "key_nll")},
        "rho": rho_table(grouped, [*scores, SHORT, *ranged]),
        "best_by_short_valid": grouped.sort_values(SHORT).iloc[0]["candidate"],
        "best_by_long_test": by_long.iloc[0]["candidate"],
        "long_ppl_range": [
            round(float(by_long["long_ppl"].min()), 2),
            round(float(by_long["long_ppl"].max()), 2),
        ],
        "seconds": round(time.time() - start, 1),
    }
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
