"""Which layer-wise fit recovers the best 2-KV model at long context, chosen on validation?

Every long-context benchmark and `long_2kv.toml` fit the converted layers as the demo does (24
Adam steps of 2 calibration sequences, lr 3e-3, K and V trained, each layer on the *source's*
attention inputs), then distil. Single-layer long-range costs add up to far less than the grouped
model loses (bench_long_grouping): errors compound through the layers, and fits on the source's
inputs never see that. This benchmark builds the grouping `long_2kv.toml` chose (its saved
`coarsen_source` grouping whose head counts differ across layers: 60 KV heads allocated by
`long_range`, `aligned` merge, calibration 4 x 2048 `reading` tokens) under each layer-wise fit of
`--fits`, written STEPS/TRAIN/INPUTS:

  STEPS   Adam steps per layer (lr 3e-3, 2 sequences a step);
  TRAIN   the projections trained: `kv` or `qkvo`;
  INPUTS  `source` (the calibration inputs, as before) or `converted` (objectives.recovery.layerwise
          `inputs = "converted"`: layers fitted in order on the converted model's own inputs, to
          the source's outputs).

Each fitted model is scored, untuned, on validation by `long_2kv.toml`'s selection objective
(bench_long_finetune.VALIDATION) and on test as bench_long_grouping measures its arms, with paired
intervals against the first fit (the one in use). The fit of least validation objective is chosen.
With `--finetune N`, the chosen fit and the first are then distilled N tokens with the recipe
bench_long_finetune chose (lr 3e-4, 2 x 2048-token windows a step) and measured the same way.
Rows go to `long_layerwise.csv` as they finish (a stopped run resumes); the summary to
`long_layerwise.json`.

    python experiments/benchmarks/bench_long_layerwise.py
        [--fits 24/kv/source,24/kv/converted,96/kv/source,24/qkvo/source] [--finetune 24576]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import gqa
from experiments.benchmarks import common
from experiments.benchmarks.bench_long_finetune import (
    Recipe,
    measured,
    summarised,
    tuned,
    validation_value,
)
from experiments.benchmarks.bench_long_grouping import CALIBRATION, measure
from gqa.grouping import Grouping, write_text_atomic
from objectives.recovery import LayerwiseConfig, recover
from objectives.recovery.layerwise import INPUTS
from search.config import StudyConfig
from search.study import trained

STUDY_GROUPINGS = "results/long_2kv/groupings/2kv_coarsen_source_*.json"
DEFAULT_FITS = "24/kv/source,24/kv/converted,96/kv/source,24/qkvo/source"
TRAIN = {"kv": ("k", "v"), "qkvo": ("q", "k", "v", "o")}
RECIPE = "3e-4/2"  # bench_long_finetune's choice on validation


@dataclasses.dataclass(frozen=True)
class Fit:
    """One layer-wise fit: Adam steps per layer, projections trained, whose inputs."""

    steps: int
    train: str
    inputs: str

    @classmethod
    def parse(cls, spec: str) -> Fit:
        """ "STEPS/TRAIN/INPUTS"; a ValueError naming the spec otherwise."""
        parts = spec.split("/")
        try:
            if len(parts) != 3:
                raise ValueError
            fit = cls(int(parts[0]), parts[1], parts[2])
        except ValueError:
            raise ValueError(f"fit {spec!r} is not STEPS/TRAIN/INPUTS") from None
        if fit.steps < 1 or fit.train not in TRAIN or fit.inputs not in INPUTS:
            raise ValueError(
                f"fit {spec!r}: STEPS must be >= 1, TRAIN one of {', '.join(TRAIN)}, "
                f"INPUTS one of {', '.join(INPUTS)}"
            )
        return fit

    def config(self) -> LayerwiseConfig:
        """The demo's layer-wise recovery (lr 3e-3, 2 sequences a step) with these fields."""
        return LayerwiseConfig(
            steps=self.steps, lr=3e-3, batch_size=2, train=TRAIN[self.train], inputs=self.inputs
        )


def allocated_grouping(pattern: str = STUDY_GROUPINGS) -> Grouping:
    """The one saved grouping of `pattern` whose layers keep different numbers of KV heads (the
    study's allocated winner, not its uniform candidate)."""
    found = [
        g
        for g in map(Grouping.load, sorted(Path().glob(pattern)))
        if len({layer.num_k_groups for layer in g.layers}) > 1
    ]
    if len(found) != 1:
        raise SystemExit(f"expected one allocated grouping {pattern}, found {len(found)}")
    return found[0]


def fitted(study, grouping: Grouping, fit: Fit):
    """The source converted to `grouping` (the study's merge and statistics), fitted by `fit`;
    the recovery result too."""
    config = fit.config()
    merge = study.config.search.merge
    own = trained([("layerwise", config)])
    model = gqa.converted_copy(study.source, grouping, merge, study.stats, own=own)
    result = recover(
        "layerwise", model, study.source, study.loaded.tokenizer, study.stats, config, merge=merge
    )
    return model, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", default=DEFAULT_FITS, help="STEPS/TRAIN/INPUTS, comma-separated")
    parser.add_argument(
        "--finetune", type=int, default=0, help=f"then distil the chosen and first fits this many "
        f"tokens ({RECIPE}: lr, 2048-token windows a step)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    fits = common.parsed_specs(parser, "--fits", args.fits, Fit.parse, "fit")
    if args.finetune and args.finetune < 2048:
        parser.error(f"--finetune must be 0 or >= 2048 tokens (one window), got {args.finetune}")
    grouping = allocated_grouping()
    start = time.time()
    table = common.CsvRows(args.out / "long_layerwise.csv")
    done = {r["arm"]: r for r in table.rows}
    base = StudyConfig.load(common.DEMO_CONFIG)
    calibration = dataclasses.replace(base.calibration, **CALIBRATION)
    with contextlib.ExitStack() as stack:
        study = stack.enter_context(
            common.throwaway_study(base, progress=True, calibration=calibration)
        )
        tokenizer = study.loaded.tokenizer
        models = {}

        def build(spec: str):
            if spec not in models:
                models[spec] = fitted(study, grouping, fits[spec])
            return models[spec]

        for spec in fits:
            if spec in done:
                continue
            t0 = time.time()
            model, result = build(spec)
            row = {"arm": spec, "tokens": 0, **dataclasses.asdict(fits[spec])}
            row.update(fit_seconds=round(result.seconds, 1), layer_error=result.final_loss)
            row["valid"] = validation_value(model, tokenizer)
            row.update(measure(model, tokenizer))
            row["seconds"] = round(time.time() - t0, 1)
            table.append(row)
            done[spec] = row
            print(json.dumps({k: row[k] for k in ("arm", "valid", "long_ppl", "seconds")}))
        best = min(fits, key=lambda spec: float(done[spec]["valid"]))
        first = next(iter(fits))
        if args.finetune:
            recipe = Recipe.parse(RECIPE).config(args.finetune)
            for spec in dict.fromkeys((first, best)):
                arm = f"{spec}, tuned {args.finetune}"
                if arm in done:
                    continue
                t0 = time.time()
                model = tuned(build(spec)[0], study, recipe)
                models.pop(spec, None)
                row = {"arm": arm, "tokens": args.finetune, **dataclasses.asdict(fits[spec])}
                row["valid"] = validation_value(model, tokenizer)
                row.update(measure(model, tokenizer))
                row["seconds"] = round(time.time() - t0, 1)
                table.append(row)
                done[arm] = row
    rows = {arm: r for arm, r in done.items() if measured(r)}

    def reference(row: dict) -> dict:
        """What a row is paired with: the first fit, tuned with the row's tokens if it was."""
        tokens = int(row["tokens"])
        return rows.get(f"{first}, tuned {tokens}", {}) if tokens else done[first]

    summary = {
        "command": "python experiments/benchmarks/bench_long_layerwise.py "
        f"--fits {args.fits} --finetune {args.finetune}",
        "model": "smollm2-135m, 2 KV heads per layer allocated by long_range (long_2kv.toml's "
        "winner), merge aligned, calibration reading 4x2048",
        "validation": "bench_long_finetune.VALIDATION (long_2kv.toml's objective), valid subset",
        "chosen_on_validation": best,
        "arms": {
            arm: {
                **summarised(r, reference(r)),
                **({"fit_seconds": r["fit_seconds"]} if not int(r["tokens"]) else {}),
            }
            for arm, r in rows.items()
        },
        "seconds_this_run": round(time.time() - start, 1),
    }
    write_text_atomic(args.out / "long_layerwise.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
