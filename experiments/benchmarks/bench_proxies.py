"""Proxy fidelity benchmark on SmolLM2-135M: how well does each proxy rank realistic candidates?

Population: candidates at a fixed budget of 2 KV heads per layer (K and V each), every layer's K
and V partition drawn from a mix of options: merging two of the three source KV groups (the
realistic, good choices), neighbour (5 + 4, splits a source group) and random 2-group partitions
(bad). Each candidate has its own share of good choices, so the population spans good to bad, and
half of the candidates use the `query_aware` merge. For each candidate: held-out perplexity.
For each proxy: Spearman's rho against log-perplexity, agreement of its per-layer choice among
the three source-group merges with the choice of least end-to-end KL (that layer converted
alone), and candidates scored per second. Writes results/bench/proxies.csv and
results/bench/proxies_summary.json.

    python experiments/benchmarks/bench_proxies.py [--candidates 48] [--windows 12] [--kl-layers 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import gqa
from experiments.benchmarks import common
from gqa.grouping import (
    Grouping,
    LayerGrouping,
    canonical_partition,
    neighbour_partition,
    write_text_atomic,
)
from objectives.evaluate import perplexity
from objectives.proxies import PROXIES, make_proxy

CHEAP = ("wse", "act_cos", "kv_recon", "attn_out", "fisher")


def source_merges(source: Grouping, layer: int) -> list[tuple]:
    """The partitions that merge two of the layer's source KV groups (groups kept whole)."""
    groups = source.layers[layer].k
    options = []
    for drop in range(len(groups)):
        rest = [g for i, g in enumerate(groups) if i != drop]
        merged = tuple(h for g in rest for h in g)
        options.append(canonical_partition([merged, groups[drop]], source.num_heads))
    return options


def random_partition(rng: random.Random, heads: int, groups: int) -> tuple:
    while True:
        labels = [rng.randrange(groups) for _ in range(heads)]
        if len(set(labels)) == groups:
            return canonical_partition(
                [[h for h in range(heads) if labels[h] == g] for g in range(groups)], heads
            )


def choose_partition(rng: random.Random, source: Grouping, layer: int, good: float) -> tuple:
    """A source-group merge with probability `good`, else neighbour or a random partition."""
    if rng.random() < good:
        return rng.choice(source_merges(source, layer))
    if rng.random() < 0.3:
        return neighbour_partition(source.num_heads, 2)
    return random_partition(rng, source.num_heads, 2)


def population(source: Grouping, count: int, seed: int) -> list[tuple[Grouping, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        good = rng.random()
        layers = tuple(
            LayerGrouping(
                choose_partition(rng, source, layer, good),
                choose_partition(rng, source, layer, good),
            )
            for layer in range(source.num_layers)
        )
        out.append((Grouping(source.num_heads, layers), "query_aware" if i % 2 else "mean"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument(
        "--windows", type=int, default=12, help="held-out 256-token windows per candidate"
    )
    parser.add_argument(
        "--kl-layers", type=int, default=10, help="layers checked for per-layer agreement"
    )
    parser.add_argument(
        "--throughput", type=int, default=10000, help="fresh candidates for the speed test"
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--reuse-ppl",
        action="store_true",
        help="take the candidates' perplexities from an earlier proxies.csv of the same population",
    )
    args = parser.parse_args()
    start = time.time()

    loaded, stats = common.calibrated()
    model = loaded.model
    source = gqa.current_grouping(model)
    windows = common.split_windows(loaded.tokenizer, args.windows)
    candidates = population(source, args.candidates, seed=0)

    rows = []
    earlier = args.out / "proxies.csv"
    if args.reuse_ppl and earlier.is_file():
        old = pd.read_csv(earlier)
        if len(old) == len(candidates) and list(old["merge"]) == [m for _, m in candidates]:
            rows = old[["candidate", "merge", "log_ppl", "ppl"]].to_dict("records")
    pending = candidates[len(rows) :]
    for i, (grouping, merge) in enumerate(
        tqdm(pending, desc="held-out perplexity"), start=len(rows)
    ):
        converted = gqa.convert(copy.deepcopy(model), grouping, merge=merge, stats=stats)
        ppl = perplexity(converted, windows, progress=False)
        rows.append(
            {
                "candidate": i,
                "merge": merge,
                "log_ppl": math.log(ppl.perplexity),
                "ppl": ppl.perplexity,
            }
        )

    summary = {}
    for name in PROXIES:
        proxies = {
            merge: make_proxy(name, model, stats, merge=merge) for merge in ("mean", "query_aware")
        }
        t0 = time.perf_counter()
        for row, (grouping, merge) in zip(rows, candidates, strict=True):
            row[name] = proxies[merge].score(grouping)
        population_seconds = time.perf_counter() - t0
        rho = spearmanr([r[name] for r in rows], [r["log_ppl"] for r in rows]).statistic
        summary[name] = {
            "spearman_rho": rho,
            "population_seconds": population_seconds,
            "cost": PROXIES[name].cost,
        }
        if name in CHEAP:
            # Throughput on fresh candidates from the same distribution: first while the group
            # tables fill (at most 2^H - 1 groups per layer and K/V), then with them warm.
            for key, seed in (("candidates_per_second_cold", 1), ("candidates_per_second", 2)):
                fresh = [
                    g
                    for g, merge in population(source, args.throughput, seed=seed)
                    if merge == "mean"
                ]
                t0 = time.perf_counter()
                for grouping in fresh:
                    proxies["mean"].score(grouping)
                summary[name][key] = len(fresh) / (time.perf_counter() - t0)
        else:
            summary[name]["candidates_per_second"] = len(rows) / population_seconds
        print(name, summary[name], flush=True)

    # Per-layer agreement: among the source-group merges of one layer (K = V partition, mean
    # merge), which one does each proxy prefer, and which has the least end-to-end KL?
    kl = make_proxy("logit_kl", model, stats)
    step = max(1, source.num_layers // args.kl_layers)
    layers = list(range(0, source.num_layers, step))[: args.kl_layers]
    best_by_kl = {}
    for layer in tqdm(layers, desc="per-layer end-to-end KL"):
        options = [LayerGrouping(p, p) for p in source_merges(source, layer)]
        scores = [kl.layer_score(layer, o) for o in options]
        best_by_kl[layer] = min(range(len(options)), key=scores.__getitem__)
    for name in PROXIES:
        if name == "logit_kl":
            summary[name]["layer_agreement"] = 1.0
            continue
        proxy = make_proxy(name, model, stats)
        hits = 0
        for layer in layers:
            options = [LayerGrouping(p, p) for p in source_merges(source, layer)]
            scores = [proxy.layer_score(layer, o) for o in options]
            hits += min(range(len(options)), key=scores.__getitem__) == best_by_kl[layer]
        summary[name]["layer_agreement"] = hits / len(layers)

    write_text_atomic(args.out / "proxies.csv", pd.DataFrame(rows).to_csv(index=False))
    report = {
        "command": f"python experiments/benchmarks/bench_proxies.py --candidates {args.candidates} --windows {args.windows} "
        f"--kl-layers {args.kl_layers} --throughput {args.throughput}"
        + (" --reuse-ppl" if args.reuse_ppl else ""),
        "wall_seconds": round(time.time() - start, 1),
        "budget": "2 KV heads per layer for K and for V",
        "ppl_range": [min(r["ppl"] for r in rows), max(r["ppl"] for r in rows)],
        "kl_layers": layers,
        "proxies": summary,
    }
    write_text_atomic(args.out / "proxies_summary.json", json.dumps(report, indent=1) + "\n")
    print(f"{'proxy':<11}{'rho':>7}{'layer agree':>13}{'cand/s':>12}")
    for name, s in summary.items():
        print(
            f"{name:<11}{s['spearman_rho']:>7.3f}{s['layer_agreement']:>13.2f}{s['candidates_per_second']:>12.1f}"
        )


if __name__ == "__main__":
    main()
