"""Quality per KV byte: the source and the demo's converted models with their caches quantized.

For each model (the SmolLM2 source, the default study's searched 2-KV grouping and `neighbour_kv`
at 2 and 1.5 KV heads per layer, each rebuilt with the study's merge and layer-wise recovery) and
each cache precision (K/V bits, group size), test perplexity on `--windows` x 256 tokens with the
quantized cache simulated (gqa.kv_quant), and the steady-state KV bytes per token. On one model
per `--real` setting the same windows are also decoded token by token with the real bit-packed
cache, side by side with the simulation: perplexity, the largest log-probability difference,
measured cache bytes against the formula, and seconds of each.

Rows are appended to `results/bench/kv_precision.csv` as they finish (a stopped run resumes);
`kv_precision_summary.json` is rewritten at the end.

    python experiments/benchmarks/bench_kv_precision.py [--windows 24] [--real-windows 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import gqa
from experiments.benchmarks import common
from gqa.grouping import write_text_atomic
from gqa.precision import PrecisionPlan
from objectives.evaluate import perplexity
from search.budget import Budget

MODELS = {  # name -> grouping file pattern in results/default/groupings (None: the source)
    "source": None,
    "2kv_searched": "2kv_coarsen_source_*.json",
    "2kv_neighbour_kv": "2kv_neighbour_kv_*.json",
    "1.5kv_neighbour_kv": "1.5kv_neighbour_kv_*.json",
}
UNIFORM = [(16, 16, 32), (8, 8, 32), (4, 4, 32), (3, 3, 32), (2, 2, 32)]
MIXED = [(4, 4, 64), (4, 3, 64), (3, 3, 64), (4, 2, 64), (3, 2, 64), (2, 2, 64)]
MIXED_FOR = ("source", "2kv_searched")  # the baselines get the uniform settings only
REAL = {"source": (4, 4, 32), "2kv_searched": (3, 3, 32)}  # decoded with the real cache too


def _plan(layers: int, k: int, v: int, group: int) -> PrecisionPlan:
    return PrecisionPlan.uniform(layers, k, v, group_size=group)


@torch.no_grad()
def real_cache_decode(model, windows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-token log-probabilities of each window's tokens 1..L-1, decoding one token at a time
    with the model's real quantized cache; and the cache bytes at the end of the last window."""
    rows, nbytes = [], 0
    for window in windows:
        cache = gqa.quantized_cache(model)
        logps = []
        for t in tqdm(range(window.numel() - 1), desc="real cache", leave=False):
            logits = model(input_ids=window[None, t : t + 1], cache=cache, use_cache=True).logits
            logps.append(logits[0, -1].float().log_softmax(-1)[window[t + 1]])
        rows.append(torch.stack(logps))
        nbytes = cache.nbytes()
    return torch.stack(rows), nbytes


@torch.no_grad()
def simulated_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows).logits[:, :-1].float().log_softmax(-1)
    return logits.gather(-1, windows[:, 1:, None])[..., 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--real-windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    table = common.CsvRows(args.out / "kv_precision.csv")
    seen = {(r["model"], r["k_bits"], r["v_bits"], r["group_size"], r["mode"]) for r in table.rows}

    with common.throwaway_study(common.DEFAULT_CONFIG) as study:
        config = study.config
        windows = common.split_windows(
            study.loaded.tokenizer, args.windows, seq_len=config.promote.seq_len
        )
        layers, head_dim = study.adapter.num_layers, study.adapter.head_dim
        source_bytes = study.source_grouping.kv_bytes_per_token(head_dim)

        for name, pattern in MODELS.items():
            grouping = (
                study.source_grouping
                if pattern is None
                else common.saved_grouping(f"{common.DEFAULT_GROUPINGS}/{pattern}")
            )
            budget = Budget.of(grouping)
            settings = UNIFORM + (MIXED if name in MIXED_FOR else [])
            todo = [s for s in settings if (name, *s, "simulated") not in seen]
            real = REAL.get(name)
            if not todo and (real is None or (name, *real, "real") in seen):
                continue
            start = time.time()
            if pattern is None:
                base = copy.deepcopy(study.source)
            else:
                base = study.build_candidate(grouping, recovery_seed=0, progress=False)
            build_s = time.time() - start
            for k, v, group in tqdm(todo, desc=name):
                plan = _plan(layers, k, v, group)
                model = gqa.apply_precision(base, plan)
                start = time.time()
                result = perplexity(model, windows, progress=False)
                kv_bytes = plan.bytes_per_token(budget.k, budget.v, head_dim)
                table.append(
                    {
                        "model": name,
                        "kv_heads_per_layer": budget.kv_heads_per_layer,
                        "k_bits": k,
                        "v_bits": v,
                        "group_size": group,
                        "mode": "simulated",
                        "kv_bytes_per_token": kv_bytes,
                        "kv_fraction": kv_bytes / source_bytes,
                        "test_ppl": result.perplexity,
                        "seconds": time.time() - start,
                        "build_seconds": build_s,
                    }
                )
            if real is not None and (name, *real, "real") not in seen:
                plan = _plan(layers, *real)
                model = gqa.apply_precision(base, plan)
                few = windows[: args.real_windows]
                start = time.time()
                simulated = simulated_logprobs(model, few)
                sim_s = time.time() - start
                start = time.time()
                decoded, nbytes = real_cache_decode(model, few)
                real_s = time.time() - start
                length = few.shape[1] - 1  # the last window's cache holds its first L-1 tokens
                formula = plan.cache_bytes(
                    budget.k, budget.v, head_dim, length, dtype_bytes=base.dtype.itemsize
                )
                kv_bytes = plan.bytes_per_token(budget.k, budget.v, head_dim)
                for mode, logps, seconds in (
                    ("simulated_same_windows", simulated, sim_s),
                    ("real", decoded, real_s),
                ):
                    table.append(
                        {
                            "model": name,
                            "kv_heads_per_layer": budget.kv_heads_per_layer,
                            "k_bits": real[0],
                            "v_bits": real[1],
                            "group_size": real[2],
                            "mode": mode,
                            "kv_bytes_per_token": kv_bytes,
                            "kv_fraction": kv_bytes / source_bytes,
                            "test_ppl": math.exp(-float(logps.double().mean())),
                            "seconds": seconds,
                            "build_seconds": build_s,
                            "max_abs_logprob_diff": float((decoded - simulated).abs().max()),
                            "cache_bytes_measured": nbytes if mode == "real" else None,
                            "cache_bytes_formula": formula if mode == "real" else None,
                        }
                    )
            del base

    frame = table.frame()
    sim = frame[frame["mode"] == "simulated"].sort_values("kv_bytes_per_token")
    front, best = [], math.inf
    for row in sim.to_dict("records"):  # the quality-per-byte front over all models
        if row["test_ppl"] < best:
            best = row["test_ppl"]
            front.append(row)
    summary = {
        "command": "python experiments/benchmarks/bench_kv_precision.py "
        f"--windows {args.windows} --real-windows {args.real_windows}",
        "test_tokens": args.windows * (config.promote.seq_len),
        "source_kv_bytes_per_token": source_bytes,
        "front": [
            {
                k: r[k]
                for k in ("model", "k_bits", "v_bits", "group_size", "kv_fraction", "test_ppl")
            }
            for r in front
        ],
        "real_vs_simulated": [
            {k: v for k, v in r.items() if v == v}  # drop NaN (columns of the other mode)
            for r in frame[frame["mode"] != "simulated"].to_dict("records")
        ],
    }
    write_text_atomic(args.out / "kv_precision_summary.json", json.dumps(summary, indent=1) + "\n")
    print(sim[["model", "k_bits", "v_bits", "group_size", "kv_fraction", "test_ppl"]].to_string())


if __name__ == "__main__":
    main()
