"""Does recovery aware of cache precision help? Fit at 16 bits and quantize afterwards, against
fitting with the quantized cache simulated (straight-through), for the default study's searched
2-KV grouping at low cache precisions.

Both arms use the default study's merge and layer-wise recovery; test perplexity on `--windows`
x 256 tokens with the quantized cache simulated. Rows go to
`results/bench/precision_recovery.csv` as they finish (a stopped run resumes).

    python experiments/benchmarks/bench_precision_recovery.py [--windows 24] [--bits 3,2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gqa
from experiments.benchmarks import common
from gqa.precision import PrecisionPlan
from objectives.evaluate import perplexity
from objectives.recovery import recover

GROUPING = "results/default/groupings/2kv_coarsen_source_*.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--bits", default="3,2", help="K=V bits to compare (group size 32)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    table = common.CsvRows(args.out / "precision_recovery.csv")
    done = {(r["bits"], r["recovery"]) for r in table.rows}
    grouping = common.saved_grouping(GROUPING)
    with common.throwaway_study(common.DEFAULT_CONFIG) as study:
        config = study.config
        windows = common.split_windows(study.loaded.tokenizer, args.windows)
        layers = study.adapter.num_layers
        plain = None
        for bits in (int(b) for b in args.bits.split(",")):
            plan = PrecisionPlan.uniform(layers, bits, group_size=32)
            for arm in ("16-bit, then quantized", "precision-aware"):
                if (bits, arm) in done:
                    continue
                start = time.time()
                if arm == "precision-aware":  # the plan is on before recovery: fits see it
                    model = gqa.converted_copy(
                        study.source, grouping, config.search.merge, study.stats
                    )
                    gqa.apply_precision(model, plan)
                    for method, method_config in study.recovery_chain():
                        recover(
                            method,
                            model,
                            study.source,
                            study.loaded.tokenizer,
                            study.stats,
                            method_config,
                            progress=True,
                            merge=config.search.merge,
                        )
                else:
                    plain = plain or study.build_candidate(grouping, progress=True)
                    model = gqa.apply_precision(plain, plan)
                build = time.time() - start
                ppl = perplexity(model, windows, progress=False).perplexity
                table.append(
                    {
                        "bits": bits,
                        "recovery": arm,
                        "test_ppl": ppl,
                        "build_seconds": build,
                        "test_tokens": args.windows * 256,
                    }
                )
                print(table.rows[-1])


if __name__ == "__main__":
    main()
