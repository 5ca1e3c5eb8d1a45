"""Serving with the real KV cache: decode speed, prompt time, bytes held and peak memory.

For SmolLM2-135M and each cache setting (transformers' default cache; the source with the real
bit-packed cache at K4/V4 and K2/V2, group 64; the source through headgroup's grouped attention
on its own grouping; the default study's searched 2-KV grouping at 16 bits and at K4/V4; latent
layers (gqa.latent) with K and V at rank 64 (16-bit and at K4/V4), with V alone at rank 64, and
with partial-RoPE keys (MHA2MLA: 4 rotary pairs per group kept, rank 40: the same 64 key values)
and V at rank 64), a prompt
of held-out long text (objectives.long_context.long_windows, the long-context tasks' documents)
of each length and batch size is run once, then `--decode` greedy tokens are decoded one at a
time. Each measurement runs in its own process, twice: the first run gives the peak resident
memory (VmHWM above the built model with its weights paged in), the second, warm, the times.
Settings are run in turn, `--repeats` times, so that ratios to the default cache are taken side
by side on the same machine state. With `--tensor-memory`, each setting, length and batch is
also run once under the profiler for the peak of live tensor bytes (kv_cache_memory.csv): what
a setting needs, without the C allocator's retention, which moves resident peaks by about
+-30% from run to run.

Also, once per run: greedy generation of `--agree` tokens with the real K4/V4 cache against the
argmax of the simulated forward (gqa.kv_quant) on the same sequence.

Rows go to results/bench/kv_cache_speed.csv as they finish (a stopped run resumes);
kv_cache_speed.png and kv_cache_summary.json are rewritten at the end.

    python experiments/benchmarks/bench_kv_cache.py [--lengths 512 2048 8192] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import gqa
from experiments.benchmarks import common
from gqa.adapters import get_adapter
from gqa.grouping import write_text_atomic
from gqa.latent import LatentLayer, LatentPlan
from gqa.latent_model import apply_latent
from gqa.models import load_model
from gqa.precision import PrecisionPlan
from objectives.long_context import long_windows
from search.budget import Budget

SEARCHED = "results/default/groupings/2kv_coarsen_source_*.json"
SETTINGS = {  # name -> (grouping: None for the source, "source" for its own grouping; K/V bits)
    "default": (None, None),
    "k4v4": (None, (4, 4)),
    "k2v2": (None, (2, 2)),
    "grouped_source": ("source", None),
    "2kv": (SEARCHED, None),
    "2kv_k4v4": (SEARCHED, (4, 4)),
    "latent_k64v64": (None, None),
    "latent_v64": (None, None),
    "latent_rope_k64v64": (None, None),
    "latent_k64v64_k4v4": (None, (4, 4)),
}
# Every layer's K rank, V rank and rotary pairs kept per K group (partial RoPE, MHA2MLA's d_h/16:
# 4 pairs of 32, 3 groups x 8 values + rank 40 = the 64 key values latent_k64v64 caches).
LATENT = {
    "latent_k64v64": (64, 64, 0),
    "latent_v64": (None, 64, 0),
    "latent_rope_k64v64": (40, 64, 4),
    "latent_k64v64_k4v4": (64, 64, 0),
}
GROUP_SIZE = 64


def build(setting: str, loaded):
    grouping, bits = SETTINGS[setting]
    model = loaded.model
    if grouping == "source":
        model = gqa.converted_copy(model, gqa.current_grouping(model))
    elif grouping is not None:
        model = gqa.convert(model, common.saved_grouping(grouping))
    if setting in LATENT:  # speed does not depend on the factors: a plain SVD (identity grams)
        adapter = get_adapter(model)
        k_rank, v_rank, pairs = LATENT[setting]
        groups = len(gqa.current_grouping(model).layers[0].k)
        kept = (tuple(range(pairs)),) * groups if pairs else None
        plan = LatentPlan((LatentLayer(k_rank, v_rank, kept),) * adapter.num_layers)
        grams = [torch.eye(adapter.hidden_size)] * adapter.num_layers
        model = apply_latent(model, plan, grams)
    if bits is not None:
        layers = get_adapter(model).num_layers
        model = gqa.apply_precision(model, PrecisionPlan.uniform(layers, *bits, GROUP_SIZE))
    return model.eval()


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def formula_bytes(model, length: int, batch: int) -> int:
    """What gqa.precision's formula says the cache of `length` tokens holds (float32 model)."""
    return gqa.cache_bytes(model, length, batch=batch, dtype_bytes=4)


def serve(model, prompt: torch.Tensor, decode: int) -> tuple[float, float, object]:
    """Run `prompt` with a fresh cache, then decode `decode` greedy tokens one at a time:
    (prompt seconds, decode seconds, the cache)."""
    name = gqa.cache_keyword(model)
    cache = gqa.quantized_cache(model) if gqa.model_precision(model) else None
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{name: cache})
    prefill = time.perf_counter() - start
    cache = gqa.output_cache(out)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(decode):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - start, cache


@torch.no_grad()
def measure(setting: str, length: int, batch: int, decode: int) -> dict:
    """One setting at one prompt length and batch, in this process: first for memory (the
    process's first prompt, its peak above the built model with every weight paged in), then
    again for time (warm)."""
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    model = build(setting, loaded)
    prompt = long_windows(loaded.tokenizer, "test", length, batch)
    sum(float(p.sum()) for p in model.parameters())  # page every weight in
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    base_kb = _memory_kb("VmRSS")
    _, _, cache = serve(model, prompt, decode)
    peak_mb = (_memory_kb("VmHWM") - base_kb) / 1024
    held = _cache_bytes(cache)
    del cache
    prefill, seconds, _ = serve(model, prompt, decode)
    counts = Budget.of(gqa.current_grouping(model))
    return {
        "setting": setting,
        "length": length,
        "batch": batch,
        "prefill_s": prefill,
        "decode_tokens_per_s": batch * decode / seconds,
        "bytes_held": held,
        "formula_bytes": formula_bytes(model, length + decode, batch),
        "peak_mb": peak_mb,
        "kv_heads": sum(counts.k) / len(counts.k),  # K heads per layer, mean
    }


@torch.no_grad()
def tensor_memory(setting: str, length: int, batch: int, decode: int) -> dict:
    """The peak of live tensor bytes (torch's CPU allocator, from the profiler's memory events)
    over a prompt and `decode` greedy tokens, above what was live before: what a setting needs,
    whatever the C allocator keeps (which makes resident memory vary by about +-30% run to run)."""
    loaded = load_model("smollm2-135m")
    model = build(setting, loaded)
    prompt = long_windows(loaded.tokenizer, "test", length, batch)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        serve(model, prompt, decode)
    # An operator's own net allocations (self memory), and frees outside any operator ("[memory]"
    # events), in the order they began: live tensor bytes over time, at operator granularity.
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return {"setting": setting, "length": length, "batch": batch, "peak_tensor_mb": peak / 2**20}


@torch.no_grad()
def agreement(length: int, tokens: int) -> dict:
    """Greedy generation with the real K4/V4 cache against the simulated forward's argmax."""
    loaded = load_model("smollm2-135m")
    model = build("k4v4", loaded)
    prompt = long_windows(loaded.tokenizer, "test", length, 1)
    sequences = model.generate(
        prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
    )
    logits = model(input_ids=sequences[:, :-1], logits_to_keep=tokens).logits
    same = logits.argmax(-1)[0] == sequences[0, length:]
    differ = (~same).nonzero().flatten().tolist()
    return {
        "length": length,
        "generated": tokens,
        "agree": int(same.sum()),
        "fraction": float(same.float().mean()),
        "first_difference": differ[0] if differ else None,
    }


def _worker(task: dict) -> dict:
    if task["kind"] == "agreement":
        return agreement(task["length"], task["tokens"])
    if task["kind"] == "tensor_memory":
        return tensor_memory(task["setting"], task["length"], task["batch"], task["decode"])
    return measure(task["setting"], task["length"], task["batch"], task["decode"])


def run_worker(task: dict) -> dict:
    """`task` in a fresh process (its own peak memory); its JSON result."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(task)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {task} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting, length and batch: medians over repeats, and ratios to the default cache of
    the same repeat (then their median)."""
    keys = ["repeat", "length", "batch"]
    default = frame[frame["setting"] == "default"].set_index(keys)
    default = default[["decode_tokens_per_s", "prefill_s", "peak_mb"]].add_suffix("_default")
    rows = frame.join(default, on=keys)
    rows["decode_ratio"] = rows["decode_tokens_per_s"] / rows["decode_tokens_per_s_default"]
    rows["prefill_ratio"] = rows["prefill_s"] / rows["prefill_s_default"]
    columns = [
        "decode_tokens_per_s",
        "decode_ratio",
        "prefill_s",
        "prefill_ratio",
        "bytes_held",
        "formula_bytes",
        "peak_mb",
        "peak_mb_default",
    ]
    return rows.groupby(["length", "batch", "setting"], sort=False)[columns].median().reset_index()


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(SETTINGS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (setting, batch), rows in summary.groupby(["setting", "batch"], sort=False):
        style = dict(
            color=colours[setting],
            linestyle="-" if batch == 1 else "--",
            marker="o",
            label=f"{setting} b{batch}",
        )
        axes[0].plot(rows["length"], rows["decode_ratio"], **style)
        axes[1].plot(rows["length"], rows["peak_mb"], **style)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xscale="log", xlabel="prompt tokens", ylabel="decode tokens/s vs default cache")
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens",
        ylabel="peak resident memory above model (MB)",
    )
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, 2 CPU cores: the real KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="skip a length and batch whose prompt has more tokens than this",
    )
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--agree", type=int, default=256, help="tokens of the agreement check (0: skip)"
    )
    parser.add_argument("--agree-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--tensor-memory",
        action="store_true",
        help="also measure the peak of live tensor bytes of each setting, length and batch once",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    table = common.CsvRows(args.out / "kv_cache_speed.csv")
    done = {(r["repeat"], r["length"], r["batch"], r["setting"]) for r in table.rows}
    tasks = [
        (repeat, length, batch, setting)
        for repeat in range(args.repeats)
        for length in args.lengths
        for batch in args.batches
        if length * batch <= args.max_batch_tokens or batch == 1
        for setting in args.settings
    ]
    from tqdm.auto import tqdm

    for repeat, length, batch, setting in tqdm(tasks, desc="kv cache"):
        if (repeat, length, batch, setting) in done:
            continue
        task = {
            "kind": "measure",
            "setting": setting,
            "length": length,
            "batch": batch,
            "decode": args.decode,
        }
        table.append({"repeat": repeat, **run_worker(task)})
    if args.tensor_memory:
        memory = common.CsvRows(args.out / "kv_cache_memory.csv")
        have = {(r["length"], r["batch"], r["setting"]) for r in memory.rows}
        for _, length, batch, setting in tqdm(tasks, desc="tensor memory"):
            if (length, batch, setting) not in have:
                have.add((length, batch, setting))
                task = {
                    "kind": "tensor_memory",
                    "setting": setting,
                    "length": length,
                    "batch": batch,
                    "decode": args.decode,
                }
                memory.append(run_worker(task))
    summary_path = args.out / "kv_cache_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.agree and summary.get("agreement", {}).get("generated") != args.agree:
        task = {"kind": "agreement", "length": args.agree_length, "tokens": args.agree}
        summary["agreement"] = run_worker(task)
    frame = summarise(table.frame())
    summary["medians"] = frame.to_dict("records")
    memory_path = args.out / "kv_cache_memory.csv"
    if memory_path.is_file():
        summary["tensor_memory"] = pd.read_csv(memory_path).to_dict("records")
    write_text_atomic(summary_path, json.dumps(summary, indent=2))
    plot(frame, args.out / "kv_cache_speed.png")
    print(frame.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if "agreement" in summary:
        print("agreement:", summary["agreement"])


if __name__ == "__main__":
    main()
