"""Inference benchmark: decode speed and real KV-cache bytes of grouped attention on SmolLM2.

Variants, all measured side by side in one run (rounds interleave them; medians are reported):
  mha          the 9-KV-head MHA expansion (stock transformers)
  native_gqa   SmolLM2's own 3 KV heads (stock transformers)
  asym3_shuf   the same 3 groups as a headgroup grouping, query heads shuffled (non-contiguous)
  asym2        an asymmetric 2-group grouping (6 + 3 query heads) through headgroup
KV bytes are read from the cache tensors after prefill. Writes results/bench/inference.json.

    python experiments/benchmarks/bench_inference.py [--contexts 256,1024,2048] [--decode 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import gqa
from gqa.adapters import get_adapter
from gqa.grouping import Grouping, write_text_atomic
from gqa.models import load_model
from gqa.surgery import expand_to_mha, permute_query_heads


def variants(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.nn.Module]:
    adapter = get_adapter(model)
    heads, layers = adapter.num_heads, adapter.num_layers
    mha = expand_to_mha(copy.deepcopy(model))
    # Shuffle the MHA model's heads, then group them back into the original 3 groups: the same
    # function as native GQA, but with non-contiguous groups through the grouped attention.
    rng = random.Random(seed)
    perms = [rng.sample(range(heads), heads) for _ in range(layers)]
    shuffled = permute_query_heads(copy.deepcopy(mha), perms, with_kv=True)
    size = heads // 3
    k = [[[p for p in range(heads) if perm[p] // size == g] for g in range(3)] for perm in perms]
    asym3 = gqa.convert(shuffled, Grouping.create(heads, k))
    asym2 = gqa.convert(
        copy.deepcopy(model), Grouping.create(heads, [[range(0, 6), range(6, 9)]] * layers)
    )
    return {"mha": mha, "native_gqa": model, "asym3_shuf": asym3, "asym2": asym2}


@torch.no_grad()
def measure(model: torch.nn.Module, context: torch.Tensor, decode_tokens: int) -> dict:
    """Prefill `context`, then greedily decode `decode_tokens` one at a time; time the decode."""
    out = model(input_ids=context, use_cache=True)
    cache = gqa.output_cache(out)
    kv_bytes = sum(
        layer.keys.numel() * layer.keys.element_size()
        + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{gqa.cache_keyword(model): cache})
        token = out.logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - start
    return {
        "decode_tokens_per_s": decode_tokens / seconds,
        "kv_bytes": kv_bytes,
        "kv_bytes_per_token": kv_bytes // context.shape[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="256,1024,2048")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench/inference.json"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]

    loaded = load_model("smollm2-135m")
    models = variants(loaded.model)
    head_dim = get_adapter(loaded.model).head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in contexts:
        context = torch.randint(100, 40000, (1, length), generator=gen)
        samples: dict[str, list[dict]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                samples[name].append(measure(model, context, args.decode))
        for name, runs in samples.items():
            rows.append(
                {
                    "variant": name,
                    "context": length,
                    "decode_tokens_per_s": statistics.median(
                        r["decode_tokens_per_s"] for r in runs
                    ),
                    "kv_bytes": runs[0]["kv_bytes"],
                    "kv_bytes_per_token_fp32": runs[0]["kv_bytes_per_token"],
                    "kv_heads": gqa.current_grouping(models[name]).kv_heads(),
                }
            )
    native = {r["context"]: r for r in rows if r["variant"] == "native_gqa"}
    for r in rows:
        base = native[r["context"]]
        r["speed_vs_native"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["kv_vs_native"] = r["kv_bytes"] / base["kv_bytes"]
        grouping = gqa.current_grouping(models[r["variant"]])
        assert r["kv_bytes_per_token_fp32"] == grouping.kv_bytes_per_token(head_dim, 4)

    print(f"{'variant':<12}{'context':>8}{'tok/s':>9}{'x native':>10}{'KV MiB':>9}{'KV x':>7}")
    for r in rows:
        print(
            f"{r['variant']:<12}{r['context']:>8}{r['decode_tokens_per_s']:>9.1f}"
            f"{r['speed_vs_native']:>10.3f}{r['kv_bytes'] / 2**20:>9.1f}{r['kv_vs_native']:>7.2f}"
        )
    report = {
        "command": "python experiments/benchmarks/bench_inference.py "
        f"--contexts {args.contexts} --decode {args.decode} --rounds {args.rounds}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "dtype": "float32",
        "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
