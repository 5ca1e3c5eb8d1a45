"""Latent K/V against grouping and quantization at the same cache bytes, at long context, no
recovery (0 fine-tuning tokens).

For SmolLM2-135M, calibrated as the default study calibrates (4 x 2048 `reading` tokens), and at
each budget (a fraction of the source's 16-bit cache), one point per family:
  latent_uniform   every layer's K and V at the same rank (gqa.latent, whitened SVD);
  latent           per-layer K and V ranks from the exact knapsack over the Fisher-weighted latent
                   error table (objectives.latent_error, search.byte_allocation.allocate_latent);
  grouping         per layer the source, 2 or 1 KV heads (neighbour_kv, `aligned` merge, no
                   recovery) from the same knapsack over the grouping errors (16-bit cache);
  mixed_precision  per-layer K and V bits (2, 3, 4, 8, 16; g64) from the knapsack over the
                   quantization error table;
  latent_rope_uniform  latent_uniform's bytes with MHA2MLA's partial-RoPE keys (4 rotary pairs
                   per K group kept, chosen by query-key norm; the rest of the key latent);
  latent_quantized low rank with bits (Palu's combination), allocated per layer: each kind on its
                   heads at 2-16 bits, or latent at a rank and 2, 3, 4 or 16 bits, from one
                   knapsack over both tables (the latents' errors measured quantized);
  joint_no_latent  per layer the source, 2 or 1 KV heads, each at 2-16 bits, from one knapsack
                   (the byte front's joint family without latent options);
  joint            the same with the source's quantized latent options added.
Every choice uses calibration text only. Each point is scored on test data: `long_ppl`
(perplexity by position on 2048-token papers; per-paper late-bucket losses kept for paired
intervals) and `passkey`. With `--recovery-tokens`, the `--recovery-families` models at the
`--recovery-budgets` are also distilled from the source on that many `reading` tokens (2 x 2048
a step, Q/K/V/O trained: the latent factors like any projection) and scored again; the family
`source` there is the control, the source fine-tuned with the same recipe. Rows go to
results/bench/latent.csv as they finish (a stopped run resumes); latent.md tabulates them with
paired intervals of each family with latent layers against the best family without them
(grouping, mixed precision, joint_no_latent) at the same budget and tokens.

    python experiments/benchmarks/bench_latent.py [--budgets 0.6667,0.5,0.3334,0.25] [--windows 4]
        [--families latent,mixed_precision,...] [--recovery-tokens 25000] [--recovery-budgets 0.3334]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import gqa
from experiments.benchmarks import common
from gqa.assets import cache_dir
from gqa.grouping import Grouping, write_text_atomic
from gqa.latent import LatentPlan
from gqa.latent_model import apply_latent, cache_bytes_per_token
from objectives.evaluate import question_outcomes
from objectives.kv_quant_error import QuantErrorTable, grouping_errors, kv_quant_errors
from objectives.latent_error import latent_errors
from objectives.long_context import LongContextConfig
from objectives.recovery import recover
from objectives.recovery.layerwise import stats_fingerprint
from objectives.significance import paired_accuracy, paired_bootstrap
from search.byte_allocation import (
    InfeasibleBudget,
    allocate_joint,
    allocate_latent,
    allocate_precision,
)
from search.strategies.neighbour_kv import split_source_groups

TASKS = ("long_ppl", "passkey")
RANKS = (16, 32, 48, 64, 96, 128, 160)
GROUP_SIZE = 64
LATENT_BITS = (2, 3, 4)  # the bits a latent may be quantized to (latent_quantized)
WITHOUT_LATENT = ("grouping", "mixed_precision", "joint_no_latent")  # families with no latent
ROPE_PAIRS = 4  # partial RoPE: MHA2MLA's d_h/16 rotary pairs per group (head_dim 64)
MERGE = "aligned"  # the grouping family's merge: the project's default


def _sixteen_bit_table(num_layers: int, k_heads, v_heads) -> QuantErrorTable:
    row = {"k": {16: 0.0}, "v": {16: 0.0}}
    return QuantErrorTable(
        tuple(copy.deepcopy(row) for _ in range(num_layers)),
        tuple(k_heads),
        tuple(v_heads),
        GROUP_SIZE,
        0,
    )


class Families:
    """Builds each family's model at a byte budget, from the source and its calibration."""

    def __init__(self, loaded, stats):
        self.source, self.stats = loaded.model, stats
        self.adapter = gqa.get_adapter(self.source)
        self.layers, self.head_dim = self.adapter.num_layers, self.adapter.head_dim
        self.source_bytes = cache_bytes_per_token(self.source)
        self.grams = [layer.gram for layer in stats.layers]
        start = time.perf_counter()
        source_grouping = gqa.current_grouping(self.source)
        self.groupings = {"source": source_grouping}
        for groups in (2, 1):
            layers = [
                split_source_groups(tuple(map(tuple, layer.k)), groups)
                for layer in source_grouping.layers
            ]
            self.groupings[f"{groups}kv"] = Grouping.create(self.adapter.num_heads, layers)
        # The tables take minutes at 4 x 2048 tokens: kept on disk for a resumed run.
        path = cache_dir() / "bench" / f"latent_tables-{stats_fingerprint(stats)}-{MERGE}.pt"
        if path.is_file():
            tables = torch.load(path, weights_only=False)
        else:
            tables = {
                "latent": latent_errors(self.source, stats, RANKS, progress=True),
                "quant": kv_quant_errors(
                    self.source, stats, bits=(2, 3, 4, 8), group_size=GROUP_SIZE, progress=True
                ),
                "grouping": {
                    name: (0.0,) * self.layers
                    if name == "source"
                    else grouping_errors(self.grouped(grouping), self.source, stats)
                    for name, grouping in self.groupings.items()
                },
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tables, path)
        self.latent_table, self.quant_table = tables["latent"], tables["quant"]
        self.group_errors = tables["grouping"]
        self._quantized_path = path.with_name(f"latent_quantized-{stats_fingerprint(stats)}.pt")
        self._quantized_table = None
        self._grouped_tables: dict[str, QuantErrorTable] | None = None
        self._fingerprint = stats_fingerprint(stats)
        self.setup_seconds = time.perf_counter() - start

    def quantized_latent_table(self):
        """The latent table with every latent also quantized at LATENT_BITS (kept on disk)."""
        if self._quantized_table is None:
            if self._quantized_path.is_file():
                self._quantized_table = torch.load(self._quantized_path, weights_only=False)
            else:
                self._quantized_table = latent_errors(
                    self.source, self.stats, RANKS, True, LATENT_BITS, GROUP_SIZE
                )
                torch.save(self._quantized_table, self._quantized_path)
        return self._quantized_table

    def grouped(self, grouping: Grouping):
        """The source converted to `grouping` with the project's default merge (no recovery)."""
        return gqa.converted_copy(self.source, grouping, merge=MERGE, stats=self.stats)

    def budget_bytes(self, fraction: float) -> float:
        return fraction * self.source_bytes

    def latent_uniform(self, fraction: float):
        rank = int(fraction * self.source_bytes / (2 * 2 * self.layers))
        plan = LatentPlan.uniform(self.layers, rank, rank)
        return apply_latent(copy.deepcopy(self.source), plan, self.grams), None, plan_text(plan)

    def latent_rope_uniform(self, fraction: float):
        """latent_uniform's bytes with MHA2MLA's partial-RoPE keys: per K group the ROPE_PAIRS
        rotary pairs of greatest query-key norm stay rotated, the rest of the key goes through a
        latent of the rank the cache has left (gqa.latent.PartialRopeKeys)."""
        rank = int(fraction * self.source_bytes / (2 * 2 * self.layers))
        groups = len(gqa.current_grouping(self.source).layers[0].k)
        k_rank = rank - groups * 2 * ROPE_PAIRS
        plan = LatentPlan.uniform(self.layers, k_rank, rank)
        plan = gqa.choose_rope_pairs(self.source, plan, self.grams, ROPE_PAIRS)
        model = apply_latent(copy.deepcopy(self.source), plan, self.grams)
        text = f"K: {ROPE_PAIRS} rotary pairs per group + rank {k_rank}; V rank {rank}; pairs: "
        text += " ".join(
            "|".join(",".join(map(str, g)) for g in layer.rope_pairs) for layer in plan.layers
        )
        return model, None, text

    def latent(self, fraction: float):
        plan, _ = allocate_latent(self.latent_table, self.budget_bytes(fraction))
        return apply_latent(copy.deepcopy(self.source), plan, self.grams), None, plan_text(plan)

    def grouping(self, fraction: float):
        """Per layer the source, 2 or 1 KV heads at 16 bits: the grouping axis alone."""
        tables = {
            name: _sixteen_bit_table(
                self.layers,
                [len(layer.k) for layer in g.layers],
                [len(layer.v) for layer in g.layers],
            )
            for name, g in self.groupings.items()
        }
        return self._allocated(fraction, tables, bits=(16,))

    def mixed_precision(self, fraction: float):
        plan = allocate_precision(
            self.quant_table, self.budget_bytes(fraction), self.head_dim, bits=(2, 3, 4, 8, 16)
        )
        text = " ".join(f"{p.k_bits}/{p.v_bits}" for p in plan.layers)
        model = gqa.converted_copy(self.source, gqa.current_grouping(self.source))
        return model, plan, f"K/V bits per layer: {text}"

    def latent_quantized(self, fraction: float):
        """Palu's low rank with quantization, allocated per layer: each kind of each layer on its
        heads at 2-16 bits or latent at a (rank, bits) of the quantized latent table; the one
        exact knapsack of search.byte_allocation.allocate_joint, over the source alone."""
        return self._allocated(fraction, {"source": self.quant_table}, latent=True)

    def joint(self, fraction: float):
        """Everything together, layer by layer: the source's layer (heads at 2-16 bits, or
        latent at a quantized rank), or its 2- or 1-KV grouping at 2-16 bits."""
        return self._allocated(fraction, self.grouped_quant_tables(), latent=True)

    def joint_no_latent(self, fraction: float):
        """`joint` without the latent options: grouping and bits together (the byte front's
        joint family without `latent_ranks`)."""
        return self._allocated(fraction, self.grouped_quant_tables())

    def grouped_quant_tables(self) -> dict[str, QuantErrorTable]:
        """The quantization error table of the source and of each grouping (kept on disk)."""
        if self._grouped_tables is None:
            path = self._quantized_path.with_name(f"grouped_quant-{self._fingerprint}-{MERGE}.pt")
            if path.is_file():
                self._grouped_tables = torch.load(path, weights_only=False)
            else:
                self._grouped_tables = {
                    name: self.quant_table
                    if name == "source"
                    else kv_quant_errors(
                        self.grouped(grouping),
                        self.stats,
                        bits=(2, 3, 4, 8),
                        group_size=GROUP_SIZE,
                        progress=True,
                    )
                    for name, grouping in self.groupings.items()
                }
                torch.save(self._grouped_tables, path)
        return self._grouped_tables

    def _allocated(
        self,
        fraction: float,
        tables: dict[str, QuantErrorTable],
        bits: tuple[int, ...] = (2, 3, 4, 8, 16),
        latent: bool = False,
    ):
        """The model, precision plan and description of one joint allocation over `tables`'
        models (their grouping errors against the source), with the source's quantized latent
        options when `latent`. Each layer's attention is its model's: the `aligned` merge is
        layer-local, so converting the source to the mixed grouping rebuilds exactly those."""
        chosen = allocate_joint(
            tables,
            {name: self.group_errors[name] for name in tables},
            self.budget_bytes(fraction),
            self.head_dim,
            bits=bits,
            latent=self.quantized_latent_table() if latent else None,
            latent_model="source" if latent else None,
        )
        layers = [self.groupings[name].layers[i] for i, name in enumerate(chosen.models)]
        mixed = Grouping.create(
            self.adapter.num_heads, [layer.k for layer in layers], [layer.v for layer in layers]
        )
        if mixed == self.groupings["source"]:
            model = gqa.converted_copy(self.source, mixed)
        else:
            model = self.grouped(mixed)
        ranks = [(None, None)] * self.layers
        if chosen.latent is not None:
            model = apply_latent(model, chosen.latent, self.grams)
            ranks = [(r.k_rank, r.v_rank) for r in chosen.latent.layers]
        plan = None if chosen.plan.exact else chosen.plan
        text = "per layer KV heads, K/V: " + " ".join(
            f"{len(layer.k)}:{_kind_text(kr, p.k_bits)}/{_kind_text(vr, p.v_bits)}"
            for layer, p, (kr, vr) in zip(layers, chosen.plan.layers, ranks, strict=True)
        )
        return model, plan, text

    def kv_fraction(self, model, plan) -> float:
        with gqa.precision_applied(model, plan):
            return cache_bytes_per_token(model) / self.source_bytes


def _kind_text(rank: int | None, bits: int) -> str:
    """'r64@4' for a latent of rank 64 at 4 bits, '@2' for the kind's heads at 2 bits."""
    return f"{f'r{rank}' if rank else ''}@{bits}"


def plan_text(plan: LatentPlan) -> str:
    return "K/V ranks per layer: " + " ".join(
        f"{layer.k_rank or 192}/{layer.v_rank or 192}" for layer in plan.layers
    )


FAMILIES = (
    "latent_uniform",
    "latent",
    "grouping",
    "mixed_precision",
    "latent_quantized",
    "latent_rope_uniform",
    "joint_no_latent",
    "joint",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budgets",
        default="0.6667,0.5,0.3334,0.25",
        help="0.6667 and 0.3334: two thirds and one third, 2 and 1 KV heads of 3",
    )
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="families to run (default: all)"
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--passkey-lengths", default="1024,2048", help="passkey prompt lengths (tokens)"
    )
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument(
        "--accuracy-tasks", default="", help="multiple-choice tasks too, e.g. arc_easy,piqa"
    )
    parser.add_argument("--limit", type=int, default=200, help="test questions per task")
    parser.add_argument("--recovery-tokens", default="", help="e.g. 25000,100000")
    parser.add_argument("--recovery-budgets", default="0.3334")
    parser.add_argument("--recovery-families", default="latent,grouping,source")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
    try:  # bad lengths or sizes: one line (exit 2), not a traceback
        long_config = LongContextConfig(
            seq_len=args.seq_len,
            ppl_windows=args.windows,
            lengths=tuple(int(n) for n in args.passkey_lengths.split(",")),
            depths=(0.1, 0.5, 0.9),
            trials=args.trials,
        )
    except ValueError as exc:
        parser.error(str(exc))
    table = common.CsvRows(args.out / "latent.csv")
    done = {(r["family"], r["budget"], r["recovery_tokens"], r["task"]) for r in table.rows}
    loaded, stats = common.calibrated(
        split="reading", seq_len=2048, num_seqs=4, grad_seqs=4, sample_seqs=4, batch_size=1
    )
    families = Families(loaded, stats)
    print(f"error tables in {families.setup_seconds:.0f} s", flush=True)
    runs = [("source", 1.0, 0)] + [
        (family, float(b), 0)
        for b in args.budgets.split(",")
        for family in args.families.split(",")
    ]
    for tokens in (int(t) for t in args.recovery_tokens.split(",") if t):
        for family in args.recovery_families.split(","):
            budgets = [1.0] if family == "source" else args.recovery_budgets.split(",")
            runs += [(family, float(b), tokens) for b in budgets]
    tasks = TASKS + tuple(t for t in args.accuracy_tasks.split(",") if t)
    for family, budget, tokens in runs:
        if all((family, budget, tokens, task) in done for task in tasks):
            continue
        start = time.perf_counter()
        if family == "source":
            model, plan, text = loaded.model, None, "16-bit"
        else:
            try:
                model, plan, text = getattr(families, family)(budget)
            except InfeasibleBudget as exc:  # e.g. grouping below 1 KV head per layer
                print(f"{family:16s} {budget:5.2f} infeasible: {exc}", flush=True)
                continue
        if tokens:
            model = copy.deepcopy(model) if model is loaded.model else model
            with gqa.precision_applied(model, plan):
                recover(
                    "finetune",
                    model,
                    loaded.model,
                    loaded.tokenizer,
                    stats,
                    common.distill_recipe(tokens, batch_size=2, seq_len=2048, logging_steps=2),
                    progress=True,
                )
        build = time.perf_counter() - start
        for task in tasks:
            if (family, budget, tokens, task) in done:
                continue
            start = time.perf_counter()
            if task in TASKS:
                fields = common.long_task_fields(model, plan, loaded.tokenizer, task, long_config)
            else:
                fields = accuracy_fields(model, plan, loaded.tokenizer, task, args.limit)
            table.append(
                {
                    "family": family,
                    "budget": budget,
                    "kv_fraction": families.kv_fraction(model, plan),
                    "task": task,
                    **fields,
                    "choice": text,
                    "recovery_tokens": tokens,
                    "build_seconds": round(build, 1),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(
                f"{family:16s} {budget:5.2f} {tokens:7d} {task:9s} {fields['score']:.3f}",
                flush=True,
            )
    frame = table.frame()
    write_text_atomic(args.out / "latent.md", markdown(frame) + accuracy_markdown(frame))


def accuracy_fields(model, plan, tokenizer, task: str, limit: int) -> dict:
    """A multiple-choice task on its first `limit` test questions under the precision `plan`:
    accuracy, and the per-question outcomes (JSON) for intervals paired with the source."""
    with gqa.precision_applied(model, plan):
        correct, _ = question_outcomes(model, tokenizer, task, limit, progress=False, subset="test")
    accuracy = sum(correct) / len(correct)
    return {
        "score": accuracy,
        "loss": 1 - accuracy,
        "detail": "{}",
        "outcomes": json.dumps(correct),
    }


def accuracy_markdown(frame: pd.DataFrame) -> str:
    """Per family, budget and tokens with multiple-choice rows: mean accuracy over the tasks and
    its paired difference to the 16-bit source on the same questions."""
    tasks = sorted(set(frame["task"]) - set(TASKS))
    rows = frame[frame["task"].isin(tasks)].copy()
    if rows.empty:
        return ""
    rows["recovery_tokens"] = rows["recovery_tokens"].fillna(0).astype(int)
    outcomes = {
        key: {r["task"]: json.loads(r["outcomes"]) for r in group.to_dict("records")}
        for key, group in rows.groupby(["family", "budget", "recovery_tokens"])
    }
    source = outcomes.get(("source", 1.0, 0))
    lines = [
        "",
        f"Mean accuracy over {', '.join(tasks)} (test questions), paired with the source:",
        "",
        "| budget | tokens | family | mean accuracy | minus the source [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for (family, budget, tokens), correct in sorted(outcomes.items(), key=lambda x: -x[0][1]):
        mean = np.mean([np.mean(v) for v in correct.values()])
        paired = ""
        if source and family != "source" and set(correct) == set(source):
            diff = paired_accuracy(correct, source)
            paired = f"{diff.difference:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
        lines.append(f"| {budget:g} | {tokens} | {family} | {mean:.3f} | {paired} |")
    return "\n".join(lines) + "\n"


def _paired(row: dict, other: dict) -> str:
    diff = paired_bootstrap(
        np.array(json.loads(row["outcomes"])), np.array(json.loads(other["outcomes"]))
    )
    return f"{diff.difference:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]"


def markdown(frame: pd.DataFrame) -> str:
    """Per budget, recovery tokens and family: perplexity of the first and last position
    buckets, passkeys, and for each family with latent layers (`joint` included) the paired
    differences of late-bucket perplexity (over documents) against the best family without
    (WITHOUT_LATENT) and against grouping at the same budget and tokens."""
    frame = frame.copy()
    frame["recovery_tokens"] = frame["recovery_tokens"].fillna(0).astype(int)
    index = ["family", "budget", "recovery_tokens"]
    ppl = frame[frame["task"] == "long_ppl"]
    keys = frame[frame["task"] == "passkey"].set_index(index)
    buckets = list(json.loads(ppl["detail"].iloc[0])["buckets"]) if len(ppl) else ["?"]
    lines = [
        f"| budget | tokens | family | cache | ppl {buckets[0]} | ppl {buckets[-1]} | passkeys | "
        "vs best non-latent (late ppl, 95% CI) | vs grouping |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = ppl.sort_values(["budget", "recovery_tokens"], ascending=[False, True])
    for row in order.to_dict("records"):
        family, budget, tokens = row["family"], row["budget"], row["recovery_tokens"]
        first = list(json.loads(row["detail"])["buckets"].values())[0]
        passkeys = json.loads(keys.loc[(family, budget, tokens), "outcomes"])
        against = versus_grouping = ""
        same = order[(order["budget"] == budget) & (order["recovery_tokens"] == tokens)]
        others = same[same["family"].isin(WITHOUT_LATENT)]
        if family not in (*WITHOUT_LATENT, "source") and len(others):
            best = others.loc[others["score"].idxmin()].to_dict()
            against = f"{_paired(row, best)} vs {best['family']}"
            grouping = others[others["family"] == "grouping"]
            if len(grouping):
                versus_grouping = _paired(row, grouping.iloc[0].to_dict())
        lines.append(
            f"| {budget:g} | {tokens} | {family} | {100 * row['kv_fraction']:.1f}% | {first:.2f} | "
            f"{row['score']:.2f} | {sum(passkeys)}/{len(passkeys)} | {against} | {versus_grouping} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
