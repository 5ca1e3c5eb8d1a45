"""Which fine-tuning recipe recovers the best 2-KV model at long context, chosen on validation?

The long-context benchmarks and `long_2kv.toml` tune grouped models with one recipe
(bench_long_recovery.long_recipe): distilled from the source, Q/K/V/O trained, lr 1e-4 with
cosine decay, 2 x 2048-token `reading` windows a step, so 24.6k tokens are 6 optimizer steps.
Nothing chose that learning rate or step count at long context.

This benchmark builds once the grouping `long_2kv.toml` chooses (bench_long_grouping's
`long_range_allocated` arm: 60 KV heads allocated across layers by `long_range` curves, `aligned`
merge, layer-wise recovery, all from 4 x 2048 `reading` tokens), then tunes a copy under each
recipe of `--recipes` with the same token budget. Each tuned model is scored

  on validation  by `long_2kv.toml`'s selection objective: late-bucket perplexity of 2 validation
                 papers times the perplexity of the keys of 18 validation passkeys (1, 2, 4k tokens);
  on test        as bench_long_grouping measures its arms (late bucket of 4 test papers, 18 test
                 passkeys), with paired intervals against the first recipe (the one in use).

The recipe of least validation objective is chosen, and the source tuned with it is the control
(test only). A recipe is LR/BATCH, or LR/BATCH/all to train every weight instead of Q/K/V/O:
steps = tokens / (BATCH x 2048). Rows go to `long_finetune.csv` as they finish (a stopped run
resumes; the grouped model is rebuilt); the summary to `long_finetune.json` (another `--tokens`:
`long_finetune_<tokens>.json`).

    python experiments/benchmarks/bench_long_finetune.py [--recipes 1e-4/2,3e-4/2,1e-3/2,3e-4/1]
        [--tokens 24576]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path

from experiments.benchmarks import common
from experiments.benchmarks.bench_long_grouping import (
    CALIBRATION,
    TEST,
    against,
    allocated,
    long_range_changes,
    measure,
)
from experiments.benchmarks.bench_long_recovery import long_recipe
from gqa.grouping import write_text_atomic
from objectives.recovery import FinetuneConfig, recover
from objectives.recovery.base import RecoveryDivergedError
from objectives.selection import SelectionObjective
from search.config import StudyConfig

VALIDATION = SelectionObjective.of(
    {"long_ppl": 1.0, "passkey": 1.0}, dataclasses.replace(TEST, ppl_windows=2)
)  # long_2kv.toml's [selection] and [long_context]
DEFAULT_RECIPES = "1e-4/2,3e-4/2,1e-3/2,3e-4/1"
DEFAULT_TOKENS = 24576  # another budget's summary goes to long_finetune_<tokens>.json


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe: learning rate, 2048-token windows a step, what is trained."""

    lr: float
    batch_size: int
    train_all: bool = False

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        """ "LR/BATCH" or "LR/BATCH/all"; a ValueError naming the spec otherwise."""
        parts = spec.split("/")
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "all"):
                raise ValueError
            recipe = cls(float(parts[0]), int(parts[1]), len(parts) == 3)
        except ValueError:
            raise ValueError(f"recipe {spec!r} is not LR/BATCH or LR/BATCH/all") from None
        if not recipe.lr > 0 or recipe.batch_size < 1:
            raise ValueError(f"recipe {spec!r}: the lr must be positive and the batch >= 1")
        return recipe

    def config(self, tokens: int) -> FinetuneConfig:
        """long_recipe with this lr, batch and trainable set (the warm-up stays 5% of steps)."""
        base = long_recipe(tokens)
        steps = max(1, tokens // (self.batch_size * base.seq_len))
        return dataclasses.replace(
            base,
            lr=self.lr,
            batch_size=self.batch_size,
            warmup_steps=max(1, steps // 20),
            trainable="all" if self.train_all else base.trainable,
        )


def tuned(model, study, recipe: FinetuneConfig):
    """A copy of `model` fine-tuned by `recipe` (distilled from the study's source)."""
    model = copy.deepcopy(model)
    recover("finetune", model, study.source, study.loaded.tokenizer, study.stats, recipe)
    return model


def validation_value(model, tokenizer) -> float:
    """`long_2kv.toml`'s selection objective on the validation documents and passkeys."""
    return VALIDATION.value(model, tokenizer, "valid", None)


def measured(row: dict) -> bool:
    """Whether a row holds test measurements (a diverged recipe's does not; CSV gaps read NaN)."""
    value = row.get("long_ppl")
    return value is not None and value == value and value != ""


def summarised(row: dict, first: dict) -> dict:
    """A row's summary: validation objective, test numbers, intervals against the first recipe."""
    if not measured(row):
        return {"note": row.get("note")}
    valid = row.get("valid")  # the control has none
    out = {"valid": round(float(valid), 2)} if valid is not None and valid == valid else {}
    out.update(
        long_ppl=round(float(row["long_ppl"]), 2),
        passkey={n: float(row[f"passkey {n}"]) for n in TEST.lengths},
        key_nll=round(float(row["key_nll"]), 3),
    )
    if row is not first and measured(first) and "valid" in out:
        out["vs_first"] = against(row, first)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes", default=DEFAULT_RECIPES, help="LR/BATCH[/all], comma-separated"
    )
    parser.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help="fine-tuning tokens per recipe"
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    recipes = common.parsed_specs(parser, "--recipes", args.recipes, Recipe.parse, "recipe")
    if args.tokens < 2048:
        parser.error(f"--tokens must be >= 2048 (one window), got {args.tokens}")
    start = time.time()
    table = common.CsvRows(args.out / "long_finetune.csv")
    done = {r["arm"]: r for r in table.rows if int(r["tokens"]) == args.tokens}
    base = StudyConfig.load(common.DEMO_CONFIG)
    calibration = dataclasses.replace(base.calibration, **CALIBRATION)
    changes = long_range_changes(base, VALIDATION.long_context)
    with contextlib.ExitStack() as stack:
        study = stack.enter_context(
            common.throwaway_study(base, progress=True, calibration=calibration, **changes)
        )
        tokenizer = study.loaded.tokenizer
        if any(spec not in done for spec in recipes):
            grouped = study.build_candidate(allocated(study), progress=True)
        for spec, recipe in recipes.items():
            if spec in done:
                continue
            t0 = time.time()
            config = recipe.config(args.tokens)
            row = {"arm": spec, "tokens": args.tokens, "steps": config.steps, "lr": recipe.lr}
            row.update(batch_size=recipe.batch_size, train_all=recipe.train_all)
            try:
                model = tuned(grouped, study, config)
            except RecoveryDivergedError as error:
                row.update(valid=float("nan"), note=str(error))
            else:
                row["valid"] = validation_value(model, tokenizer)
                row.update(measure(model, tokenizer))
            row["seconds"] = round(time.time() - t0, 1)
            table.append(row)
            done[spec] = row
            print(json.dumps({k: row[k] for k in ("arm", "valid", "seconds")}), flush=True)
        scored = {s: float(done[s]["valid"]) for s in recipes if measured(done[s])}
        if not scored:
            raise SystemExit("every recipe diverged; nothing to choose")
        best = min(scored, key=scored.get)
        control = f"source, {best}"
        if control not in done:
            t0 = time.time()
            model = tuned(study.source, study, recipes[best].config(args.tokens))
            row = {"arm": control, "tokens": args.tokens, **measure(model, tokenizer)}
            row["seconds"] = round(time.time() - t0, 1)
            table.append(row)
            done[control] = row
    first = next(iter(recipes))
    summary = {
        "command": "python experiments/benchmarks/bench_long_finetune.py "
        f"--recipes {args.recipes} --tokens {args.tokens}",
        "model": "smollm2-135m, 2 KV heads per layer allocated by long_range (long_2kv.toml)",
        "validation": VALIDATION.describe() + " (valid subset)",
        "test": f"late bucket (1024-2047) of {TEST.ppl_windows} x {TEST.seq_len} test documents; "
        f"passkey at {', '.join(map(str, TEST.lengths))} tokens x {len(TEST.depths)} depths x "
        f"{TEST.trials} prompts",
        "chosen_on_validation": best,
        "arms": {arm: summarised(r, done[first]) for arm, r in done.items()},
        "chosen_vs_its_control": round(
            float(done[best]["long_ppl"]) / float(done[control]["long_ppl"]), 3
        ),
        "seconds_this_run": round(time.time() - start, 1),
    }
    name = "long_finetune" + ("" if args.tokens == DEFAULT_TOKENS else f"_{args.tokens}")
    write_text_atomic(args.out / f"{name}.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
