"""Does calibrating and recovering on long sequences (or other text) repair a grouped model at
long context?

The demo study's searched 2-KV grouping is built with the study's merge (`aligned`, which reads
the calibration statistics) and layer-wise recovery (which fits each layer on the calibration
sequences), once per calibration text and sequence length at the same number of calibration
tokens, and scored on test data at 2048 tokens: perplexity by position and passkey retrieval.
The source is the reference. Per layer, the long-range cost of the grouped model's layers (objectives.long_range,
on validation) says where the damage sits. Rows go to `results/bench/long_recovery.csv` and the
per-layer costs to `results/bench/long_range_layers.csv` as they finish (a stopped run resumes).

    python experiments/benchmarks/bench_long_recovery.py [--arms calibration:256,reading:2048]
        [--tokens 8192] [--finetune 24576] [--passkey-lengths 4096]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import gqa
from experiments.benchmarks import common
from objectives.evaluate import evaluate
from objectives.long_context import LongContextConfig
from objectives.long_range import long_range_costs
from objectives.recovery import FinetuneConfig, recover
from search.config import StudyConfig

GROUPING = "results/demo/groupings/2kv_coarsen_source_*.json"
DEFAULT_TOKENS = 8192
LONG = LongContextConfig(
    seq_len=2048, ppl_windows=4, lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), trials=2
)


def long_recipe(tokens: int) -> FinetuneConfig:
    """The recovery curve's recipe at long context: 2 x 2048-token `reading` windows a step."""
    return common.distill_recipe(tokens, batch_size=2, seq_len=2048, logging_steps=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arms",
        default="calibration:256,calibration:2048,reading:2048",
        help="calibration split:sequence length per arm (split `reading`: decontaminated prose "
        "of SQuAD, DROP, CoQA, Qasper and SciRIFF passages, long papers among them)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="calibration tokens per arm (named in the arm when not the default)",
    )
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        help="also fine-tune (distilled, on `reading` windows of 2048 tokens) this many tokens: "
        "the last arm's model and, as the control, the source with the same recipe",
    )
    parser.add_argument(
        "--passkey-lengths",
        default="",
        help="instead: passkey retrieval only, at these prompt lengths (e.g. 4096), into "
        "long_recovery_passkey.csv",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    passkey_only = bool(args.passkey_lengths)
    long_config, tasks = LONG, ["long_ppl", "passkey"]
    if passkey_only:
        lengths = tuple(int(n) for n in args.passkey_lengths.split(","))
        long_config, tasks = dataclasses.replace(LONG, lengths=lengths), ["passkey"]
    name = "long_recovery_passkey.csv" if passkey_only else "long_recovery.csv"
    table = common.CsvRows(args.out / name)
    layer_table = common.CsvRows(args.out / "long_range_layers.csv")
    done = {r["model"] for r in table.rows}
    grouping = common.saved_grouping(GROUPING)
    base = StudyConfig.load(common.DEMO_CONFIG)
    arms = {"source": ("calibration", 256)}
    for arm in args.arms.split(","):
        split, seq_len = arm.split(":")
        more = "" if args.tokens == DEFAULT_TOKENS else f", {args.tokens} tokens"
        arms[f"2kv calibrated on {split} at {seq_len}{more}"] = (split, int(seq_len))
    if args.finetune:
        last = list(arms)[-1]
        arms[f"{last}, fine-tuned {args.finetune}"] = arms[last]
        arms[f"source, fine-tuned {args.finetune}"] = arms["source"]
    for arm, (split, seq_len) in arms.items():
        if arm in done:
            continue
        seqs = max(2, args.tokens // seq_len)
        calibration = dataclasses.replace(
            base.calibration,
            split=split,
            seq_len=seq_len,
            num_seqs=seqs,
            grad_seqs=min(seqs, base.calibration.grad_seqs),
            sample_seqs=min(seqs, max(4, base.calibration.sample_seqs * 256 // seq_len)),
            batch_size=1 if seq_len > 512 else base.calibration.batch_size,
        )
        with common.throwaway_study(base, progress=True, calibration=calibration) as study:
            start = time.perf_counter()
            if arm.startswith("source"):
                model = copy.deepcopy(study.source) if "fine-tuned" in arm else study.source
            else:
                model = study.build_candidate(grouping)
            if "fine-tuned" in arm:
                recover(
                    "finetune",
                    model,
                    study.source,
                    study.loaded.tokenizer,
                    study.stats,
                    long_recipe(args.finetune),
                    progress=True,
                )
            build = time.perf_counter() - start
            results = evaluate(
                model,
                study.loaded.tokenizer,
                tasks,
                subset="test",
                long_config=long_config,
            )
            ppl = results.get("long_ppl", {}).get("buckets", {})
            table.append(
                {
                    "model": arm,
                    "calibration": f"{calibration.num_seqs}x{seq_len}",
                    "fitted_sequences": calibration.sample_seqs,
                    **{f"ppl {k}": v for k, v in ppl.items()},
                    "passkey": results["passkey"]["accuracy"],
                    **{f"passkey {k}": v for k, v in results["passkey"]["by_length"].items()},
                    "passkey_nll": results["passkey"]["answer_nll"],
                    "build_seconds": round(build, 1),
                }
            )
            print(json.dumps(table.rows[-1]), flush=True)
            if not (passkey_only or arm.startswith("source") or "fine-tuned" in arm):
                exact = gqa.converted_copy(study.source, study.source_grouping)
                one_window = dataclasses.replace(LONG, ppl_windows=1)  # 30 forwards of 2048
                costs = long_range_costs(exact, model, study.loaded.tokenizer, one_window)
                for layer, cost in enumerate(costs.costs):
                    layer_table.rows.append({"model": arm, "layer": layer, "late_nll_cost": cost})
                layer_table.write()


if __name__ == "__main__":
    main()
