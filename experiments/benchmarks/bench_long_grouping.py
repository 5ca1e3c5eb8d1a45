"""Does choosing which source KV heads to merge by their long-range cost repair a grouped model at
long context?

At 2 KV heads per layer, SmolLM2-135M's `coarsen_source` space is, per layer, which two of the
three source KV heads share one (3 candidates). Each arm chooses them by another score:

  demo        the demo study's searched grouping (fisher, re-ranked by `recoverable`, from
              256-token LAMBADA statistics);
  fisher      the guide proxy alone, from this benchmark's long statistics;
  recoverable the guide's candidates re-ranked by `recoverable` (what layer-wise recovery leaves,
              from the same statistics): the study's rank proxy before this one;
  long_range  the `long_range` proxy (objectives.proxies.long_range): per layer the candidate
              whose merge adds the least late-position NLL to the source, on `--cost-windows`
              *validation* documents of 2048 tokens; what `[search] rank_proxy = "long_range"`
              chooses with `rerank_top = 3`;
  long_range_worst  per layer the candidate of highest long-range cost: how much the choice can
              matter at all;
  recoverable_allocated, long_range_allocated  the study's `allocation = true` path under that
              rank proxy: its error curves spread the same 60 KV heads over the layers (1, 2 or 3
              per layer), then each layer's coarsening is re-ranked by it;
  long_range_kv_allocated  `allocation = "kv"`: `long_range` curves of K merged alone and of V
              merged alone divide the same 120 cached heads (60 K + 60 V in the arms above) over
              the layers *and* between keys and values.

Every arm is built the same way, as bench_long_recovery.py's best calibration: the `aligned` merge
and the demo's layer-wise recovery (24 steps of 2 sequences, lr 3e-3), both from 4 x 2048 tokens
of the `reading` text. Each is measured on test data: late-bucket perplexity (positions 1024-2047
of 4 documents) and passkey retrieval at 1024, 2048 and 4096 tokens (3 depths, 2 prompts each),
with paired intervals against the `demo`, `fisher`, `recoverable`, `long_range` and
`long_range_allocated` arms. With `--finetune N`, the `--finetune-arm` (`long_range`) is also
fine-tuned N tokens as in bench_long_recovery.py, and the source with the same recipe as the
control. The candidates' costs go to `long_grouping_costs.csv`, the arms to `long_grouping.csv`,
both as they finish (a stopped run resumes); the summary to `long_grouping.json`.

    python experiments/benchmarks/bench_long_grouping.py [--arms demo,fisher,long_range,...]
        [--cost-windows 2] [--finetune 24576]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from experiments.benchmarks import common
from experiments.benchmarks.bench_long_recovery import long_recipe
from gqa.grouping import Grouping, LayerGrouping, write_text_atomic
from objectives.long_context import LongContextConfig
from objectives.proxies import make_proxy
from objectives.recovery import recover
from objectives.significance import paired_accuracy, paired_bootstrap
from search.budget import Budget
from search.config import KV_TOGETHER, StudyConfig
from search.strategies import SearchContext, make_strategy

DEMO_GROUPING = "results/demo/groupings/2kv_coarsen_source_*.json"
# The summary's paired intervals are against these arms.
REFERENCES = ("demo", "fisher", "recoverable", "long_range", "long_range_allocated")
ARMS = (
    "demo",
    "fisher",
    "recoverable",
    "long_range",
    "long_range_worst",
    "recoverable_allocated",
    "long_range_allocated",
    "long_range_kv_allocated",
)
TEST = LongContextConfig(
    seq_len=2048, ppl_windows=4, lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9), trials=2
)
CALIBRATION = {"split": "reading", "seq_len": 2048, "num_seqs": 4, "grad_seqs": 4,
               "sample_seqs": 4, "batch_size": 1}  # fmt: skip


def candidate_costs(study, ctx, valid: LongContextConfig, table: common.CsvRows) -> dict:
    """Per layer, each coarsening's long-range cost {layer: {partition: cost}}: from the table
    where an earlier run measured it, else measured now (and appended)."""
    tokenizer = study.loaded.tokenizer
    merge = study.config.search.merge
    proxy = make_proxy(
        "long_range", study.source, study.stats, merge, tokenizer=tokenizer, long_config=valid
    )
    known = {(r["layer"], r["partition"]): r["cost"] for r in table.rows}
    strategy = make_strategy("coarsen_source", share_kv=True)
    costs: dict[int, dict] = {}
    for layer in tqdm(range(ctx.num_layers), desc="long-range cost of each coarsening"):
        costs[layer] = {}
        for partition in strategy.candidate_partitions(ctx, layer, "kv", 2, None):
            key = (layer, json.dumps(partition))
            if key not in known:
                cost = proxy.layer_score(layer, LayerGrouping(partition, partition))
                table.append({"layer": layer, "partition": key[1], "cost": cost})
                known[key] = cost
            costs[layer][partition] = known[key]
    return costs


def reranked(ctx: SearchContext, reranker) -> Grouping:
    """`coarsen_source`'s 2-KV grouping, each layer's 3 candidates re-ranked by `reranker` (None:
    the guide proxy's choice)."""
    ctx.reranker, ctx.rerank_top = reranker, 3
    try:
        return make_strategy("coarsen_source", share_kv=True).propose(
            ctx, Budget.uniform(ctx.num_layers, 2)
        )
    finally:
        ctx.reranker = None


def allocated(study, allocation: bool | str = True) -> Grouping:
    """The study's grouping under `allocation` (true or "kv") at 2 KV heads per layer: its rank
    proxy's error curves allocate the cached heads, and its context re-ranks each layer's
    coarsenings (K and V apart where their counts differ)."""
    budget = study.budget(2.0, allocation=allocation)
    return make_strategy("coarsen_source", share_kv=True).propose(study.context(), budget)


def long_range_changes(base: StudyConfig, valid: LongContextConfig) -> dict:
    """The changes that make `base` rank by `rank_proxy = "long_range"`, measured on the
    validation documents of `valid` (throwaway_study's keyword arguments)."""
    return {
        "search": dataclasses.replace(base.search, rank_proxy="long_range"),
        "selection": dataclasses.replace(base.selection, long_context=valid),
    }


def chosen(costs: dict, pick) -> Grouping:
    """Per layer the partition `pick` (min or max) of the costs, shared by K and V."""
    partitions = [pick(c, key=c.get) for _, c in sorted(costs.items())]
    heads = sum(len(g) for g in partitions[0])
    return Grouping.create(heads, partitions, partitions)


def measure(model, tokenizer) -> dict:
    """Late-bucket perplexity and passkey retrieval on test data, outcomes kept for pairing."""
    ppl = common.long_task_fields(model, None, tokenizer, "long_ppl", TEST)
    key = common.long_task_fields(model, None, tokenizer, "passkey", TEST)
    detail = json.loads(key["detail"])
    return {
        "long_ppl": ppl["score"],
        "buckets": json.dumps(json.loads(ppl["detail"])["buckets"]),
        "window_loss": ppl["outcomes"],
        "passkey": key["score"],
        **{f"passkey {n}": v for n, v in detail["by_length"].items()},
        "key_nll": key["loss"],
        "outcomes": key["outcomes"],
    }


def against(row: dict, reference: dict) -> dict:
    """Paired intervals of `row` minus `reference`: late-bucket perplexity over documents,
    passkey accuracy over prompts."""
    ppl = paired_bootstrap(json.loads(row["window_loss"]), json.loads(reference["window_loss"]))
    keys = paired_accuracy(
        {"passkey": json.loads(row["outcomes"])}, {"passkey": json.loads(reference["outcomes"])}
    )
    return {
        "long_ppl": [round(ppl.difference, 2), round(ppl.low, 2), round(ppl.high, 2)],
        "passkey": [round(keys.difference, 3), round(keys.low, 3), round(keys.high, 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    parser.add_argument(
        "--cost-windows", type=int, default=2, help="validation documents for long_range"
    )
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        help="also fine-tune the --finetune-arm this many tokens (bench_long_recovery's recipe: "
        "distilled, 2 x 2048-token `reading` windows a step), and the source as the control",
    )
    parser.add_argument("--finetune-arm", default="long_range", help="the arm to fine-tune")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        parser.error(f"--arms: unknown arm {unknown[0] if unknown else '(none)'!r} "
                     f"(arms: {', '.join(ARMS)})")  # fmt: skip
    if args.cost_windows < 1:
        parser.error(f"--cost-windows must be >= 1, got {args.cost_windows}")
    if args.finetune < 0:
        parser.error(f"--finetune must be >= 0 tokens, got {args.finetune}")
    if args.finetune_arm not in ARMS:
        parser.error(f"--finetune-arm: unknown arm {args.finetune_arm!r} (arms: {', '.join(ARMS)})")
    tuned = f"{args.finetune_arm}, fine-tuned {args.finetune}"
    control = f"source, fine-tuned {args.finetune}"  # the same recipe, so ratios are fair
    if args.finetune:
        arms += [tuned, control]
    start = time.time()
    table = common.CsvRows(args.out / "long_grouping.csv")
    cost_table = common.CsvRows(args.out / "long_grouping_costs.csv")
    done = {r["arm"]: r for r in table.rows}
    base = StudyConfig.load(common.DEMO_CONFIG)
    calibration = dataclasses.replace(base.calibration, **CALIBRATION)
    measured = dataclasses.replace(TEST, ppl_windows=args.cost_windows)  # validation documents
    ranked_long = long_range_changes(base, measured)
    with contextlib.ExitStack() as stack:
        study = stack.enter_context(
            common.throwaway_study(base, progress=True, calibration=calibration)
        )
        tokenizer = study.loaded.tokenizer
        ctx = SearchContext.from_model(study.source, proxy=study.proxy, stats=study.stats)
        groupings = {"demo": lambda: common.saved_grouping(DEMO_GROUPING)}
        groupings["fisher"] = lambda: reranked(ctx, None)
        groupings["recoverable"] = lambda: reranked(ctx, study.rank_proxy)
        groupings["recoverable_allocated"] = lambda: allocated(study)
        long_study = functools.cache(
            lambda: stack.enter_context(
                common.throwaway_study(base, progress=True, calibration=calibration, **ranked_long)
            )
        )
        groupings["long_range_allocated"] = lambda: allocated(long_study())
        groupings["long_range_kv_allocated"] = lambda: allocated(long_study(), KV_TOGETHER)
        if {"long_range", "long_range_worst"} & {*arms, args.finetune_arm}:
            costs = candidate_costs(study, ctx, measured, cost_table)
            groupings["long_range"] = lambda: chosen(costs, min)
            groupings["long_range_worst"] = lambda: chosen(costs, max)
        groupings[tuned] = groupings[args.finetune_arm]
        if "source" not in done:
            table.append({"arm": "source", **measure(study.source, tokenizer)})
            done["source"] = table.rows[-1]
        for arm in arms:
            if arm in done:
                continue
            t0 = time.time()
            if arm == control:
                grouping, model = study.source_grouping, copy.deepcopy(study.source)
            else:
                grouping = groupings[arm]()
                model = study.build_candidate(grouping, progress=True)
            if arm in (tuned, control):
                recipe = long_recipe(args.finetune)
                recover("finetune", model, study.source, tokenizer, study.stats, recipe)
            row = {"arm": arm, "grouping": grouping.to_json()}
            row["build_seconds"] = round(time.time() - t0, 1)
            row.update(measure(model, tokenizer))
            table.append(row)
            done[arm] = row
            print(json.dumps({k: v for k, v in row.items() if k != "grouping"}), flush=True)
    rows = {r["arm"]: r for r in table.rows}
    grouped = [a for a in rows if not a.startswith("source")]  # arms that merge heads
    layers = {a: Grouping.from_json(rows[a]["grouping"]).layers for a in grouped}
    summary = {
        "command": "python experiments/benchmarks/bench_long_grouping.py "
        f"--arms {args.arms} --cost-windows {args.cost_windows} --finetune {args.finetune} "
        f"--finetune-arm {args.finetune_arm}",
        "model": "smollm2-135m",
        "build": "merge aligned, layer-wise recovery 24 steps x 2 seqs lr 3e-3, calibration reading "
        "4x2048",
        "test": "late bucket (1024-2047) of 4 x 2048 test documents; passkey at 1024, 2048 and "
        "4096 tokens x 3 depths x 2 prompts",
        "arms": {
            a: {
                "long_ppl": round(float(r["long_ppl"]), 2),
                "passkey": {n: float(r[f"passkey {n}"]) for n in TEST.lengths},
                "key_nll": round(float(r["key_nll"]), 3),
                **{
                    f"vs_{ref}": against(r, rows[ref])
                    for ref in REFERENCES
                    if ref in rows and a in grouped and a != ref
                },
                "layers_unlike": {
                    ref: sum(x != y for x, y in zip(layers[a], layers[ref], strict=True))
                    for ref in REFERENCES
                    if ref in layers and a in layers and ref != a
                },
            }
            for a, r in rows.items()
        },
        "seconds_this_run": round(time.time() - start, 1),
    }
    if cost_table.rows:
        frame = cost_table.frame().groupby("layer")["cost"]
        spread = (frame.max() - frame.min()).to_numpy()
        summary["cost_spread_per_layer"] = {
            "median": round(float(np.median(spread)), 4),
            "max": round(float(spread.max()), 4),
            "min_cost_sum": round(float(frame.min().sum()), 4),
            "max_cost_sum": round(float(frame.max().sum()), 4),
        }
    write_text_atomic(args.out / "long_grouping.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
