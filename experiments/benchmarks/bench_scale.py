"""Scale benchmark: the proxy search on random-weight LLaMA-2-7B-shaped layers (hidden 4096,
32 MHA heads of 128, intermediate 11008), measured at a small depth and projected to 32 layers.

Per layer: calibration time and statistics memory, proxy group-table build time and memory,
cold / warm candidates per second, each strategy's propose time at 16, 8 and 4 KV heads, the
`local_attn` proxy and layer-wise recovery (through `objectives.recovery.recover`); peak RSS of
each step. Projection: a 32-layer, 100-trial stage 1 (calibration, tables, proposals). Timings
on a shared machine are noisy; compare numbers of one run. Writes results/bench/scale.json.

    python -m experiments.benchmarks.bench_scale [--layers 2] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import gqa
from gqa.assets import SMOLLM2_PACKAGE, package_dir
from gqa.grouping import write_text_atomic
from objectives.calibration import CalibrationConfig, collect
from objectives.proxies import make_proxy
from objectives.recovery import recover
from search.budget import Budget
from search.strategies import STRATEGIES, SearchContext, make_strategy

SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128)
FULL_LAYERS = 32
KV_HEADS = (16, 8, 4)
TRIALS = 100


def seven_b_model(
    layers: int, device: str, vocab: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A random LLaMA-2-7B-shaped decoder of `layers` layers (small init keeps it finite)."""
    config = LlamaConfig(
        **SHAPE,
        intermediate_size=11008,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B model never passes the host
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


class PeakRSS:
    """Samples the process RSS every 20 ms; `section` yields a dict filled with the peak."""

    def __init__(self):
        self.proc = psutil.Process(os.getpid())
        self.peak = self.overall = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            rss = self.proc.memory_info().rss
            self.peak, self.overall = max(self.peak, rss), max(self.overall, rss)
            time.sleep(0.02)

    @contextmanager
    def section(self):
        out: dict = {}
        self.peak = base = self.proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield out
        sync()
        out["seconds"] = time.perf_counter() - start
        if torch.cuda.is_available():
            out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_rss_gb"] = max(self.peak, self.proc.memory_info().rss) / 2**30
        out["rss_growth_gb"] = (self.proc.memory_info().rss - base) / 2**30


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def sync() -> None:
    """Wait for queued GPU work, so that wall time covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable, *args) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    value = fn(*args)
    sync()
    return time.perf_counter() - start, value


def memory_projection(result: dict) -> dict:
    """GiB held in each phase by LLaMA-2-7B itself (6.74e9 parameters, bfloat16) with the
    statistics and tables measured per layer here; activations and Python are not counted."""
    h, inter, vocab = SHAPE["hidden_size"], 11008, 32000
    params = FULL_LAYERS * (4 * h * h + 3 * h * inter) + 2 * vocab * h
    weights = params * 2 / 2**30
    per_layer = result["calibration"]["stats_mb_per_layer"] * FULL_LAYERS / 1024
    gram = h * h * 4 / 2**30  # one float32 d x d statistic
    accumulator = h * h * 8 / 2**30  # one float64 running sum
    tables = result["tables"]["table_mb_per_layer"] * FULL_LAYERS / 1024
    attention = FULL_LAYERS * 4 * h * h * 2 / 2**30
    return {
        "assumes": "LLaMA-2-7B in bfloat16 (6.74e9 parameters); per-layer statistics and tables "
        "as measured here; activations, optimiser state of one layer and Python not counted",
        "weights": weights,
        # forward pass: x x^T sums of every layer; backward pass: float32 grams + g g^T sums
        "calibration_peak": weights + FULL_LAYERS * (gram + accumulator),
        "statistics": per_layer,
        "stage1_all_tables": weights + per_layer + tables,
        "stage1_table_budget_4gb": weights + per_layer + 4,
        "candidate_converted_copy": weights
        + per_layer
        + FULL_LAYERS * 2 * h * (h // 4) * 2 / 2**30,
        "candidate_deep_copy": 2 * weights + per_layer,
        "note": f"attention weights are {attention:.1f} GiB of the model: a copy owning q and o "
        "(trained) adds those",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="depth actually run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--proxy", default="fisher")
    ap.add_argument("--merge", default="query_aware")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=20, help="random candidates, cold and warm")
    ap.add_argument("--recovery-steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cheap_first = ["neighbour", "neighbour_kv", "random", "kmeans", "hierarchical"]
    rest = [s for s in sorted(STRATEGIES) if s not in cheap_first]
    ap.add_argument("--strategies", nargs="*", default=cheap_first + rest)
    ap.add_argument("--out", default="results/bench/scale.json")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="a saved tokenizer folder (default: SmolLM2's, read from the offline GGUF)",
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rss = PeakRSS()
    result: dict = {
        "command": "python -m experiments.benchmarks.bench_scale "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out" and v is not None
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, device {device_name(args.device)}, "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        "shape": {**SHAPE, "intermediate_size": 11008, "layers_run": args.layers},
    }
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:  # SmolLM2's, from the offline GGUF
        tokenizer = AutoTokenizer.from_pretrained(
            str(package_dir(SMOLLM2_PACKAGE)), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    model = seven_b_model(args.layers, args.device, len(tokenizer), getattr(torch, args.dtype))
    result["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    layers = args.layers

    # -- calibration ---------------------------------------------------------------------------
    config = CalibrationConfig(
        seq_len=args.seq_len,
        num_seqs=args.num_seqs,
        grad_seqs=2,
        sample_seqs=4,
        batch_size=4,
    )
    with torch.enable_grad(), rss.section() as calib:
        stats = collect(model, tokenizer, config, "llama2-7b-shape", progress=False)
    stat_bytes = sum(
        t.numel() * t.element_size()
        for layer in stats.layers
        for t in (layer.mean, layer.gram, layer.query, layer.grad, layer.inputs)
        if t is not None
    )
    calib["tokens"] = stats.tokens
    calib["stats_mb_per_layer"] = stat_bytes / layers / 2**20
    # held for every layer at once: the forward pass's float64 x x^T sums, then the float32
    # grams next to the backward pass's float64 g g^T sums (the larger of the two)
    d = SHAPE["hidden_size"]
    calib["sums_mb_per_layer"] = (d * d * 8 + d * d * 4) / 2**20
    result["calibration"] = calib

    # -- group tables --------------------------------------------------------------------------
    proxy = make_proxy(args.proxy, model, stats, merge=args.merge)
    tables = []
    for layer in range(layers):
        with rss.section() as t:
            proxy.table(layer, "k")
            proxy.table(layer, "v")
        t["table_mb"] = proxy.table_bytes(layer) / 2**20
        tables.append(t)
    result["tables"] = {
        "proxy": args.proxy,
        "merge": args.merge,
        "build_seconds_per_layer": float(np.mean([t["seconds"] for t in tables])),
        "table_mb_per_layer": float(np.mean([t["table_mb"] for t in tables])),
        "peak_rss_gb": max(t["peak_rss_gb"] for t in tables),
    }

    # -- candidates per second -----------------------------------------------------------------
    ctx = SearchContext.from_model(model, proxy=proxy, stats=stats)
    budget = Budget.uniform(layers, 8)
    candidates = [
        make_strategy("random", seed=s).propose(ctx, budget) for s in range(args.candidates)
    ]
    cold, _ = timed(lambda: [proxy.score(c) for c in candidates])
    proxy._layers.clear()  # whole-layer memo off: warm means known groups, not known layers
    warm, _ = timed(lambda: [proxy.score(c) for c in candidates])
    result["candidates_per_second"] = {
        "kv_heads": 8,
        "cold": args.candidates / cold,
        "warm": args.candidates / warm,
        "cold_seconds_per_layer": cold / args.candidates / layers,
    }

    # -- local_attn and layer-wise recovery ----------------------------------------------------
    grouping = make_strategy("neighbour").propose(ctx, budget)
    result["propose_seconds_per_layer"] = strat = {}
    local = make_proxy("local_attn", model, stats, merge=args.merge)
    with rss.section() as la:
        local.layer_score(0, grouping.layers[0])
    result["local_attn"] = la
    with torch.enable_grad(), rss.section() as rec:
        # what stage 2 does: the copy shares every non-attention weight with the source
        converted = gqa.converted_copy(model, grouping, args.merge, stats)
        out = recover(
            "layerwise",
            converted,
            model,
            tokenizer,
            stats,
            {"steps": args.recovery_steps},
            progress=False,
        )
    rec["recover_seconds"] = out.seconds
    rec["seconds_per_layer_step"] = out.seconds / layers / args.recovery_steps
    result["layerwise_recovery"] = rec
    del converted

    # -- strategies: one layer's K and V partitions, as `propose` makes them -------------------
    for name in args.strategies:
        strat[name] = {}
        for g in KV_HEADS:
            strategy = make_strategy(name)
            seconds = []
            for layer in range(layers):
                s, _ = timed(
                    lambda s=strategy, i=layer, g=g: [
                        s.layer_partition(ctx, i, kind, g) for kind in ("k", "v")
                    ]
                )
                seconds.append(s)
            strat[name][str(g)] = float(np.mean(seconds))
        print(name, strat[name], flush=True)
        write_text_atomic(Path(args.out + ".partial"), json.dumps(result, indent=2) + "\n")

    # -- projection to the full model -----------------------------------------------------------
    times = [v for s in strat.values() for v in s.values()]
    mean_propose = float(np.mean(times)) if times else 0.0  # no strategies run: not counted
    calib_full = calib["seconds"] * FULL_LAYERS / layers  # upper bound: embeddings do not grow
    tables_full = result["tables"]["build_seconds_per_layer"] * FULL_LAYERS
    propose_full = TRIALS * FULL_LAYERS * mean_propose
    greedy = strat.get("greedy")
    curves = greedy and 30 * FULL_LAYERS * float(np.mean(list(greedy.values())))
    result["projection_32_layers"] = {
        "assumes": "strategies drawn uniformly, budgets 16/8/4 equally; scoring a proposal reuses "
        "the groups its strategy scored",
        "calibration_seconds": calib_full,
        "calibration_sums_gb": calib["sums_mb_per_layer"] * FULL_LAYERS / 1024,
        "tables_seconds": tables_full,
        "tables_gb": result["tables"]["table_mb_per_layer"] * FULL_LAYERS / 1024,
        "stage1_100_trials_seconds": calib_full + tables_full + propose_full,
        "stage1_100_trials_hours": (calib_full + tables_full + propose_full) / 3600,
        "allocation_curves_seconds": curves,
        "layerwise_recovery_seconds_100_steps": rec["seconds_per_layer_step"] * 100 * FULL_LAYERS,
    }
    result["memory_projection_32_layers_gb"] = memory_projection(result)
    result["peak_rss_gb"] = rss.overall / 2**30
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    Path(args.out + ".partial").unlink(missing_ok=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
