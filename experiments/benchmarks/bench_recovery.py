"""Layer-wise recovery benchmark on SmolLM2-135M: which fit recovers most per second?

One conversion (`neighbour_kv` at 2 KV heads per layer: merge source KV heads 0 and 1 in every
layer) is recovered layer-wise under several settings, side by side in one run: the starting
merge (`mean`, the closed-form `query_aware` or `aligned`), the Adam learning rate and steps, whether the
best held-out weights are kept (checked every 10 steps) or only the end is compared with the
start, and a least-squares solve for V (`v_solve` conjugate-gradient steps) before Adam. For
each: seconds, the summed held-out local error before and after, and validation perplexity
(these settings choose the defaults, so they read validation data). Fits are not cached here,
so every time is a real fit. Writes results/bench/recovery.json.

    python experiments/benchmarks/bench_recovery.py [--windows 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import gqa
from experiments.benchmarks import common
from gqa.grouping import Grouping, write_text_atomic
from objectives.data import VALID_SPLIT
from objectives.evaluate import perplexity
from objectives.recovery import LayerwiseConfig, recover
from search.budget import Budget
from search.strategies import SearchContext, make_strategy

VARIANTS = [  # (merge, layer-wise settings)
    ("mean", {"steps": 30, "lr": 3e-3}),
    ("query_aware", {"steps": 30, "lr": 1e-3}),
    ("query_aware", {"steps": 30, "lr": 3e-3}),
    ("query_aware", {"steps": 30, "lr": 1e-2}),
    ("query_aware", {"steps": 30, "lr": 3e-3, "check_every": 30}),  # end vs start only
    ("query_aware", {"steps": 60, "lr": 3e-3}),
    # least squares for V first (conjugate gradients, all fitted sequences), then Adam on K, V
    ("query_aware", {"steps": 20, "lr": 3e-3, "v_solve": 5}),
    ("query_aware", {"steps": 30, "lr": 3e-3, "v_solve": 5}),
    ("query_aware", {"steps": 50, "lr": 3e-3, "v_solve": 5}),
    # members rotated into a common frame first (Procrustes), frames folded into q and o
    ("aligned", {"steps": 30, "lr": 3e-3}),
    ("aligned", {"steps": 60, "lr": 3e-3}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=12, help="validation windows of 256")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "recovery.json")
    args = parser.parse_args()
    loaded, stats = common.calibrated(sample_seqs=8)
    source = loaded.model
    windows = common.split_windows(loaded.tokenizer, args.windows, VALID_SPLIT)
    ctx = SearchContext.from_model(source)
    grouping: Grouping = make_strategy("neighbour_kv").propose(ctx, Budget.uniform(30, 2))
    rows = [{"model": "source", **vars(perplexity(source, windows, progress=False))}]
    merged = {}
    for merge in ("mean", "query_aware", "aligned"):
        merged[merge] = gqa.convert(copy.deepcopy(source), grouping, merge=merge, stats=stats)
        ppl = perplexity(merged[merge], windows, progress=False)
        rows.append({"model": f"neighbour_kv 2 KV heads, {merge}, no recovery", **vars(ppl)})
        print(rows[-1])
    for merge, settings in VARIANTS:
        model = copy.deepcopy(merged[merge])
        config = LayerwiseConfig(**settings, cache=False)
        start = time.perf_counter()
        result = recover("layerwise", model, source, None, stats, config, progress=False)
        rows.append(
            {
                "model": f"neighbour_kv 2 KV heads, {merge}, layerwise",
                "settings": settings,
                "seconds": round(time.perf_counter() - start, 1),
                "local_error_before": result.initial_loss,
                "local_error_after": result.final_loss,
                **vars(perplexity(model, windows, progress=False)),
            }
        )
        print(rows[-1])
    report = {
        "command": f"python experiments/benchmarks/bench_recovery.py --windows {args.windows}",
        "metric": f"validation perplexity, {args.windows} x 256 tokens of the valid split",
        "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
