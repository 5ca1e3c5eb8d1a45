"""Merge and recovery benchmark on SmolLM2-135M: held-out perplexity of the source model and of
conversions to fewer KV heads per layer, with the `mean` and `query_aware` merges, before and
after `layerwise` recovery. Writes results/bench/recovery.json.

    python experiments/bench_recovery.py [--kv-heads 1,2] [--windows 48] [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import gqa
from gqa.grouping import Grouping, write_text_atomic
from gqa.models import load_model
from objectives.calibration import CalibrationConfig, calibrate
from objectives.data import TextSpec, token_windows
from objectives.evaluate import perplexity
from objectives.recovery import LayerwiseConfig, recover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", default="1,2")
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--steps", type=int, default=100, help="layerwise Adam steps per layer")
    parser.add_argument(
        "--sample-seqs", type=int, default=8, help="calibration sequences kept for recovery"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench/recovery.json"))
    args = parser.parse_args()

    loaded = load_model("smollm2-135m")
    source = loaded.model
    stats = calibrate(
        source, loaded.tokenizer, CalibrationConfig(sample_seqs=args.sample_seqs), "smollm2-135m"
    )
    windows = token_windows(loaded.tokenizer, TextSpec("eval", 256, args.windows))
    rows = [
        {"grouping": "source", "merge": "-", "recovery": "-", **vars(perplexity(source, windows))}
    ]
    print(rows[-1])
    for g in (int(x) for x in args.kv_heads.split(",")):
        # Neighbour grouping of query heads; for G = 1 and G = 3 it keeps source groups whole.
        grouping = Grouping.neighbour(9, 30, g)
        for merge in ("mean", "query_aware"):
            model = gqa.convert(copy.deepcopy(source), grouping, merge=merge, stats=stats)
            rows.append(
                {
                    "grouping": f"neighbour G={g}",
                    "merge": merge,
                    "recovery": "none",
                    **vars(perplexity(model, windows)),
                }
            )
            print(rows[-1])
            start = time.time()
            result = recover(
                "layerwise",
                model,
                source,
                loaded.tokenizer,
                stats,
                LayerwiseConfig(steps=args.steps),
            )
            rows.append(
                {
                    "grouping": f"neighbour G={g}",
                    "merge": merge,
                    "recovery": "layerwise",
                    "recovery_seconds": round(time.time() - start, 1),
                    "local_error_before": result.initial_loss,
                    "local_error_after": result.final_loss,
                    **vars(perplexity(model, windows)),
                }
            )
            print(rows[-1])
    report = {
        "command": f"python experiments/bench_recovery.py --kv-heads {args.kv_heads} --windows {args.windows} "
        f"--steps {args.steps} --sample-seqs {args.sample_seqs}",
        "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
